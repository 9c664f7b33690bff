-- Load per layer and expert: (token, expert) assignments over the whole trace (the benchmark's first query).
SELECT layer, expert, count(*)::BIGINT AS n
FROM (SELECT layer, unnest(experts) AS expert FROM routes)
GROUP BY ALL
ORDER BY layer, expert;
