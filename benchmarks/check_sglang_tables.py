"""Compare tracekit's SGLang dispatch tables with SGLang's own server code, entry for entry.

Runs SGLang's ``python/sglang/srt/eplb/expert_location.py`` itself (not a copy): the server's entry point
``compute_initial_expert_location_metadata(model_config, moe_ep_rank)`` with ``--init-expert-location`` set to the
JSON ``tracekit export --format sglang`` writes, once per EP rank, exactly as each rank's ModelRunner calls it.
SGLang's full package needs CUDA and many dependencies, so only that one file is loaded, with small stand-ins for
what it imports (the server-args accessors ``get_exec``/``get_parallel``/``get_device``/``get_resources``, elastic
EP off, and the model-class lookup that gives the number of hidden layers and logical experts). Nothing here is
needed by the tests.

Where SGLang's source comes from: ``--sglang-root DIR`` (the folder holding ``sglang/``, e.g. an unzipped wheel:
``pip download sglang==0.5.23 --no-deps -d /tmp/sgl && unzip /tmp/sgl/sglang-*.whl 'sglang/*' -d /tmp/sgl/x``),
else the installed ``sglang`` package if there is one. Without either it says so and exits 0.

    .venv/bin/python benchmarks/check_sglang_tables.py --sglang-root /tmp/sgl/x

Maps: random placements (every expert once, R random extra copies, shuffled), eplb and locality placements fitted by
tracekit on planted traces, placed among dense hidden layers (SGLang's trivial rows) as the export writes them;
geometries nodes 1-4 x GPUs per node 2-8, R = 0..32.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np


def load_sglang_expert_location(root: str | None):
    """SGLang's expert_location module, loaded from its own file with stand-ins for its imports; plus its path."""
    if root:
        path = Path(root) / "sglang" / "srt" / "eplb" / "expert_location.py"
    else:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            return None, None
        path = Path(list(spec.submodule_search_locations)[0]) / "srt" / "eplb" / "expert_location.py"
    if not path.is_file():
        return None, path
    import torch  # noqa: F401  (SGLang's module needs it; CPU torch is enough)

    state = types.SimpleNamespace(
        moe=types.SimpleNamespace(ep_join_mode=None, moe_a2a_backend="deepep", ep_dispatch_algorithm="static",
                                  init_expert_location="trivial", ep_num_redundant_experts=0,
                                  eplb_algorithm="auto"),
        parallel=types.SimpleNamespace(ep_size=1, nnodes=1, tp_size=1, elastic_ep_initial_size=None,
                                       ep_join_rank_offset=0),
        device=types.SimpleNamespace(device="cpu"),
        resources=types.SimpleNamespace(expert_location_metadata=None),
    )
    stubs = {
        "sglang": {}, "sglang.srt": {}, "sglang.srt.elastic_ep": {},
        "sglang.srt.runtime_context": {"get_exec": lambda: state, "get_parallel": lambda: state.parallel,
                                       "get_device": lambda: state.device, "get_resources": lambda: state.resources},
        "sglang.srt.elastic_ep.elastic_ep": {"elastic_expanded_world_enabled": lambda: False},
    }
    for name, attrs in stubs.items():
        mod = sys.modules.get(name) or types.ModuleType(name)
        if name in ("sglang", "sglang.srt", "sglang.srt.elastic_ep"):
            mod.__path__ = []
        for k, v in attrs.items():
            setattr(mod, k, v)
        sys.modules[name] = mod
    spec = importlib.util.spec_from_file_location("sglang.srt.eplb.expert_location", path)
    el = importlib.util.module_from_spec(spec)
    sys.modules["sglang.srt.eplb.expert_location"] = el
    spec.loader.exec_module(el)
    el._tracekit_state = state
    return el, path


def sglang_server_tables(el, phys_to_logical: np.ndarray, *, num_experts: int, nodes: int, gpus_per_node: int,
                         redundant: int, a2a_backend: str = "deepep") -> np.ndarray:
    """(L, G, E): row [:, g] = ``logical_to_rank_dispatch_physical_map`` of the metadata rank g's server builds."""
    L, S = phys_to_logical.shape
    G = nodes * gpus_per_node
    st = el._tracekit_state
    st.parallel.ep_size = st.parallel.tp_size = G
    st.parallel.nnodes = nodes
    st.moe.moe_a2a_backend = a2a_backend
    st.moe.ep_num_redundant_experts = redundant
    st.moe.init_expert_location = json.dumps({"physical_to_logical_map": phys_to_logical.astype(int).tolist()})
    cfg = el.ModelConfigForExpertLocation(num_layers=L, num_logical_experts=num_experts)
    el.ModelConfigForExpertLocation.from_model_config = staticmethod(lambda model_config: cfg)
    out = np.empty((L, G, num_experts), dtype=np.int64)
    for g in range(G):
        meta = el.compute_initial_expert_location_metadata(model_config=None, moe_ep_rank=g)
        out[:, g] = meta.logical_to_rank_dispatch_physical_map.numpy()
    return out


def random_rows(rng, E: int, R: int, n: int) -> np.ndarray:
    return np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, R)])) for _ in range(n)])


def fitted_rows(E: int, nodes: int, gpn: int, R: int, layers: int, seed: int) -> dict[str, np.ndarray]:
    """eplb and locality rows (layers, E + R) tracekit fits on planted traces (tests/_placement_synth.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests._placement_synth import planted_traces
    from tracekit.errors import TracekitError
    from tracekit.placement import strategies as strat
    from tracekit.placement.data.types import Cluster

    traces, _ = planted_traces(num_experts=E, top_k=2, layers=layers, clusters=4, requests=40, seed=seed)
    cluster = Cluster(nodes, gpn, E, R)
    out = {}
    for name, opts in (("eplb", {}), ("locality", {"engine": "sglang", "max_imbalance": 10.0})):
        try:
            out[name] = np.asarray(strat.fit(name, traces, cluster, **opts).slot_expert)
        except TracekitError as exc:  # a geometry the strategy refuses: skip it, say so
            print(f"  {name} {nodes}x{gpn} E={E} R={R}: {exc}")
    return out


def compare(el, rows: np.ndarray, *, E: int, nodes: int, gpn: int, R: int, moe: np.ndarray, hidden: int):
    """(entries, tracekit vs server differences, function-level vs server differences) for one map."""
    from tracekit.placement.scoring import dispatch as D

    G = nodes * gpn
    full = np.tile(np.arange(E + R) % E, (hidden, 1))
    full[moe] = rows
    want = sglang_server_tables(el, full, num_experts=E, nodes=nodes, gpus_per_node=gpn, redundant=R)[moe]
    got = D.dispatch_table(rows, engine="sglang", gpus_per_node=gpn, num_gpus=G, num_experts=E,
                           layers=moe, num_hidden_layers=hidden)
    # control: SGLang's own tables without the per-rank narrowing (--moe-a2a-backend none skips it), i.e.
    # compute_logical_to_rank_dispatch_physical_map on the full replica lists, tracekit's model before issue 18
    func = sglang_server_tables(el, full, num_experts=E, nodes=nodes, gpus_per_node=gpn, redundant=R,
                                a2a_backend="none")[moe]
    return want.size, int((want != got).sum()), int((want != func).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sglang-root", default=None, help="folder holding sglang/ (an unzipped SGLang wheel)")
    ap.add_argument("--trials", type=int, default=2, help="random maps per geometry and R")
    ap.add_argument("--no-fitted", dest="fitted", action="store_false", help="random maps only")
    args = ap.parse_args()
    el, path = load_sglang_expert_location(args.sglang_root)
    if el is None:
        print(f"SGLang's expert_location.py not found ({path or 'no sglang package installed'}); pass --sglang-root")
        return 0
    print(f"SGLang source: {path}")
    print("checked: compute_initial_expert_location_metadata(model_config, moe_ep_rank=g) per rank g, "
          "--init-expert-location = the JSON physical_to_logical_map, --moe-a2a-backend deepep, "
          "--ep-dispatch-algorithm static, against tracekit.placement.scoring.dispatch.dispatch_table(engine='sglang')")
    rng = np.random.default_rng(0)
    moe, hidden = np.array([1, 2, 4, 5]), 6  # dense hidden layers 0 and 3 between the MoE layers
    tally = {}
    t0 = time.perf_counter()
    for nodes in (1, 2, 3, 4):
        for gpn in (2, 4, 8):
            G = nodes * gpn
            for E in (8, 16, 64):
                for R in sorted({0, G, 2 * G, 32}):
                    if (E + R) % G or R > 32:
                        continue
                    maps = [("random", random_rows(rng, E, R, moe.size)) for _ in range(args.trials)]
                    if args.fitted and E >= 16 and R:
                        maps += list(fitted_rows(E, nodes, gpn, R, moe.size, seed=int(rng.integers(1 << 30))).items())
                    for kind, rows in maps:
                        n, d, f = compare(el, rows, E=E, nodes=nodes, gpn=gpn, R=R, moe=moe, hidden=hidden)
                        t = tally.setdefault(kind, [0, 0, 0, 0])
                        t[0] += 1
                        t[1] += n
                        t[2] += d
                        t[3] += f
    diff = 0
    for kind, (maps_n, n, d, f) in tally.items():
        diff += d
        print(f"{kind:9s} {maps_n:4d} maps {n:8d} entries: tracekit differs in {d}; "
              f"the function-level model (no narrowing) would differ in {f}")
    print(f"{time.perf_counter() - t0:.1f} s")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
