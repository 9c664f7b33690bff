-- The first rows of a batch's files: are they ordered layer-major (one layer, many requests) or request-major?
SELECT count(DISTINCT layer) AS layers, count(DISTINCT request_id) AS requests
FROM (SELECT layer, request_id FROM read_parquet($files, union_by_name = true) LIMIT 4096)
