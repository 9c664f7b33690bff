"""The grouping file as the router uses it: request text -> group label -> DP ranks, checked once at start.

DP rank convention (SGLang with ``--enable-dp-attention`` and dp-size = EP size, as ``export --format sglang``
prints): DP rank r runs on GPU r, which sits on node ``r // gpus_per_node``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TracekitError
from ..jsonlines import check_format, read_json
from ..textclf import TextClassifier

GROUPING_FORMAT = "tracekit-grouping"
GROUPING_VERSION = 1
UNROUTED = "*"  # label of requests with no group (no text, an unknown label, or grouping none): every rank


CLASSIFY_TEXTS = 64  # texts of one batch request that are classified (the rest follow the majority)
CLASSIFY_CHARS = 32768  # characters of one prompt that the classifier reads


@dataclass
class RouteTable:
    """``group_ranks[label]`` lists the DP ranks of the label's nodes; ``classifier`` maps prompt text to a label."""

    kind: str
    nodes: int
    gpus_per_node: int
    dp_size: int
    group_ranks: dict[str, list[int]]
    classifier: TextClassifier | None = None
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def all_ranks(self) -> list[int]:
        return list(range(self.dp_size))

    def ranks_of(self, label: str) -> list[int]:
        return self.group_ranks.get(label) or self.all_ranks

    def label_of(self, texts: list[str]) -> str:
        """Group label of a request with prompt ``texts`` (a batch: the most common label; ties: first seen).

        The cost is bounded whatever the body holds: the first :data:`CLASSIFY_TEXTS` texts of a batch, each cut to
        its first :data:`CLASSIFY_CHARS` characters, are classified (a huge batch must not stall the event loop).
        """
        if self.classifier is None or not texts or self.kind == "none":
            return UNROUTED
        texts = [t[:CLASSIFY_CHARS] for t in texts[:CLASSIFY_TEXTS]]
        labels = self.classifier.predict(texts) if len(texts) > 1 else [self.classifier.predict_one(texts[0])]
        if len(labels) == 1:
            return labels[0]
        return max(dict.fromkeys(labels), key=labels.count)


def load_route_table(path: str | Path) -> RouteTable:
    """Read a grouping file written by ``tracekit export --format grouping``; one-line error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise TracekitError(f"{path}: no such grouping file (write one with tracekit export PLACEMENT --format grouping)")
    d = read_json(path, "write it again with tracekit export PLACEMENT --format grouping")
    check_format(d, str(path), GROUPING_FORMAT, GROUPING_VERSION, "grouping file",
                 "write one with tracekit export PLACEMENT --format grouping")
    try:
        c = d["cluster"]
        nodes, gpn = int(c["nodes"]), int(c["gpus_per_node"])
        dp = int(c.get("dp_size") or nodes * gpn)
        kind = str(d.get("kind", "none"))
        groups = {str(k): [int(n) for n in v] for k, v in (d.get("groups") or {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise TracekitError(f"{path}: malformed grouping file ({type(exc).__name__}: {exc})") from None
    if nodes < 1 or gpn < 1 or dp != nodes * gpn:
        raise TracekitError(f"{path}: cluster {nodes} nodes x {gpn} GPUs does not give dp_size {dp}")
    group_ranks = {}
    for label, ns in groups.items():
        bad = [n for n in ns if not 0 <= n < nodes]
        if bad:
            raise TracekitError(f"{path}: group {label!r} names node(s) {bad} outside 0..{nodes - 1}")
        group_ranks[label] = [r for r in range(dp) if r // gpn in ns]
    clf = TextClassifier.from_dict(d["classifier"], f"{path}: classifier") if d.get("classifier") else None
    if kind != "none" and clf is None:
        raise TracekitError(
            f"{path}: grouping {kind!r} has no prompt classifier; fit the placement again with tracekit place "
            "--grouping (it trains one) and export it again"
        )
    if clf is not None:
        missing = sorted(set(clf.labels) - set(group_ranks))
        if missing and kind != "none":
            raise TracekitError(f"{path}: classifier labels {missing[:5]} have no nodes in the grouping file")
    return RouteTable(kind=kind, nodes=nodes, gpus_per_node=gpn, dp_size=dp, group_ranks=group_ranks,
                      classifier=clf, model=dict(d.get("model") or {}))


def check_dp_size(table: RouteTable, dp_size: int | None) -> None:
    """One-line error when the deployment's ``--dp-size`` differs from the placement's GPU count."""
    if dp_size is not None and int(dp_size) != table.dp_size:
        raise TracekitError(
            f"--dp-size {dp_size} does not match the placement's {table.dp_size} GPUs ({table.nodes} nodes x "
            f"{table.gpus_per_node}); launch SGLang with --dp-size {table.dp_size} or place for this cluster"
        )


def model_names(model: dict[str, Any]) -> set[str]:
    """Names a model answers to: its registry name and hub id (lower case, no trailing slash)."""
    return {v.strip().rstrip("/").lower() for v in (model or {}).values() if isinstance(v, str) and v.strip()}


def check_model(table: RouteTable, served: str | None) -> None:
    """One-line error when the upstream serves a model other than the one the grouping was fitted for.

    ``served``: ``--model`` or the upstream's ``model_path``; nothing to check when either side is unknown.
    """
    if not served or not table.model:
        return
    names = model_names(table.model)
    if not names:
        return
    s = served.strip().rstrip("/").lower()
    if s in names:
        return
    local = s.startswith(("/", ".", "~"))  # a local checkout: its folder name against the hub id's model name
    if local and s.rsplit("/", 1)[-1] in {n.rsplit("/", 1)[-1] for n in names}:
        return
    raise TracekitError(
        f"the grouping file was fitted for model {table.model.get('hub_id') or table.model.get('name')!r}, "
        f"but the upstream serves {served!r}; export the grouping of a placement fitted on this model's traces"
    )
