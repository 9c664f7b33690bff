-- The token-layers of the requests $lo..$hi of a few chunk files ($files) that hold whole requests: one streamed
-- batch of per-request expert counts (tracekit/analysis/stream.py counts them into a dense array with numpy).
-- $decode_only keeps decode rows alone (the correlation's partner pool).
SELECT request_id, (phase = 'decode')::TINYINT AS decode, layer, experts
FROM read_parquet($files, union_by_name = true)
WHERE request_id BETWEEN $lo AND $hi AND (NOT $decode_only OR phase = 'decode')
