"""The three findings (imbalance, domain specificity, prefill-decode correlation) and co-activation, as pure
numpy functions over arrays that the SQL in ``tracekit/sql`` returns; :func:`analyze` runs them over runs."""
from .result import AnalysisResult  # noqa: F401
from .run import ANALYSES, analyze  # noqa: F401
