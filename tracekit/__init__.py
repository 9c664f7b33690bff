"""tracekit: record which experts a Mixture-of-Experts LLM uses, token by token, and plan deployments from it."""

__version__ = "0.1.0"

from .errors import TracekitError  # noqa: E402
from .schema import SCHEMA_VERSION  # noqa: E402
from .store import Run, open_run  # noqa: E402

__all__ = ["TracekitError", "SCHEMA_VERSION", "Run", "open_run", "__version__"]
