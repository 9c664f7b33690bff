"""The examples people start from run as shipped (short settings), so they cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(EXAMPLES / "analysis.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    os.environ.update(TRACEKIT_EXAMPLE_QUICK="1", TRACEKIT_EXAMPLE_OUT=str(tmp_path / "nb"))
    saved_backend = os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    finally:
        for k in ("TRACEKIT_EXAMPLE_QUICK", "TRACEKIT_EXAMPLE_OUT"):
            os.environ.pop(k, None)
        if saved_backend is not None:
            os.environ["MPLBACKEND"] = saved_backend
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the three findings, each plotted next to its baseline
    assert (tmp_path / "nb" / "runs" / "chat" / "manifest.json").exists()


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
