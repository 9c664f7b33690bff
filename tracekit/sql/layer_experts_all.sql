-- Every token-layer's layer and expert list, streamed in record batches (co-activation for all layers).
SELECT layer, experts FROM routes;
