-- One row per request in a stable order (run, request id), with the labels analyses group by.
SELECT run_id, request_id, prompt_id, dataset, domain, prompt_tokens, generated_tokens
FROM requests
ORDER BY run_id, request_id;
