"""The examples people start from run as shipped (short settings), so they cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args, cwd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_quickstart_runs_the_whole_loop(tmp_path):
    out = tmp_path / "out"
    r = _run([str(EXAMPLES / "quickstart.py"), "--quick", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for domain in ("code", "math", "chat"):
        m = json.loads((out / "runs" / domain / "manifest.json").read_text())
        assert m["status"] == "complete" and m["dataset"]["domain"] == domain
    assert "prefill-decode correlation" in r.stdout and "predict a request's domain" in r.stdout
    assert "<img" in (out / "report.html").read_text()
    loc = json.loads((out / "expert_location.json").read_text())
    assert len(loc["physical_to_logical_map"][0]) == 8 * ((256 + 8) // 8)
    assert (out / "moe_load_balancer.yaml").read_text().strip()


NOTEBOOK_MAX_BYTES = 250_000  # stored with its figures (PNG at 72 dpi), still a small file to review


def _images(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def test_notebook_is_stored_with_small_outputs_a_reader_sees():
    nbformat = pytest.importorskip("nbformat")
    path = EXAMPLES / "analysis.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "store the notebook executed (its outputs show on GitHub)"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) - 1  # only the imports cell prints nothing
    assert len(_images(nb)) >= 3  # the three findings, each plotted next to its baseline
    assert path.stat().st_size < NOTEBOOK_MAX_BYTES
    text = json.dumps([c.get("outputs") for c in code])
    assert not any(p in text for p in ("/tmp/", "/work/", "/home/", "/root/"))  # no machine's paths
    assert not any(o.get("name") == "stderr" for c in code for o in c.outputs)


def test_notebook_writes_its_runs_where_git_ignores_them(tmp_path):
    """The first cell's default output folder, with the kernel started in examples/ as Jupyter does."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(EXAMPLES / "analysis.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    probe = nbformat.v4.new_notebook(cells=[first, nbformat.v4.new_code_cell("print(OUT.resolve())")])
    saved = os.environ.pop("TRACEKIT_EXAMPLE_OUT", None)
    try:
        nbclient.NotebookClient(probe, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    finally:
        if saved is not None:
            os.environ["TRACEKIT_EXAMPLE_OUT"] = saved
    out = Path(probe.cells[1].outputs[0]["text"].strip())
    repo = EXAMPLES.parent
    assert out.is_relative_to(repo) and not out.is_relative_to(EXAMPLES)
    if (repo / ".git").exists():
        r = subprocess.run(["git", "check-ignore", "-q", str(out / "runs" / "code" / "manifest.json")], cwd=repo)
        assert r.returncode == 0, f"{out} is not git-ignored"


def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(EXAMPLES / "analysis.ipynb", as_version=4)
    # after the last cell: finding 3's histogram has one series per legend entry (a (requests, layers) array
    # given to hist drew one series per layer under a 2-entry legend)
    nb.cells.append(nbformat.v4.new_code_cell(
        "print(len(hist_ax.containers), len(hist_ax.get_legend().get_texts()), "
        "sum(p.get_height() for p in hist_ax.containers[0]))"))
    os.environ.update(TRACEKIT_EXAMPLE_QUICK="1", TRACEKIT_EXAMPLE_OUT=str(tmp_path / "nb"))
    saved_backend = os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(EXAMPLES)}})
        client.execute()
    finally:
        for k in ("TRACEKIT_EXAMPLE_QUICK", "TRACEKIT_EXAMPLE_OUT"):
            os.environ.pop(k, None)
        if saved_backend is not None:
            os.environ["MPLBACKEND"] = saved_backend
    assert len(_images(nb)) >= 3  # the three findings, each plotted next to its baseline
    assert (tmp_path / "nb" / "runs" / "chat" / "manifest.json").exists()
    series, entries, pairs = nb.cells[-1].outputs[0]["text"].split()
    assert int(series) == int(entries) == 2
    from tracekit.analysis import analyze

    corr = analyze(sorted((tmp_path / "nb" / "runs").iterdir()), what="correlation")["correlation"]
    real = corr.arrays["real_spearman"]
    assert float(pairs) == np.isfinite(real).sum() and real.ndim == 2 and real.shape[1] > 1  # every (request, layer)


def test_real_traces_example(tmp_path, shared_data):
    r = _run([str(EXAMPLES / "real_traces.py"), str(tmp_path / "rt")], cwd=tmp_path,
             env={"TRACEKIT_SHARED_DATA": str(shared_data)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "predict a request's domain" in r.stdout and "eplb" in r.stdout and "pick" in r.stdout.lower()


def test_real_traces_example_skips_in_one_line_without_the_data(tmp_path):
    r = _run([str(EXAMPLES / "real_traces.py"), str(tmp_path / "rt")], cwd=tmp_path,
             env={"TRACEKIT_SHARED_DATA": str(tmp_path / "none")})
    assert r.returncode == 0 and r.stdout.startswith("skipped:") and len(r.stdout.splitlines()) == 1
    assert not (tmp_path / "rt").exists()


def _tracekit_commands(markdown: str) -> list[list[str]]:
    """Every `tracekit ...` command in the markdown's bash blocks (continuation lines joined, comments dropped)."""
    import shlex

    cmds = []
    for block in markdown.split("```bash")[1:]:
        text = block.split("```", 1)[0].replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("tracekit "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_deploy_walkthrough_commands_parse():
    """The deployment walk-through's tracekit commands name real commands and options with valid values."""
    from typer.main import get_command

    from tracekit.cli import app

    cmds = _tracekit_commands((EXAMPLES / "deploy_sglang.md").read_text())
    assert {c[0] for c in cmds} >= {"collect", "place", "export", "route"}
    for argv in cmds:
        cmd, args, name = get_command(app), list(argv), "tracekit"
        while hasattr(cmd, "commands"):
            name = args[0]
            cmd = cmd.commands[args.pop(0)]
        cmd.make_context(name, args)  # parses and checks every option (raises on an unknown one or a bad value)
