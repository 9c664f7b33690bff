"""`tracekit place` takes globs and folders of runs as query/analyze/report do, and says what it is doing."""
from __future__ import annotations

import contextlib
import json

import pytest

import tracekit.progress as progress
from tracekit.synth import generate_run

from _cli import cli

ARGS = ["--nodes", "1", "--gpus-per-node", "2", "--redundant", "0", "--hidden-size", "64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("place") / "runs"
    for i, name in enumerate(("b", "a")):
        generate_run(root / name, num_experts=8, top_k=2, moe_layers=[0, 1], requests=12, prompt_tokens=6,
                     decode_tokens=4, seed=i)
    return root


def _place(capsys, tmp_path, name, *runs):
    js = tmp_path / f"{name}.json"
    code, out, err = cli(capsys, "place", *map(str, runs), *ARGS, "--json", str(js))
    assert code == 0, err
    return json.loads(js.read_text())


def test_place_accepts_a_glob_and_a_folder_of_runs(runs, tmp_path, capsys):
    named = _place(capsys, tmp_path, "named", runs / "a", runs / "b")
    assert _place(capsys, tmp_path, "glob", runs / "*") == named
    assert _place(capsys, tmp_path, "folder", runs) == named
    code, _, err = cli(capsys, "place", str(runs / "zz*"), *ARGS)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no tracekit run directory found" in err


def test_place_says_each_stage_on_the_progress_line(runs, tmp_path, capsys, monkeypatch):
    said = []

    class Recording(progress.Bar):
        def describe(self, text):
            said.append(text)

    @contextlib.contextmanager
    def task(description, total=None, unit=""):
        said.append(description)
        bar = Recording()
        progress._push(bar)
        try:
            yield bar
        finally:
            progress._local.stack.pop()

    monkeypatch.setattr(progress, "task", task)
    _place(capsys, tmp_path, "p", runs / "*")
    assert said[0] == "place: reading 2 runs"
    assert any(s.startswith("place: validating") for s in said)
    assert any("scoring them on the held-out requests" in s for s in said)
    assert said[-1] == "place: fitting the grouping classifiers"
