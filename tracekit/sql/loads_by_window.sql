-- aggregated counts per phase, domain, dataset, step window, layer and expert (count-only imbalance analysis)
SELECT phase, domain, dataset, step_window, layer, expert, sum(count)::BIGINT AS count
FROM loads
GROUP BY ALL
