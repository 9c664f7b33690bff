-- placement input: one row per token-layer of one run's routes files ($files), phase as 0 prefill / 1 decode, in
-- file order. No join or IN filter here: DuckDB keeps a plain scan's row order (preserve_insertion_order), while a
-- mark/semi join hands rows back in thread-scheduling order, and placement must read the same arrays every time
-- (a sample of requests is kept by the caller, batch by batch)
SELECT request_id, (phase = 'decode')::TINYINT AS phase, position, layer, experts
FROM read_parquet($files)
{where}
