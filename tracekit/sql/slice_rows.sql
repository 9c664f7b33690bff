-- The token-layers of the requests $lo..$hi in a few chunk files ($files, which hold those requests whole): what the
-- streaming analyses count (tracekit/analysis/scan.py). Run on the analyses' private connection, never on user SQL.
-- An encoder-decoder's encoder rows are left out (their layer numbers are the encoder's own, its experts others).
-- $decode_only: decode rows alone, and with $listed only the requests of _tracekit_only (the correlation's partner
-- pool). {position} is the token's position (co-activation's inter-layer pairs) or nothing.
SELECT request_id, layer, (phase = 'decode')::UTINYINT AS decode, experts{position}
FROM read_parquet($files, union_by_name = true)
WHERE request_id BETWEEN $lo AND $hi AND phase <> 'encoder' AND (NOT $decode_only OR phase = 'decode')
  AND (NOT $listed OR request_id IN (SELECT request_id FROM _tracekit_only))
