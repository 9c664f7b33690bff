-- routes: one row per (request, token, MoE layer), exactly as stored. `routes_files` is the run's Parquet chunks as
-- one read-only Arrow dataset (see tracekit/query.py): runs with uint8 and uint16 expert ids (or float16/float32
-- weights) mix, the ids promoted to the wider type and the weights read as float32.
CREATE VIEW routes AS
SELECT run_id, model, dataset, domain, request_id, prompt_id, phase, position, step, layer, token_id, experts, weights
FROM routes_files;
