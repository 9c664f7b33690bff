"""The README's commands and Python example run as written (they are what a new user tries first)."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from tracekit.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_first_command_runs_the_embedded_default(tmp_path, monkeypatch, capsys):
    first = README.split("```bash", 1)[1].split("```", 1)[0]
    line = next(ln for ln in first.splitlines() if "tracekit collect" in ln)
    args = shlex.split(line.split("tracekit collect", 1)[1])
    assert "--model" not in args and "--dataset" not in args  # the embedded default: tiny preset + bundled prompts
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["collect", "--no-progress", *args])
        raise SystemExit(0)
    assert exc.value.code == 0
    out = tmp_path / args[args.index("--out") + 1]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["name"] == "tiny-deepseek-v3" and m["dataset"]["name"] == "humaneval"
    assert "python -m pytest" in first  # the second command is the one .ci/run runs
    assert "python -m pytest" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    code = README.split("## From Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    doc = json.loads((tmp_path / "expert_location.json").read_text())
    assert len(doc["physical_to_logical_map"]) == 4 and len(doc["physical_to_logical_map"][0]) == 136
    assert os.path.isdir(tmp_path / "runs" / "q" / "routes")


def test_families_table_is_what_tracekit_prints():
    """The README's families table is the output of `tracekit models --families` for the installed transformers."""
    from tracekit.hooks.families import families_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert families_markdown() in readme, "README families table is stale: paste `tracekit models --families`"
