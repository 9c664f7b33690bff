-- placement input: one row per token-layer of one run's routes files ($files), phase as 0 prefill / 1 decode; only
-- the requests of _tracekit_keep (registered by the caller) when $sampled
SELECT request_id, (phase = 'decode')::TINYINT AS phase, position, layer, experts
FROM read_parquet($files)
WHERE (NOT $sampled OR request_id IN (SELECT request_id FROM _tracekit_keep)) {and_where}
