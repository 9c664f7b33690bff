-- One row per request in a stable order (run, request id), with the labels analyses group by and the rows per
-- phase (which requests have a prefill, a decode; how large a request's counts can get; rows beyond the two phases
-- are an encoder's, which the analyses leave out).
SELECT run_id, request_id, prompt_id, dataset, domain, prompt_tokens, generated_tokens, prefill_rows, decode_rows, rows
FROM requests
ORDER BY run_id, request_id;
