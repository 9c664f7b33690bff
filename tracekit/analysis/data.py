"""Geometry of the traces (MoE layers, experts, top-k) from the manifests or the rows."""
from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from ..errors import TracekitError
from ..query import sql_file

PHASES = ("prefill", "decode")
GROUP_KEYS = ("domain", "phase", "dataset")


@dataclass
class Geometry:
    layers: np.ndarray  # (L,) absolute indices of the MoE layers present
    num_experts: int
    top_k: int


def geometry(con: duckdb.DuckDBPyConnection) -> Geometry:
    """MoE layers, E and k of the traces: from the manifests when they agree, else from the rows."""
    g = sql_file(con, "manifest_geometry").to_pylist()
    if not g:
        raise TracekitError("no routes run given: analyses need per-token routes (kind 'routes')")
    layers = sorted({int(x) for r in g for x in (r["moe_layers"] or [])})
    es = {r["num_experts"] for r in g}
    ks = {r["top_k"] for r in g}
    if not layers or None in es or None in ks:
        b = sql_file(con, "geometry_bounds").to_pylist()[0]
        if b["num_layers"] is None:
            raise TracekitError("the runs hold no routes rows yet")
        layers = [int(x) for x in sql_file(con, "layers_present")["layer"].to_pylist()]
        return Geometry(np.asarray(layers), int(b["num_experts"]), int(b["top_k"]))
    if len(ks) > 1:
        raise TracekitError(f"runs with different top-k ({sorted(ks)}) cannot be analysed together; analyse them separately")
    return Geometry(np.asarray(layers), int(max(es)), int(ks.pop()))
