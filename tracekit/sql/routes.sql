-- routes: one row per (request, token, MoE layer), exactly as stored. {files} is a list literal of the run's
-- Parquet chunks; union_by_name lets runs with uint8 and uint16 expert ids (or float16/float32 weights) mix.
CREATE VIEW routes AS
SELECT run_id, model, dataset, domain, request_id, prompt_id, phase, position, step, layer, token_id, experts, weights
FROM read_parquet({files}, union_by_name = true);
