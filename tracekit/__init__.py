"""tracekit: record which experts a Mixture-of-Experts LLM uses, token by token, and plan deployments from it."""

__version__ = "0.1.0"

from .errors import TracekitError  # noqa: E402
from .schema import SCHEMA_VERSION  # noqa: E402
from .store import Run, open_run  # noqa: E402


def connect(runs, *, allow_partial: bool = False, **kwargs):
    """A read-only DuckDB connection with the views routes, choices, requests, runs, loads over ``runs``.

    Read-only always: no SQL run on it can create, change or delete a file (see :mod:`tracekit.query`);
    ``memory_limit=``/``threads=`` as in :func:`tracekit.query.connect`. A run with a missing, extra, truncated or
    corrupt chunk is refused unless ``allow_partial`` (then its intact chunks are read)."""
    from .query import connect as _connect
    from .store import partial_reads

    with partial_reads(allow_partial):
        return _connect(runs, **kwargs)


def collect(opts, **kwargs):
    """Trace a dataset through a model into a run directory; see :func:`tracekit.collect.collect`."""
    from .collect import collect as _collect

    return _collect(opts, **kwargs)


__all__ = ["TracekitError", "SCHEMA_VERSION", "Run", "open_run", "connect", "collect", "__version__"]
