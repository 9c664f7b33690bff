-- rows of an encoder-decoder's encoder in a run's routes files: placement leaves them out and says how many
SELECT count(*) FROM read_parquet($files, union_by_name = true) WHERE phase = 'encoder'
