-- Load per layer and expert: (token, expert) assignments over the whole trace, from the loads view (the
-- per-chunk summaries of routes runs; stored counts of loads runs).
SELECT layer, expert, sum(count)::BIGINT AS n
FROM loads
GROUP BY ALL
ORDER BY layer, expert;
