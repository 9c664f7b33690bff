-- loads: counts of runs of kind "loads" as stored ({files}), plus the counts derived from routes runs.
CREATE VIEW loads AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count
FROM read_parquet({files}, union_by_name = true)
UNION ALL
SELECT * FROM loads_derived;
