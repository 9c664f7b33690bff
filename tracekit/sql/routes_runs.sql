-- the routes runs of the connection and their directories (analyses read them chunk by chunk)
SELECT run_id, path FROM runs WHERE kind = 'routes' ORDER BY run_id
