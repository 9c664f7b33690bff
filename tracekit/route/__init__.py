"""``tracekit route``: the grouping rule applied online, as an HTTP proxy in front of an SGLang server.

- :mod:`.table` loads the exported grouping file (rule, label -> nodes, cluster, model, prompt classifier) and
  checks it against the deployment (model, DP size) once, at start.
- :mod:`.body` reads a request body (JSON object) for its prompt text and an existing rank, and inserts
  ``routed_dp_rank`` without re-serialising the rest.
- :mod:`.balancer` counts in-flight requests per DP rank and picks the least loaded rank of a group.
- :mod:`.metrics` holds the Prometheus counters; :mod:`.server` is the aiohttp proxy itself.

The proxy reads no traces: everything it needs at request time is in the grouping file.
"""
