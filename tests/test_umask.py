"""Files and folders tracekit writes get the process umask, like any Unix tool (not 0600 from mkstemp)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tracekit.importers.jsonl import import_jsonl
from tracekit.placement.export import save_placement
from tracekit.atomic import atomic_write_bytes, atomic_write_json
from tracekit.synth import generate_run


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_everything_written_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    generate_run(tmp_path / "synth", num_experts=8, top_k=2, moe_layers=[0, 1], requests=4, prompt_tokens=4,
                 decode_tokens=2, rows_per_chunk=20)
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps({"problem_id": 0, "layer": layer, "experts": [1, 0], "gating_probs": [0.5, 0.5],
                                       "token_idx": t}) for t in range(3) for layer in range(2)) + "\n")
    import_jsonl([f], model="m", out=tmp_path / "imported")
    atomic_write_bytes(tmp_path / "out" / "report.html", b"<html></html>")
    atomic_write_json(tmp_path / "out" / "result.json", {"a": 1})
    from tracekit.placement.data.traces import load_traces
    from tracekit.placement import strategies
    from tracekit.placement.data.types import make_cluster

    traces = load_traces([tmp_path / "synth"])
    placement = strategies.fit("linear", traces, make_cluster(traces, nodes=1, gpus_per_node=2, redundant=0))
    save_placement(placement, tmp_path / "out" / "placement.json")

    modes = _modes(tmp_path)
    written = {k: v for k, v in modes.items() if k != "in.jsonl"}
    assert any(k.endswith(".parquet") for k in written) and "imported/manifest.json" in written
    assert "out/placement.json" in written and "out/report.html" in written
    for name, mode in written.items():
        is_dir = (tmp_path / name).is_dir()
        want = (0o777 if is_dir else 0o666) & ~mask
        assert mode == want, f"{name}: {oct(mode)} != {oct(want)} under umask {oct(mask)}"
    assert not [k for k in modes if k.endswith(".tmp") or k.endswith(".lock")]
