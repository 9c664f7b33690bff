-- loads_by_step: assignment counts per decode step (step_window = forward pass of the request: 0 prefill, s decode
-- step s, -1 a decode step the source did not record), derived from the routes rows (reads every token-layer).
-- "window" (quoted: a SQL keyword) is kept last as a compatibility alias of step_window.
CREATE VIEW loads_by_step AS
SELECT run_id, model, dataset, domain, phase, step_window, layer, expert, count, step_window AS "window"
FROM (
    SELECT run_id, model, dataset, domain, phase, step_window, layer, expert, count(*)::BIGINT AS count
    FROM (
        SELECT run_id, model, dataset, domain, phase,
               CASE WHEN phase = 'prefill' THEN 0 ELSE coalesce(step, -1) END AS step_window, layer,
               unnest(experts)::INTEGER AS expert
        FROM routes
    )
    GROUP BY ALL
);
