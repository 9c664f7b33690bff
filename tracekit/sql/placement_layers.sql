-- the MoE layers present in a run's files (when the manifest does not list them)
SELECT DISTINCT layer FROM read_parquet($files) ORDER BY layer
