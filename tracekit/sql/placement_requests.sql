-- placement input: each request of one run, its task family and its token-layer rows (the sample's budget)
SELECT request_id, any_value(domain)::VARCHAR AS domain, count(*) AS rows
FROM read_parquet($files)
{where}
GROUP BY request_id ORDER BY request_id
