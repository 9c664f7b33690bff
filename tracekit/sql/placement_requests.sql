-- placement input: each request of one run and its task family
SELECT request_id, any_value(domain)::VARCHAR AS domain
FROM read_parquet($files)
{where}
GROUP BY request_id ORDER BY request_id
