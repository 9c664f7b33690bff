-- requests: one row per request. Prompt tokens are the distinct prefill positions recorded, generated tokens
-- the distinct decode steps (a token counts once however many MoE layers recorded it).
CREATE VIEW requests AS
SELECT run_id, request_id,
       any_value(prompt_id) AS prompt_id,
       any_value(model) AS model,
       any_value(dataset) AS dataset,
       any_value(domain) AS domain,
       count(DISTINCT position) FILTER (WHERE phase = 'prefill') AS prompt_tokens,
       count(DISTINCT step) FILTER (WHERE phase = 'decode') AS generated_tokens,
       count(*) AS rows
FROM routes
GROUP BY run_id, request_id;
