-- Inter-layer affinity for every MoE layer pair in one query: each token's expert list at a MoE layer and at the
-- next MoE layer (_tracekit_next_layer, registered by the caller, maps a layer to the next one; one row per layer
-- pair asked for). Read per batch of whole requests (_tracekit_files, registered by the caller, holds the requests $lo..$hi whole), so the join's
-- memory is bounded by the batch, not the run.
WITH t AS (
    SELECT request_id, phase, position, layer, experts
    FROM _tracekit_files
    WHERE request_id BETWEEN $lo AND $hi
)
SELECT a.layer, a.experts AS experts_a, b.experts AS experts_b
FROM t a
JOIN _tracekit_next_layer n ON a.layer = n.layer
JOIN t b ON b.request_id = a.request_id AND b.phase = a.phase AND b.position = a.position AND b.layer = n.next_layer
