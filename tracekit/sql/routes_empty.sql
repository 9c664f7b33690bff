-- routes when no run of kind "routes" was given: the same columns, no rows.
CREATE VIEW routes AS
SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::VARCHAR AS domain,
       NULL::INTEGER AS request_id, NULL::VARCHAR AS prompt_id, NULL::VARCHAR AS phase, NULL::INTEGER AS position,
       NULL::INTEGER AS step, NULL::SMALLINT AS layer, NULL::INTEGER AS token_id, NULL::USMALLINT[] AS experts,
       NULL::FLOAT[] AS weights, NULL::SMALLINT AS "pass", NULL::VARCHAR AS router
WHERE false;
