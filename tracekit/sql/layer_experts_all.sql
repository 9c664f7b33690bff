-- Every token-layer's layer and expert list (or only those of MoE layer $layer), streamed in record batches
-- (co-activation within a layer).
SELECT layer, experts FROM routes WHERE $layer IS NULL OR layer = $layer;
