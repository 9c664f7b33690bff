"""The data placement works on: trace arrays, loading runs, statistics."""
