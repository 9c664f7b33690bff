-- Axis sizes when the manifests do not give them: layers and experts actually present.
SELECT max(layer)::INTEGER + 1 AS num_layers, max(list_max(experts))::INTEGER + 1 AS num_experts,
       max(len(experts))::INTEGER AS top_k
FROM routes;
