-- loads_derived: (token, expert) assignment counts derived from the routes rows, with window = the forward pass
-- of the request (0 = prefill, s = decode step s).
CREATE VIEW loads_derived AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count(*)::BIGINT AS count
FROM (
    SELECT run_id, model, dataset, domain, phase, coalesce(step, 0) AS "window", layer,
           unnest(experts)::INTEGER AS expert
    FROM routes
)
GROUP BY ALL;
