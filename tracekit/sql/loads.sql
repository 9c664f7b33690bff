-- loads: (token, expert) assignment counts per window, layer and expert. Runs of kind "loads" are read as
-- stored ({files}); runs of kind "routes" contribute counts derived from their rows, with window = the forward
-- pass of the request (0 = prefill, s = decode step s).
CREATE VIEW loads AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count
FROM read_parquet({files}, union_by_name = true)
UNION ALL
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count(*)::BIGINT AS count
FROM (
    SELECT run_id, model, dataset, domain, phase, coalesce(step, 0) AS "window", layer,
           unnest(experts)::INTEGER AS expert
    FROM routes
)
GROUP BY ALL;
