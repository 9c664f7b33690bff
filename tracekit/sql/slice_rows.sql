-- The token-layers of the requests $lo..$hi in a few chunk files ($files, which hold those requests whole): what the
-- streaming analyses count (tracekit/analysis/scan.py). Run on the analyses' private connection, never on user SQL.
-- Encoder rows count with the prefill, as everywhere else in the analyses. $decode_only: decode rows alone, and with
-- $listed only the requests of _tracekit_only (the correlation's partner pool). {experts} is the expert list, or
-- the list cast to a fixed-size array when every row has top-k entries (DuckDB hands those to Arrow faster).
SELECT request_id, layer, (phase = 'decode')::UTINYINT AS decode, {experts} AS experts
FROM read_parquet($files, union_by_name = true)
WHERE request_id BETWEEN $lo AND $hi AND (NOT $decode_only OR phase = 'decode')
  AND (NOT $listed OR request_id IN (SELECT request_id FROM _tracekit_only))
