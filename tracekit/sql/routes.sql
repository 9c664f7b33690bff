-- routes: one row per (request, token, MoE layer, router call), exactly as stored. {files} is a list literal of the
-- run's Parquet chunks; union_by_name lets runs with uint8 and uint16 expert ids (or float16/float32 weights) mix.
-- Schema v2 added "pass" and router: the empty relation in front gives v1 files (which lack them) pass 0, router NULL.
CREATE VIEW routes AS
SELECT run_id, model, dataset, domain, request_id, prompt_id, phase, position, step, layer, token_id, experts, weights,
       coalesce("pass", 0)::SMALLINT AS "pass", router
FROM (SELECT NULL::SMALLINT AS "pass", NULL::VARCHAR AS router WHERE false
      UNION ALL BY NAME
      SELECT * FROM read_parquet({files}, union_by_name = true));
