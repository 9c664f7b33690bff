-- loads_derived: the load summary (summary_loads.sql) computed from the routes rows, for runs written without
-- per-chunk summaries. The SELECT is summary_loads.sql over the routes view.
CREATE VIEW loads_derived AS
{select};
