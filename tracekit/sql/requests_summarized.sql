-- requests from the per-chunk request summaries (request_summary_files: the summaries as one read-only Arrow dataset); a request split over chunks is summed back together.
CREATE VIEW requests AS
SELECT run_id, request_id, any_value(prompt_id) AS prompt_id, any_value(model) AS model,
       any_value(dataset) AS dataset, any_value(domain) AS domain,
       sum(prompt_tokens)::BIGINT AS prompt_tokens, sum(generated_tokens)::BIGINT AS generated_tokens,
       sum(rows)::BIGINT AS rows, sum(prefill_rows)::BIGINT AS prefill_rows, sum(decode_rows)::BIGINT AS decode_rows
FROM request_summary_files
GROUP BY run_id, request_id;
