-- requests: one row per request, from the request summary (summary_requests.sql) over the routes rows,
-- for runs written without per-chunk summaries. Prompt tokens are the distinct prefill positions recorded,
-- generated tokens the distinct decode steps (a token counts once however many MoE layers recorded it).
CREATE VIEW requests AS
SELECT run_id, request_id, prompt_id, model, dataset, domain, prompt_tokens, generated_tokens, rows,
       prefill_rows, decode_rows
FROM ({select});
