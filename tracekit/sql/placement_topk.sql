-- top-k (must be one value) and the largest expert id of a routes run
SELECT min(len(experts)) AS lo, max(len(experts)) AS hi, max(list_max(experts)) AS emax FROM read_parquet($files)
