-- aggregated counts per phase, domain, dataset, window, layer and expert (count-only imbalance analysis)
SELECT phase, domain, dataset, "window", layer, expert, sum(count)::BIGINT AS count
FROM loads
GROUP BY ALL
