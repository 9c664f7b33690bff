"""The scoring: the communication model, each engine's dispatch, the per-step replay, the hardware, the comparison table."""
