-- the geometry the manifests declare, per routes run
SELECT moe_layers, num_experts, top_k FROM runs WHERE kind = 'routes'
