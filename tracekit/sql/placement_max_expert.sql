-- the largest expert id of a loads run
SELECT max(expert) FROM read_parquet($files)
