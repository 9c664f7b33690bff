-- Per-chunk request summary: one row per request of the chunk (see summary_loads.sql). Tokens are
-- distinct prefill positions and decode steps; rows are token-layers, split by phase.
SELECT run_id::VARCHAR AS run_id, request_id, any_value(prompt_id) AS prompt_id, any_value(model)::VARCHAR AS model,
       any_value(dataset)::VARCHAR AS dataset, any_value(domain)::VARCHAR AS domain,
       count(DISTINCT position) FILTER (WHERE phase = 'prefill') AS prompt_tokens,
       count(DISTINCT step) FILTER (WHERE phase = 'decode') AS generated_tokens,
       count(*) FILTER (WHERE phase = 'prefill') AS prefill_rows,
       count(*) FILTER (WHERE phase = 'decode') AS decode_rows,
       count(*) AS rows
FROM {source}
GROUP BY run_id, request_id
