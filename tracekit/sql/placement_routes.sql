-- placement input: one row per token-layer of one run's routes files ($files), phase as 0 prefill / 1 decode
SELECT request_id, (phase = 'decode')::TINYINT AS phase, position, layer, experts
FROM read_parquet($files)
{where}
