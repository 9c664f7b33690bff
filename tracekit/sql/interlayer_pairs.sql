-- The same token's expert lists at layer $layer and at the next MoE layer $next_layer (inter-layer affinity).
SELECT a.experts AS experts_a, b.experts AS experts_b
FROM (SELECT run_id, request_id, phase, position, experts FROM routes WHERE layer = $layer) a
JOIN (SELECT run_id, request_id, phase, position, experts FROM routes WHERE layer = $next_layer) b
USING (run_id, request_id, phase, position);
