-- the routes runs of the connection, their directories and the chunk files the connection reads (the intact ones
-- under a partial read); analyses read them chunk by chunk
SELECT run_id, path, chunks FROM runs WHERE kind = 'routes' ORDER BY run_id
