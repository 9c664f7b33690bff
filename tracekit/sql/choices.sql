-- choices: one row per (token, layer, rank): the rank-th expert the router chose for that token-layer.
-- The three unnests run in lockstep; a null weights list yields null weights.
CREATE VIEW choices AS
SELECT run_id, model, dataset, domain, request_id, prompt_id, phase, position, step, layer, token_id,
       unnest(experts) AS expert,
       unnest(weights) AS weight,
       unnest(range(len(experts))) AS rank,
       "pass", router
FROM routes;
