-- loads_by_step: assignment counts per decode step (window = forward pass of the request: 0 prefill, s decode
-- step s, -1 a decode step the source did not record), derived from the routes rows (reads every token-layer).
CREATE VIEW loads_by_step AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count(*)::BIGINT AS count
FROM (
    SELECT run_id, model, dataset, domain, phase, CASE WHEN phase = 'prefill' THEN 0 ELSE coalesce(step, -1) END AS "window", layer,
           unnest(experts)::INTEGER AS expert
    FROM routes
)
GROUP BY ALL;
