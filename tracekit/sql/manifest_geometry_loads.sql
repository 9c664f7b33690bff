-- the geometry the manifests of count-only runs (kind 'loads') declare
SELECT moe_layers, num_experts, top_k FROM runs WHERE kind = 'loads'
