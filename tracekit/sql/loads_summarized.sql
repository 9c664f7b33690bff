-- loads_derived from the per-chunk summary files written with each routes chunk (load_summary_files: the summaries as one read-only Arrow dataset): the same rows as the
-- derived view, read from a few small files instead of every token-layer.
CREATE VIEW loads_derived AS
SELECT run_id, model, dataset, domain, phase, "window", layer, expert, sum(count)::BIGINT AS count
FROM load_summary_files
GROUP BY ALL;
