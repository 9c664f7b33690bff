"""`tracekit watch`: live operation of a serving deployment (routing read from the engine, a rolling run, metrics,
re-placement judged by the same scoring as `place --from`)."""
