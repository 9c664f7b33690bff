-- loads when no run of kind "loads" was given: counts derived from the routes rows (see loads.sql).
CREATE VIEW loads AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count(*)::BIGINT AS count
FROM (
    SELECT run_id, model, dataset, domain, phase, coalesce(step, 0) AS "window", layer,
           unnest(experts)::INTEGER AS expert
    FROM routes
)
GROUP BY ALL;
