-- The first rows of a batch's files (_tracekit_files): are they ordered layer-major (one layer, many requests) or request-major?
SELECT count(DISTINCT layer) AS layers, count(DISTINCT request_id) AS requests
FROM (SELECT layer, request_id FROM _tracekit_files LIMIT 4096)
