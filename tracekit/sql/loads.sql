-- loads: counts of runs of kind "loads" as stored (`loads_files`: their Parquet chunks as one read-only Arrow
-- dataset), plus the counts derived from routes runs.
CREATE VIEW loads AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, count
FROM loads_files
UNION ALL
SELECT * FROM loads_derived;
