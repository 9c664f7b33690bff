-- loads: counts of runs of kind "loads" as stored (`loads_files`: their Parquet chunks as one read-only Arrow
-- dataset), plus the counts derived from routes runs ({source}: the rows, in the stored column order). The stored
-- column "window" is a SQL keyword (`where window = 0` does not parse), so the view calls it step_window and keeps
-- "window" (quoted) as a compatibility alias, last.
CREATE VIEW loads AS
SELECT run_id, model, dataset, domain, phase, "window" AS step_window, layer, expert, count, "window"
FROM ({source});
