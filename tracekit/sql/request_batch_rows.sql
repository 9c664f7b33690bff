-- The token-layers of one batch of requests: those of _tracekit_batch (request_id -> slot 0..n-1, registered by
-- the caller) in a few chunk files (_tracekit_files, registered by the caller) that hold them whole, each with the flat index of its
-- (request, phase, layer) cell in the batch's dense (n, 2, L, E) counts (or (L, 2, n, E) when $layer_major):
-- cell = base + expert, counted by a numpy bincount. _tracekit_layers maps a MoE layer to 0..L-1.
-- $decode_only keeps decode rows alone (the correlation's partner pool).
SELECT (CASE WHEN $layer_major THEN ((y.li * 2 + (c.phase = 'decode')::BIGINT) * $n + q.slot)
             ELSE ((q.slot * 2 + (c.phase = 'decode')::BIGINT) * $L + y.li) END) * $E AS base,
       c.experts
FROM _tracekit_files c
JOIN _tracekit_batch q ON c.request_id = q.request_id
JOIN _tracekit_layers y ON c.layer = y.layer
WHERE c.request_id BETWEEN $lo AND $hi AND (NOT $decode_only OR c.phase = 'decode')
