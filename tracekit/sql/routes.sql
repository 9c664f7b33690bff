-- routes: one row per (request, token, MoE layer, router call), exactly as stored. `routes_files` is the runs'
-- Parquet chunks as one read-only Arrow dataset (see tracekit/query.py): runs with uint8 and uint16 expert ids (or
-- float16/float32 weights) mix, the ids promoted to the wider type and the weights read as float32.
-- Schema v2 added "pass" and router: the empty relation in front gives v1 files (which lack them) pass 0, router NULL.
CREATE VIEW routes AS
SELECT run_id, model, dataset, domain, request_id, prompt_id, phase, position, step, layer, token_id, experts, weights,
       coalesce("pass", 0)::SMALLINT AS "pass", router
FROM (SELECT NULL::SMALLINT AS "pass", NULL::VARCHAR AS router WHERE false
      UNION ALL BY NAME
      SELECT * FROM routes_files);
