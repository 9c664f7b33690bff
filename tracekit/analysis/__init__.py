"""The three findings (imbalance, domain specificity, prefill-decode correlation) and co-activation.

:func:`analyze` reads the runs once, in slices of whole requests (:mod:`.stream`, :mod:`.scan`), as per-(request,
layer) sparse expert histograms; accumulators fold each slice into what their statistic needs (compiled loops in
:mod:`.kernels`), and the pure numpy functions of each module turn the totals into tables."""
from .result import AnalysisResult  # noqa: F401
from .run import ANALYSES, analyze  # noqa: F401
