-- Per-chunk load summary: (token, expert) assignments per run, model, dataset, domain, phase, layer and expert,
-- window 0 for prefill and -1 for decode (every decode step together). The source is a chunk's table (at write
-- time) or the routes view (the derived fallback for runs written without summaries).
SELECT run_id::VARCHAR AS run_id, model::VARCHAR AS model, dataset::VARCHAR AS dataset, domain::VARCHAR AS domain,
       phase::VARCHAR AS phase, (CASE WHEN phase = 'prefill' THEN 0 ELSE -1 END)::INTEGER AS "window",
       layer::SMALLINT AS layer, expert, count(*)::BIGINT AS count
FROM (SELECT run_id, model, dataset, domain, phase, layer, unnest(experts)::INTEGER AS expert FROM {source})
GROUP BY ALL
