-- The MoE layers present in the traces.
SELECT DISTINCT layer FROM routes ORDER BY layer;
