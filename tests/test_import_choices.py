"""Issue 19.6: what no router emits is refused at import (one shared check for every importer), and a JSON Lines
line longer than the limit is refused without being read whole."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _cli import cli

E, K = 8, 2


def _records(experts_of, weights_of=None, n_tok=3, layers=(0, 1)):
    out = []
    for t in range(n_tok):
        for layer in layers:
            rec = {"dataset": "gsm8k", "problem_id": 0, "layer": layer, "token_idx": t, "experts": experts_of(t, layer)}
            rec["gating_probs"] = weights_of(t, layer) if weights_of else [0.7, 0.3]
            out.append(rec)
    return out


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _assert_clean_refusal(code, err, out: Path, needle: str):
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and needle in err, err
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


BAD = {
    "duplicate": (lambda t, l: [7, 7] if (t, l) == (2, 1) else [1, 7], None, "chosen twice"),
    "negative": (lambda t, l: [1, 7], lambda t, l: [0.9, -0.1] if t == 1 else [0.7, 0.3], "negative"),
    "sum_12": (lambda t, l: [1, 7], lambda t, l: [6.0, 6.0] if t == 0 else [0.7, 0.3], "sum to 12"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_jsonl_refuses_what_no_router_emits(tmp_path, capsys, case):
    experts, weights, needle = BAD[case]
    f = _write(tmp_path / "r.jsonl", _records(experts, weights))
    out = tmp_path / "run"
    # mixtral-8x7b: a softmax top-k, whose weights sum to at most 1
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "mixtral-8x7b", "--out", str(out), "--phase",
                       "prefill")
    _assert_clean_refusal(code, err, out, needle)
    assert "position" in err and "layer" in err


def test_weight_sums_are_allowed_up_to_the_models_scale(tmp_path, capsys):
    """DeepSeek V3 scales its routed weights by 2.5: a sum of 2.4 is what it emits; 3.0 is not."""
    from tracekit.importers.choices import weight_scale

    assert weight_scale("deepseek-v3", {}) == 2.5 and weight_scale("x", {"routed_scaling_factor": 16.0}) == 16.0
    assert weight_scale("x", {"scoring": "softmax"}) == 1.0 and weight_scale("x", {}) is None
    import pyarrow as pa

    from tracekit.errors import TracekitError
    from tracekit.importers.choices import check_choices

    ex = pa.chunked_array([pa.array([[1, 2], [3, 4]], pa.list_(pa.uint8()))])
    ok = pa.chunked_array([pa.array([[1.6, 0.8], [0.5, 0.5]], pa.list_(pa.float32()))])
    check_choices(ex, ok, describe=str, scale=2.5)
    with pytest.raises(TracekitError, match="row 1|^1: gate weights sum to 3"):
        check_choices(ex, pa.chunked_array([pa.array([[1.6, 0.8], [2.0, 1.0]], pa.list_(pa.float32()))]),
                      describe=str, scale=2.5)
    heard: list[str] = []
    check_choices(ex, pa.chunked_array([pa.array([[6.0, 6.0], [0.5, 0.5]], pa.list_(pa.float32()))]),
                  describe=str, scale=None, warn=heard.append)
    assert len(heard) == 1 and "sum to 12" in heard[0]


def test_unknown_scale_warns_once_and_keeps(tmp_path, capsys):
    f = _write(tmp_path / "r.jsonl", _records(lambda t, l: [1, 2], lambda t, l: [6.0, 6.0]))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "my-moe", "--out", str(out), "--phase", "prefill",
                       "--num-experts", str(E))
    assert code == 0, err
    assert err.count("warning:") == 1 and "sum to 12" in err
    assert any("sum to 12" in n for n in json.loads((out / "manifest.json").read_text())["notes"])


def test_routed_experts_duplicate_ids_refused(tmp_path, capsys):
    """The engines' importers go through the same check (SGLang routed-experts responses here)."""
    arr = np.tile(np.array([3, 5], np.int32), (4 + 3 - 1, 4, 1))
    arr[2, 1] = [6, 6]
    resp = {"text": "xxx", "output_ids": [1, 2, 3],
            "meta_info": {"id": "a", "prompt_tokens": 4, "completion_tokens": 3, "cached_tokens": 0,
                          "finish_reason": {"type": "length", "length": 3},
                          "routed_experts": base64.b64encode(arr.tobytes()).decode()}}
    f = tmp_path / "resp.jsonl"
    f.write_text(json.dumps(resp) + "\n")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), "--num-experts", "16",
                       "--top-k", "2", "--moe-layers", "1-3", "--num-layers", "4")
    _assert_clean_refusal(code, err, out, "expert 6 is chosen twice")


def test_a_long_line_is_refused_without_reading_it_whole(tmp_path):
    """A newline-free 200 MB line under a 1 MB limit: one line naming file:line, and the importer's peak memory
    stays far below the line (it was read whole before: 4.4 GB RSS for a 2 GB line)."""
    f = tmp_path / "big.jsonl"
    good = json.dumps(_records(lambda t, l: [1, 2])[0]) + "\n"
    with open(f, "wb") as fh:
        fh.write(good.encode())
        block = b"x" * (1 << 20)
        fh.write(b'{"a": "')
        for _ in range(200):
            fh.write(block)
    out = tmp_path / "run"
    # VmHWM: this process's own peak (ru_maxrss would count the forking pytest parent's pages)
    code = ("import re, sys\nfrom tracekit.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print('MAXRSS', hwm, file=sys.stderr)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, "import", "jsonl", str(f), "--model", "m", "--out", str(out),
                        "--num-experts", "8", "--max-line-bytes", "1MB"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("MAXRSS")]
    assert r.returncode == 2 and len(lines) == 1 and f"{f}:2: line longer than 1,000,000 bytes" in lines[0], r.stderr
    rss_mb = int(r.stderr.split("MAXRSS")[1].split()[0]) / 1024
    assert rss_mb < 150, rss_mb  # the interpreter and its imports; the 200 MB line never is
    assert not out.exists()


def test_the_line_limit_can_be_raised(tmp_path, capsys):
    f = _write(tmp_path / "r.jsonl", _records(lambda t, l: [1, 2]))
    out = tmp_path / "run"
    longest = max(len(x) for x in f.read_bytes().splitlines())
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "m", "--out", str(out), "--num-experts", "8",
                       "--max-line-bytes", str(longest - 1))
    _assert_clean_refusal(code, err, out, "--max-line-bytes")
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "m", "--out", str(out), "--num-experts", "8",
                       "--max-line-bytes", str(longest))
    assert code == 0, err
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "m", "--out", str(tmp_path / "r2"),
                       "--max-line-bytes", "lots")
    assert code == 2 and "--max-line-bytes 'lots' is not a size" in err
