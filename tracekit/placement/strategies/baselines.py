"""The placements engines use by default (no traces needed).

Both return slot_expert (M, S) under the slot convention of :mod:`tracekit.placement.data.types` (slot p on GPU
``p // slots_per_gpu``), the same row for every layer.

- :func:`linear` — contiguous blocks, the default of SGLang, TensorRT-LLM and vLLM (``linear``): slot p holds
  expert ``p % E``. With R redundant slots this is SGLang's trivial map (``ExpertLocationMetadata.init_trivial``:
  ``arange(num_physical) % num_logical``) and vLLM's initial EPLB map: the redundant slots, which sit on the last
  GPUs, hold copies of experts 0..R-1.
- :func:`round_robin` — vLLM's ``--expert-placement-strategy round_robin``: expert e on GPU ``e % G`` at local
  position ``e // G``. vLLM uses it only without redundant experts (with EPLB's redundant slots it falls back to
  linear), so R > 0 is refused with one line instead of inventing a layout no engine runs.
"""
from __future__ import annotations

import numpy as np

from ...errors import TracekitError
from ..data.types import Cluster


def linear_row(cluster: Cluster) -> np.ndarray:
    """(S,) slot -> expert for contiguous blocks."""
    return np.arange(cluster.num_slots) % cluster.num_experts


def round_robin_row(cluster: Cluster, strict: bool = True) -> np.ndarray:
    """(S,) slot -> expert for the strided (round-robin) layout.

    With redundant slots, ``strict`` refuses (no engine runs it); ``strict=False`` (for closeness measures only)
    puts experts 0..R-1's copies on the GPU after their original's, never on the same one when E divides by G.
    """
    if cluster.redundant and strict:
        raise TracekitError(
            f"round-robin has no redundant slots (vLLM falls back to linear when --redundant > 0); "
            f"use --redundant 0 for round-robin, or linear/eplb/locality with --redundant {cluster.redundant}"
        )
    G, spg, E = cluster.num_gpus, cluster.slots_per_gpu, cluster.num_experts
    i = np.arange(cluster.num_slots)
    row = np.empty(cluster.num_slots, dtype=np.int64)
    dest = np.where(i < E, i % G, (i + 1) % G)  # copy of expert j (item E + j) one GPU after j's
    if np.bincount(dest, minlength=G).max() > spg:  # E not a multiple of G: plain dealing
        dest = i % G
    local = np.zeros(G, dtype=np.int64)
    for item, g in enumerate(dest):
        row[g * spg + local[g]] = item % E
        local[g] += 1
    return row


def linear(cluster: Cluster, num_layers: int) -> np.ndarray:
    """(M, S) contiguous-block placement."""
    return np.tile(linear_row(cluster), (num_layers, 1))


def round_robin(cluster: Cluster, num_layers: int) -> np.ndarray:
    """(M, S) round-robin placement."""
    return np.tile(round_robin_row(cluster), (num_layers, 1))
