-- grouping classifier input: each request's dataset and the dataset's own prompt id
SELECT request_id, any_value(dataset)::VARCHAR AS dataset, any_value(prompt_id)::VARCHAR AS prompt_id
FROM read_parquet($files)
GROUP BY request_id ORDER BY request_id
