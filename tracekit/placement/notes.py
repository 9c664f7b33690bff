"""One-line notes ``tracekit place`` prints where what runs differs from what was asked.

- :func:`candidates`: the strategies ``--strategy all`` fits and picks among, and one line per strategy it leaves
  out and why: round-robin when the cluster has redundant slots (it has none, and no engine runs it with R > 0),
  locality under ``--engine vllm`` (released vLLM loads no static expert map, so only the layouts vLLM itself
  builds are candidates: :func:`tracekit.placement.export.vllm_deployable`).
- :func:`grouping_line`: the request grouping asked for (``--grouping``) vanishes when the pick carries none (the
  pick is a baseline, or the rule kept no group): ``export --format grouping`` would write rule ``none`` and
  ``tracekit route`` would start with 0 groups.
"""
from __future__ import annotations

from .data.types import Cluster, Placement


def vllm_line(cluster: Cluster, n_group: int | None) -> str:
    """What released vLLM can deploy, in one line (at most 120 characters)."""
    from .export import vllm_deployable

    can = vllm_deployable(cluster, n_group)
    return (f"vllm loads no static expert map: it deploys {', '.join(can)} only (eplb = its own --enable-eplb); "
            "the pick is among those")


def candidates(names: list[str], strategy: str, cluster: Cluster, engine: str,
               n_group: int | None = None) -> tuple[list[str], list[str]]:
    """(the strategies to fit and pick among, the lines to print) for ``names`` resolved from ``strategy``."""
    lines = []
    if strategy == "all" and cluster.redundant:
        lines.append(f"round-robin left out of --strategy all: it has no redundant slots and R={cluster.redundant} "
                     "(no engine runs it with R > 0)")
    if engine == "vllm":
        from .export import vllm_deployable

        can = vllm_deployable(cluster, n_group)
        lines.append(vllm_line(cluster, n_group))
        if strategy == "all":
            names = [n for n in names if n in can]
        elif strategy not in can:
            lines.append(f"vllm cannot load a {strategy} layout: it is scored for reference only")
    return names, lines


def grouping_line(asked: str, picked: Placement) -> str | None:
    """One line when ``--grouping asked`` (not none) vanished from the placement saved as the pick."""
    if asked == "none":
        return None
    from .export import grouping_vanished

    return grouping_vanished(picked, asked)
