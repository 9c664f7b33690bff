-- The token-layers of the requests $lo..$hi in a few chunk files ($files, which hold those requests whole): what the
-- streaming analyses count (tracekit/analysis/scan.py). Run on the analyses' private connection, never on user SQL.
-- phase_code: 0 prefill, 1 decode, 2 encoder (encoder rows count with the prefill in the per-request histograms, as
-- everywhere in the analyses). $decode_only: decode rows alone, and with $listed only the requests of _tracekit_only
-- (the correlation's partner pool). {experts} is the expert list, or the list cast to a fixed-size array when every
-- row has top-k entries (DuckDB hands those to Arrow faster); {position} is the token's position (co-activation's
-- inter-layer pairs) or nothing.
SELECT request_id, layer, (CASE phase WHEN 'decode' THEN 1 WHEN 'encoder' THEN 2 ELSE 0 END)::UTINYINT AS phase_code,
       {experts} AS experts{position}
FROM read_parquet($files, union_by_name = true)
WHERE request_id BETWEEN $lo AND $hi AND (NOT $decode_only OR phase = 'decode')
  AND (NOT $listed OR request_id IN (SELECT request_id FROM _tracekit_only))
