-- placement input from a loads run: counts per layer and expert
SELECT layer, expert, sum(count)::BIGINT AS count
FROM read_parquet($files)
{where}
GROUP BY layer, expert
