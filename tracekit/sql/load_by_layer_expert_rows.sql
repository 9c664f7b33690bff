-- Load per layer and expert counted from every row (the benchmark compares it with the summaries and pandas).
SELECT layer, expert, count(*)::BIGINT AS n
FROM (SELECT layer, unnest(experts) AS expert FROM routes)
GROUP BY ALL
ORDER BY layer, expert;
