"""Hostile input for every command: each case must end in exactly one ``error:`` line on stderr and exit 2 (an
interrupt: one ``interrupted:`` line and exit 130), print no traceback, and leave every file and folder under the
test's world unchanged (an existing run directory, a placement, output files that a careless option could overwrite).

The cases are a table: add a row to CASES. A row is ``Case(id, argv, expect=..., stdin=..., xfail=...)`` where
``argv`` is one shell-like string with ``$NAME`` placeholders for the paths of the world (see ``world``), and
``expect`` a substring of the error line. A case that fails because of code another branch is fixing carries
``xfail="<branch>: <why>"`` (non-strict) until that branch lands.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest

from tracekit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    argv: str
    expect: str | None = None
    stdin: str | None = None
    xfail: str | None = None
    code: int = 2
    interrupt: str | None = None  # "module:function" made to raise KeyboardInterrupt when called


# ----------------------------------------------------------------------------------------------- the world


def _collect_tiny_run(out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tracekit", "collect", "--limit", "2", "--max-new-tokens", "2",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr


def _placement(run: Path, out: Path) -> None:
    try:
        main(["place", str(run), "--nodes", "1", "--gpus-per-node", "2", "--redundant", "0", "--strategy", "linear",
              "-o", str(out)])
    except SystemExit as exc:
        assert not exc.code, exc.code


def _edited_run(run: Path, dest: Path, edit) -> Path:
    shutil.copytree(run, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m = edit(m)
    (dest / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    return dest


def _edited_placement(src: dict, dest: Path, edit) -> Path:
    d = json.loads(json.dumps(src))
    d = edit(d)
    dest.write_text(d if isinstance(d, str) else json.dumps(d))
    return dest


def _set(d: dict, path: str, value):
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = value
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """One folder holding a real tiny run, a placement fitted on it, ordinary files and folders, and hostile
    variants of the run's manifest and of the placement. Returns the placeholder -> path map."""
    b = tmp_path_factory.mktemp("hostile")
    run = b / "run"
    _collect_tiny_run(run)
    pl = b / "placement.json"
    _placement(run, pl)
    (b / "placement.sglang.json").write_text("{}\n")  # export's default output for --format sglang: exists
    (b / "afile.txt").write_text("not a folder\n")
    (b / "existing.csv").write_text("a\n1\n")
    (b / "adir").mkdir()
    (b / "adir" / "keep.txt").write_text("keep\n")
    (b / "empty").mkdir()
    (b / "bad.jsonl").write_text('{"experts": [1, 2]}\n{"experts": [1, \n')
    (b / "empty.jsonl").write_text("")
    (b / "listfield.jsonl").write_text(json.dumps({"experts": [1, 2], "gating_probs": [0.5, 0.5], "problem_id": [1, 2],
                                                   "layer": 0, "token_idx": 0}) + "\n")
    (b / "garbage.pt").write_bytes(b"\x00\x01not a torch file")
    (b / "notjson.json").write_text("{nope")
    (b / "trt").mkdir()
    (b / "trt" / "meta_info.json").write_text('{"num_experts": "many"}')
    (b / "routed.jsonl").write_text('{"text": "hi", "meta_info": {"routed_experts": "abc"}}\n')
    (b / "slotmap.json").write_text('{"physical_to_logical_map": "x"}')
    (b / "prompt_list.jsonl").write_text('{"question": [1, 2, 3]}\n')
    (b / "prompt_array.jsonl").write_text('[1, 2, 3]\n')
    (b / "fake.parquet").write_bytes(b"PAR1 not really")
    (b / "routed_nan.jsonl").write_text('{"text": "hi", "meta_info": {"prompt_tokens": 1, "completion_tokens": 0, "routed_experts": [[[NaN, 1]]]}}\n')
    (b / "routed_huge.jsonl").write_text(json.dumps({"text": "hi", "meta_info": {"prompt_tokens": 1, "completion_tokens": 0,
        "routed_experts": [[[2**40, 1]] * 32]}}) + "\n")

    paths = {"B": b, "RUN": run, "PL": pl, "AFILE": b / "afile.txt", "EXISTING": b / "existing.csv",
             "ADIR": b / "adir", "EMPTY": b / "empty", "MISSING": b / "missing", "BADJSONL": b / "bad.jsonl",
             "EMPTYJSONL": b / "empty.jsonl", "LISTFIELD": b / "listfield.jsonl", "GARBAGEPT": b / "garbage.pt",
             "NOTJSON": b / "notjson.json", "TRT": b / "trt", "ROUTED": b / "routed.jsonl",
             "SLOTMAP": b / "slotmap.json", "PROMPTLIST": b / "prompt_list.jsonl",
             "PROMPTARRAY": b / "prompt_array.jsonl", "FAKEPARQUET": b / "fake.parquet",
             "ROUTEDNAN": b / "routed_nan.jsonl", "ROUTEDHUGE": b / "routed_huge.jsonl"}

    manifests = {
        "RUN_GEOSTR": lambda m: _set(m, "geometry", "mixtral"),
        "RUN_LAYERSSTR": lambda m: _set(m, "geometry.moe_layers", "1-3"),
        "RUN_MODELLIST": lambda m: _set(m, "model", [1, 2]),
        "RUN_LIST": lambda m: [m],
        "RUN_NOTJSON": lambda m: "{broken",
        "RUN_EXPERTSSTR": lambda m: _set(m, "geometry.num_experts", "256"),
        "RUN_TOPKNEG": lambda m: _set(m, "geometry.top_k", -8),
        "RUN_VERSIONSTR": lambda m: _set(m, "schema_version", "one"),
        "RUN_DATASETSTR": lambda m: _set(m, "dataset", "humaneval"),
        "RUN_NOTESSTR": lambda m: _set(m, "notes", 5),
        "RUN_MODELNAMELIST": lambda m: _set(m, "model.name", ["a"]),
        "RUN_KIND": lambda m: _set(m, "kind", "tokens"),
        "RUN_LAYERSHUGE": lambda m: _set(m, "geometry.moe_layers", [1, 2, 10**9]),
        "RUN_EXPERTSHUGE": lambda m: _set(m, "geometry.num_experts", 10**12),
    }
    for name, edit in manifests.items():
        paths[name] = _edited_run(run, b / name.lower(), edit)

    src = json.loads(pl.read_text())
    placements = {
        "PL_LIST": lambda d: [d],
        "PL_STR": lambda d: '"just a string"',
        "PL_EMPTY": lambda d: {},
        "PL_FORMAT": lambda d: _set(d, "format", "other-tool"),
        "PL_CLUSTERSTR": lambda d: _set(d, "cluster", "4x8"),
        "PL_NODESSTR": lambda d: _set(d, "cluster.nodes", "1"),
        "PL_NODESNEG": lambda d: _set(d, "cluster.nodes", -1),
        "PL_NODESBOOL": lambda d: _set(d, "cluster.nodes", True),
        "PL_EXPERTSHUGE": lambda d: _set(d, "cluster.num_experts", 10**12),
        "PL_LAYERSSTR": lambda d: _set(d, "layers", "1-3"),
        "PL_LAYERSFLOAT": lambda d: _set(d, "layers", [1.5, 2, 3]),
        "PL_SESTR": lambda d: _set(d, "slot_expert", "0,1,2"),
        "PL_SEROWSTR": lambda d: _set(d, "slot_expert", ["0,1"] * len(d["slot_expert"])),
        "PL_SEFLOAT": lambda d: _set(d, "slot_expert", [[x + 0.5 for x in r] for r in d["slot_expert"]]),
        "PL_SEHUGE": lambda d: _set(d, "slot_expert", [[2**70] + r[1:] for r in d["slot_expert"]]),
        "PL_SERAGGED": lambda d: _set(d, "slot_expert", [r[:-1] for r in d["slot_expert"]]),
        "PL_VERSIONSTR": lambda d: _set(d, "version", "x"),
        "PL_GROUPINGLIST": lambda d: _set(d, "grouping", [1]),
        "PL_GROUPKIND": lambda d: _set(d, "grouping.kind", "astrology"),
        "PL_DOMAINNODES": lambda d: _set(d, "grouping.domain_nodes", {"code": "0"}),
        "PL_METALIST": lambda d: _set(d, "meta", [1]),
        "PL_HIDDENHUGE": lambda d: _set(d, "meta", {"num_hidden_layers": 1_000_000_000}),
        "PL_HIDDENSTR": lambda d: _set(d, "meta", {"num_hidden_layers": "61"}),
        "PL_NAN": lambda d: json.dumps(d).replace('"layers": [1', '"layers": [NaN'),
        "PL_STRATEGYLIST": lambda d: _set(d, "strategy", ["linear"]),
    }
    for name, edit in placements.items():
        paths[name] = _edited_placement(src, b / f"{name.lower()}.json", edit)
    pristine = tmp_path_factory.mktemp("pristine") / "world"
    shutil.copytree(b, pristine, symlinks=True)
    paths["PRISTINE"] = pristine
    return {k: str(v) for k, v in paths.items()}


def restore(root: Path, pristine: Path) -> None:
    """Put the world back after a case that changed it (an expected failure), so later cases see it intact."""
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)


def snapshot(root: Path) -> dict[str, str]:
    """Every file (with its content hash) and every folder under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------- the cases

C = Case
CASES: list[Case] = [
    # --- the command line itself
    C("no-args", "", "give a command"),
    C("unknown-command", "bogus", "No such command"),
    C("unknown-top-option", "--bogus", "No such option"),
    C("import-no-format", "import", "give a command"),
    C("import-unknown-format", "import bogus $RUN", "No such command"),
    # --- collect (every case names --out inside the world, so anything written would show)
    C("collect-limit-0", "collect --out $B/new --limit 0", "--limit"),
    C("collect-limit-neg", "collect --out $B/new --limit -1", "--limit"),
    C("collect-limit-text", "collect --out $B/new --limit abc", "--limit"),
    C("collect-limit-float", "collect --out $B/new --limit 1.5", "--limit"),
    C("collect-seed-neg", "collect --out $B/new --seed -1", "--seed"),
    C("collect-seed-huge", "collect --out $B/new --seed 4294967296", "--seed"),
    C("collect-max-new-neg", "collect --out $B/new --max-new-tokens -1", "--max-new-tokens"),
    C("collect-batch-0", "collect --out $B/new --batch-size 0", "--batch-size"),
    C("collect-chunk-0", "collect --out $B/new --chunk-requests 0", "--chunk-requests"),
    C("collect-layers-0", "collect --out $B/new --layers 0", "--layers"),
    C("collect-layers-huge", "collect --out $B/new --layers 100000", "--layers"),
    C("collect-temp-neg", "collect --out $B/new --sample --temperature -1", "--temperature"),
    C("collect-temp-0", "collect --out $B/new --sample --temperature 0", "--temperature"),
    C("collect-temp-nan", "collect --out $B/new --sample --temperature nan", "--temperature"),
    C("collect-temp-inf", "collect --out $B/new --sample --temperature inf", "--temperature"),
    C("collect-weights", "collect --out $B/new --weights int4", "unknown weights"),
    C("collect-dtype", "collect --out $B/new --dtype int8", "unknown dtype"),
    C("collect-engine", "collect --out $B/new --server http://127.0.0.1:9 --engine tgi", "unknown engine"),
    C("collect-concurrency-0", "collect --out $B/new --server http://127.0.0.1:9 --concurrency 0", "--concurrency"),
    C("collect-server-not-url", "collect --out $B/new --model mixtral-8x7b --server notaurl --limit 1", "--server"),
    C("collect-server-ftp", "collect --out $B/new --model mixtral-8x7b --server ftp://x --limit 1", "--server"),
    C("collect-server-port", "collect --out $B/new --model mixtral-8x7b --server http://x:99999 --limit 1", "--server"),
    C("collect-server-refused", "collect --out $B/new --model mixtral-8x7b --server http://127.0.0.1:9 --limit 1",
      "cannot reach"),
    C("collect-device-map-bogus", "collect --out $B/new --device-map potato", "--device-map"),
    C("collect-device-map-cuda99", "collect --out $B/new --device-map cuda:99", "--device-map"),
    C("collect-model", "collect --out $B/new --model no-such-model", "unknown model"),
    C("collect-dataset", "collect --out $B/new --dataset no-such-set", "unknown dataset"),
    C("collect-data-file-missing", "collect --out $B/new --dataset gsm8k --data-file $MISSING", "no such file"),
    C("collect-data-file-dir", "collect --out $B/new --dataset gsm8k --data-file $ADIR", "is a folder"),
    C("collect-data-file-list-field", "collect --out $B/new --dataset gsm8k --data-file $PROMPTLIST", "not text"),
    C("collect-data-file-not-object", "collect --out $B/new --dataset gsm8k --data-file $PROMPTARRAY"),
    C("collect-data-file-ext", "collect --out $B/new --dataset gsm8k --data-file $AFILE", "extension"),
    C("collect-data-file-parquet", "collect --out $B/new --dataset gsm8k --data-file $FAKEPARQUET", "Parquet"),
    C("collect-data-file-bad", "collect --out $B/new --dataset gsm8k --data-file $BADJSONL"),
    C("collect-out-file", "collect --out $AFILE --limit 1", "is a file"),
    C("collect-out-under-file", "collect --out $AFILE/run --limit 1"),
    C("collect-out-nonempty", "collect --out $ADIR --limit 1", "not empty"),
    C("collect-out-other-run", "collect --out $RUN --limit 1 --model tiny-qwen3-moe --max-new-tokens 2",
      "holds another run"),
    C("collect-unknown-option", "collect --out $B/new --bogus", "No such option"),
    C("collect-out-no-value", "collect --out", "requires an argument"),
    C("collect-max-memory", "collect --out $B/new --max-memory lots --limit 1", "--max-memory"),
    C("collect-layers-real", "collect --out $B/new --model deepseek-v3 --layers 2"),
    # --- info
    C("info-no-arg", "info", "Missing argument"),
    C("info-missing", "info $MISSING"),
    C("info-file", "info $AFILE"),
    C("info-not-run", "info $ADIR"),
    C("info-bogus", "info $RUN --bogus", "No such option"),
    C("info-extra", "info $RUN $RUN", "unexpected extra argument"),
    C("info-manifest-notjson", "info $RUN_NOTJSON", "not valid JSON"),
    C("info-manifest-list", "info $RUN_LIST", "JSON object"),
    C("query-manifest-list", "query $RUN_LIST 'select 1'", "JSON object"),
    C("place-manifest-list", "place $RUN_LIST", "JSON object"),
    C("query-glob-manifest-str", "query '$B/run_geo*' 'select 1'", "manifest.json: field"),
    C("analyze-folder-of-runs-bad", "analyze $B", "manifest.json: field"),
    C("info-geometry-str", "info $RUN_GEOSTR", "geometry"),
    C("info-layers-str", "info $RUN_LAYERSSTR", "moe_layers"),
    C("info-model-list", "info $RUN_MODELLIST", "model"),
    C("info-dataset-str", "info $RUN_DATASETSTR", "dataset"),
    C("info-version-str", "info $RUN_VERSIONSTR"),
    C("info-notes-int", "info $RUN_NOTESSTR", "notes"),
    C("sql-manifest-kind", "sql $RUN_KIND", "manifest.json: field", stdin="select 1;\n"),
    C("query-model-name-list", "query $RUN_MODELNAMELIST 'select 1'", "manifest.json: field"),
    C("analyze-layers-huge", "analyze $RUN_LAYERSHUGE", "manifest.json: field"),
    C("report-experts-huge", "report $RUN_EXPERTSHUGE -o $B/r.html", "manifest.json: field"),
    C("place-experts-huge", "place $RUN_EXPERTSHUGE", "manifest.json: field"),
    C("place-layers-str", "place $RUN_LAYERSSTR", "manifest.json: field"),
    C("info-kind", "info $RUN_KIND", "manifest.json: field"),
    # --- models, datasets
    C("models-extra", "models extra", "unexpected extra argument"),
    C("models-bogus", "models --bogus", "No such option"),
    C("datasets-extra", "datasets extra", "unexpected extra argument"),
    C("datasets-bogus", "datasets --json", "No such option"),
    # --- import jsonl
    C("jsonl-no-files", "import jsonl --model m --out $B/new", "Missing argument"),
    C("jsonl-no-model", "import jsonl $BADJSONL --out $B/new", "Missing option"),
    C("jsonl-no-out", "import jsonl $BADJSONL --model m", "Missing option"),
    C("jsonl-missing-file", "import jsonl $MISSING --model m --out $B/new"),
    C("jsonl-malformed", "import jsonl $BADJSONL --model m --out $B/new"),
    C("jsonl-empty", "import jsonl $EMPTYJSONL --model m --out $B/new"),
    C("jsonl-list-field", "import jsonl $LISTFIELD --model m --out $B/new"),
    C("jsonl-out-run", "import jsonl $BADJSONL --model m --out $RUN"),
    C("jsonl-out-file", "import jsonl $BADJSONL --model m --out $AFILE"),
    C("jsonl-phase", "import jsonl $BADJSONL --model m --out $B/new --phase middle", "unknown phase"),
    C("jsonl-weight-dtype", "import jsonl $BADJSONL --model m --out $B/new --weight-dtype int8", "unknown weight dtype"),
    C("jsonl-experts-0", "import jsonl $BADJSONL --model m --out $B/new --num-experts 0", "--num-experts"),
    C("jsonl-topk-neg", "import jsonl $BADJSONL --model m --out $B/new --top-k -2", "--top-k"),
    C("jsonl-layers-huge", "import jsonl $BADJSONL --model m --out $B/new --num-layers 1000000000", "--num-layers"),
    C("jsonl-domain", "import jsonl $BADJSONL --model m --out $B/new --domain legal", "unknown domain"),
    C("sglang-stat-domain-empty", "import sglang-stat $GARBAGEPT --out $B/new --domain ''", "unknown domain"),
    C("jsonl-field-map", "import jsonl $LISTFIELD --model m --out $B/new --field-map nonsense"),
    C("jsonl-dir-as-file", "import jsonl $ADIR --model m --out $B/new"),
    # --- import engine formats
    *[C(f"{fmt}-no-sources", f"import {fmt} --out $B/new --model mixtral-8x7b", "Missing argument")
      for fmt in ("sglang-per-token", "sglang-stat", "routed-experts", "trtllm-stats")],
    *[C(f"{fmt}-missing", f"import {fmt} $MISSING --out $B/new --model mixtral-8x7b", "no such file")
      for fmt in ("sglang-per-token", "sglang-stat", "routed-experts", "trtllm-stats")],
    *[C(f"{fmt}-experts-neg", f"import {fmt} $GARBAGEPT --out $B/new --num-experts -1", "--num-experts")
      for fmt in ("sglang-per-token", "sglang-stat", "routed-experts", "trtllm-stats")],
    *[C(f"{fmt}-out-run", f"import {fmt} $GARBAGEPT --out $RUN --model mixtral-8x7b")
      for fmt in ("sglang-per-token", "sglang-stat", "routed-experts", "trtllm-stats")],
    *[C(f"{fmt}-bad-model", f"import {fmt} $GARBAGEPT --out $B/new --model no-such-model")
      for fmt in ("sglang-per-token", "sglang-stat", "routed-experts", "trtllm-stats")],
    C("sglang-per-token-garbage", "import sglang-per-token $GARBAGEPT --out $B/new --model mixtral-8x7b"),
    C("sglang-stat-garbage", "import sglang-stat $GARBAGEPT --out $B/new --model mixtral-8x7b"),
    C("sglang-stat-slot-map", "import sglang-stat $GARBAGEPT --out $B/new --model mixtral-8x7b --slot-map $SLOTMAP",
      "--slot-map"),
    C("routed-experts-bad", "import routed-experts $ROUTED --out $B/new --model mixtral-8x7b"),
    C("routed-experts-slot-map-missing",
      "import routed-experts $ROUTED --out $B/new --model mixtral-8x7b --slot-map $MISSING", "--slot-map"),
    C("routed-experts-slot-map-bad", "import routed-experts $ROUTED --out $B/new --model mixtral-8x7b --slot-map $SLOTMAP"),
    C("routed-experts-nan", "import routed-experts $ROUTEDNAN --out $B/new --model mixtral-8x7b"),
    C("routed-experts-huge-id", "import routed-experts $ROUTEDHUGE --out $B/new --model mixtral-8x7b"),
    C("trtllm-bad-meta", "import trtllm-stats $TRT --out $B/new --model mixtral-8x7b"),
    C("import-moe-layers-garbage", "import sglang-stat $GARBAGEPT --out $B/new --num-experts 8 --top-k 2 "
      "--moe-layers x-y --num-layers 4"),
    C("import-topk-0", "import routed-experts $ROUTED --out $B/new --top-k 0", "--top-k"),
    C("import-layers-0", "import routed-experts $ROUTED --out $B/new --num-layers 0", "--num-layers"),
    # --- query
    C("query-no-sql", "query $RUN", "give one or more run directories"),
    C("query-sql-comment", "query $RUN '-- hi\nselect 1'", "put --"),
    C("query-sql-dash", "query $RUN '-1'", "put --"),
    C("query-format", "query $RUN 'select 1' --format xml", "unknown format"),
    C("query-parquet-stdout", "query $RUN 'select 1' --format parquet", "needs -o"),
    C("query-table-file", "query $RUN 'select 1' -o $B/x.txt", "-o needs"),
    C("query-out-in-run", "query $RUN 'select 1' -f csv -o $RUN/x.csv", "run directory"),
    C("query-out-chunk", "query $RUN 'select * from routes' -f parquet -o $RUN/routes/part-r000-c000000.parquet",
      "run directory"),
    C("query-out-chunk-force", "query $RUN 'select 1' -f parquet --force -o $RUN/routes/part-r000-c000000.parquet",
      "run directory"),
    C("query-out-manifest", "query $RUN 'select 1' -f json --force -o $RUN/manifest.json", "run directory"),
    C("query-out-run", "query $RUN 'select 1' -f csv -o $RUN", "run directory"),
    C("query-out-exists", "query $RUN 'select 1' -f csv -o $EXISTING", "--force"),
    C("query-out-under-file", "query $RUN 'select 1' -f csv -o $AFILE/x.csv", "is a file"),
    C("query-out-dir", "query $RUN 'select 1' -f csv -o $ADIR", "is a folder"),
    C("query-out-dir-force", "query $RUN 'select 1' -f csv --force -o $ADIR", "is a folder"),
    C("query-out-devnull", "query $RUN 'select 1' -f csv --force -o /dev/null", "not a regular file"),
    C("query-max-rows-0", "query $RUN 'select 1' --max-rows 0", "--max-rows"),
    C("query-max-rows-text", "query $RUN 'select 1' --max-rows many", "--max-rows"),
    C("query-missing-run", "query $MISSING 'select 1'"),
    C("query-file-run", "query $AFILE 'select 1'"),
    C("query-syntax", "query $RUN 'selec 1'"),
    C("query-unknown-view", "query $RUN 'select * from nope'"),
    C("query-bad-sql-out-untouched", "query $RUN 'selec 1' -f csv --force -o $EXISTING"),
    C("query-sql-not-utf8", "query $RUN 'select 1 -- \udcff'", "UTF-8"),  # undecodable argv bytes
    C("query-copy", "query $RUN \"COPY (select 1) TO '$B/copy.csv'\""),
    C("query-explain-copy",
      "query $RUN \"EXPLAIN ANALYZE COPY (select * from routes) TO '$RUN/routes/part-r000-c000001.parquet' (FORMAT parquet)\""),
    C("query-create", "query $RUN 'CREATE TABLE t AS SELECT 1'"),
    C("query-attach", "query $RUN \"ATTACH '$B/db.duckdb' AS x\""),
    C("query-many", "query $RUN 'select 1; COPY (select 1) TO \"$B/y.csv\"'"),
    C("query-geometry-str", "query $RUN_GEOSTR 'select count(*) from routes'", "manifest.json: field"),
    C("query-interrupt", "query $RUN 'select 1' -f csv -o $B/q.csv", "run the same command", code=130,
      interrupt="tracekit.cli.query_cmd:_write_stream"),
    # --- sql
    C("sql-syntax", "sql $RUN", stdin="selec 1;\n"),
    C("sql-dot", "sql $RUN", "unknown command", stdin=".bogus\n"),
    C("sql-missing-run", "sql $MISSING", stdin="select 1;\n"),
    C("sql-max-rows", "sql $RUN --max-rows 0", "--max-rows", stdin="select 1;\n"),
    C("sql-no-run", "sql", "Missing argument"),
    C("sql-not-utf8", "sql $RUN", "UTF-8", stdin="select '\udcff';\n"),
    C("analyze-run-not-utf8", "analyze $B/\udcff", "UTF-8"),
    C("sql-copy", "sql $RUN", stdin="COPY (select 1) TO '$B/s.csv';\n"),
    # --- analyze
    C("analyze-window-0", "analyze $RUN --window 0", "--window"),
    C("analyze-window-neg", "analyze $RUN --window -5", "--window"),
    C("analyze-topn-neg", "analyze $RUN --top-n -3", "--top-n"),
    C("analyze-topn-0", "analyze $RUN --top-n 0", "--top-n"),
    C("analyze-layer-neg", "analyze $RUN --layer -1", "--layer"),
    C("analyze-layer-absent", "analyze $RUN --layer 99 --what coactivation"),
    C("analyze-by", "analyze $RUN --by weekday", "unknown by"),
    C("analyze-what", "analyze $RUN --what bogus", "--what"),
    C("analyze-what-empty", "analyze $RUN --what ''", "--what"),
    C("analyze-what-partial", "analyze $RUN --what imbalance,,bogus", "--what"),
    C("analyze-format", "analyze $RUN --format xml --out $B/a", "unknown format"),
    C("analyze-out-in-run", "analyze $RUN --out $RUN/routes", "run directory"),
    C("analyze-out-run", "analyze $RUN --out $RUN --force", "run directory"),
    C("analyze-out-file", "analyze $RUN --out $AFILE", "is a file"),
    C("analyze-out-nonempty", "analyze $RUN --out $ADIR", "--force"),
    C("analyze-out-under-file", "analyze $RUN --out $AFILE/sub", "is a file"),
    C("analyze-seed", "analyze $RUN --seed -1", "--seed"),
    C("analyze-missing", "analyze $MISSING"),
    C("analyze-file", "analyze $AFILE"),
    C("analyze-geometry-str", "analyze $RUN_GEOSTR", "manifest.json: field"),
    C("analyze-experts-str", "analyze $RUN_EXPERTSSTR", "manifest.json: field"),
    # --- report
    C("report-no-out", "report $RUN", "Missing option"),
    C("report-out-in-run", "report $RUN -o $RUN/r.html", "run directory"),
    C("report-out-dir", "report $RUN -o $ADIR", "is a folder"),
    C("report-out-exists", "report $RUN -o $EXISTING", "--force"),
    C("report-out-under-file", "report $RUN -o $AFILE/r.html", "is a file"),
    C("report-png-file", "report $RUN -o $B/r.html --png $AFILE", "is a file"),
    C("report-png-in-run", "report $RUN -o $B/r.html --png $RUN/png", "run directory"),
    C("report-png-nonempty", "report $RUN -o $B/r.html --png $ADIR", "--force"),
    C("report-same", "report $RUN -o $B/same --png $B/same", "same path"),
    C("report-layer-neg", "report $RUN -o $B/r.html --layer -1", "--layer"),
    C("report-layer-absent", "report $RUN -o $B/r.html --layer 99", "--layer"),
    C("report-by", "report $RUN -o $B/r.html --by phase", "unknown by"),
    C("report-missing", "report $MISSING -o $B/r.html"),
    C("report-geometry-str", "report $RUN_GEOSTR -o $B/r.html", "manifest.json: field"),
    # --- place
    C("diff-missing-run", "diff $B/nowhere $RUN", "no such run directory"),
    C("diff-bootstrap-low", "diff $RUN $RUN --bootstrap 5", "--bootstrap"),
    C("watch-server-not-url", "watch --server notaurl --placement $B/p.json --out $B/w", "--server"),
    C("watch-engine", "watch --server http://127.0.0.1:9 --engine tgi --placement $B/p.json --out $B/w", "--engine"),
    C("place-nodes-0", "place $RUN --nodes 0", "--nodes"),
    C("place-gpus-0", "place $RUN --gpus-per-node 0", "--gpus-per-node"),
    C("place-redundant-neg", "place $RUN --redundant -1", "--redundant"),
    C("place-strategy", "place $RUN --strategy magic", "unknown strategy"),
    C("place-grouping", "place $RUN --grouping bogus", "unknown grouping"),
    C("place-holdout-0", "place $RUN --holdout 0", "--holdout"),
    C("place-holdout-big", "place $RUN --holdout 1.5", "--holdout"),
    C("place-holdout-nan", "place $RUN --holdout nan", "--holdout"),
    C("place-split", "place $RUN --split halves", "unknown split"),
    C("place-max-imbalance", "place $RUN --max-imbalance 0.5", "--max-imbalance"),
    C("place-hidden-0", "place $RUN --hidden-size 0", "--hidden-size"),
    C("place-bytes-neg", "place $RUN --bytes-per-elem -1", "--bytes-per-elem"),
    C("place-bytes-0", "place $RUN --bytes-per-elem 0", "--bytes-per-elem"),
    C("place-bytes-inf", "place $RUN --bytes-per-elem inf", "--bytes-per-elem"),
    C("place-microbatch-0", "place $RUN --microbatch-tokens 0", "--microbatch-tokens"),
    C("place-phase", "place $RUN --phase both", "unknown phase"),
    C("place-seed", "place $RUN --seed -3", "--seed"),
    C("place-json-in-run", "place $RUN --json $RUN/c.json", "run directory"),
    C("place-out-in-run", "place $RUN -o $RUN/routes/p.json", "run directory"),
    C("place-out-exists", "place $RUN -o $EXISTING", "--force"),
    C("place-json-dir", "place $RUN --json $ADIR", "is a folder"),
    C("place-out-under-file", "place $RUN -o $AFILE/p.json", "is a file"),
    C("place-same", "place $RUN -o $B/p2.json --json $B/p2.json", "same path"),
    C("place-indivisible", "place $RUN --nodes 3 --gpus-per-node 1 --redundant 0", "divide"),
    C("place-missing", "place $MISSING"),
    C("place-file", "place $AFILE"),
    C("place-geometry-str", "place $RUN_GEOSTR --nodes 1 --gpus-per-node 2 --redundant 0", "manifest.json: field"),
    C("place-topk-neg", "place $RUN_TOPKNEG --nodes 1 --gpus-per-node 2 --redundant 0", "manifest.json: field"),
    # --- export
    C("route-no-grouping", "route --upstream http://127.0.0.1:9", "Missing option"),
    C("route-grouping-missing", "route --grouping $MISSING --upstream http://127.0.0.1:9 --dp-size 4"),
    C("route-grouping-dir", "route --grouping $ADIR --upstream http://127.0.0.1:9 --dp-size 4"),
    C("route-grouping-jsonl", "route --grouping $BADJSONL --upstream http://127.0.0.1:9 --dp-size 4"),
    C("route-grouping-placement", "route --grouping $PL --upstream http://127.0.0.1:9 --dp-size 4"),
    C("route-grouping-text", "route --grouping $AFILE --upstream http://127.0.0.1:9 --dp-size 4"),
    C("route-dp-0", "route --grouping $PL --upstream http://127.0.0.1:9 --dp-size 0", "--dp-size"),
    C("route-dp-text", "route --grouping $PL --upstream http://127.0.0.1:9 --dp-size many", "--dp-size"),
    C("route-bogus-option", "route --grouping $PL --upstream http://127.0.0.1:9 --bogus", "No such option"),
    C("export-missing", "export $MISSING --format sglang -o $B/e.json", "no such placement"),
    C("export-no-format", "export $PL", "Missing option"),
    C("export-format", "export $PL --format tensorrt", "unknown format"),
    C("export-layers-0", "export $PL --format sglang -o $B/e.json --num-layers 0", "--num-layers"),
    C("export-layers-huge", "export $PL --format sglang -o $B/e.json --num-layers 1000000000", "--num-layers"),
    C("export-layers-below", "export $PL --format sglang -o $B/e.json --num-layers 2", "--num-layers"),
    C("export-out-in-run", "export $PL --format sglang -o $RUN/e.json", "run directory"),
    C("export-out-exists", "export $PL --format sglang -o $EXISTING", "--force"),
    C("export-default-exists", "export $PL --format sglang", "--force"),
    C("export-out-dir", "export $PL --format trtllm -o $ADIR", "is a folder"),
    C("export-out-under-file", "export $PL --format vllm -o $AFILE/e.json", "is a file"),
    C("export-placement-is-run", "export $RUN --format json -o $B/e.json"),
    C("export-placement-notjson", "export $NOTJSON --format json -o $B/e.json", "not valid JSON"),
    C("export-placement-dir", "export $ADIR --format json -o $B/e.json"),
    *[C(f"export-{name.lower()}", f"export ${name} --format sglang -o $B/e.json", f"{name.lower()}.json: ")
      for name in ("PL_LIST", "PL_STR", "PL_EMPTY", "PL_FORMAT", "PL_CLUSTERSTR", "PL_NODESSTR", "PL_NODESNEG",
                   "PL_NODESBOOL", "PL_EXPERTSHUGE", "PL_LAYERSSTR", "PL_LAYERSFLOAT", "PL_SESTR", "PL_SEROWSTR",
                   "PL_SEFLOAT", "PL_SEHUGE", "PL_SERAGGED", "PL_VERSIONSTR", "PL_GROUPINGLIST", "PL_GROUPKIND",
                   "PL_DOMAINNODES", "PL_METALIST", "PL_HIDDENHUGE", "PL_HIDDENSTR", "PL_NAN", "PL_STRATEGYLIST")],
    C("export-grouping-hidden-huge", "export $PL_HIDDENHUGE --format grouping -o $B/g.json", "num_hidden_layers"),
]


def _ids(cases):
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return ids


def _argv(case: Case, world: dict[str, str]) -> list[str]:
    return shlex.split(Template(case.argv).substitute(world)) if case.argv else []


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=False, reason=c.xfail))
                                  if c.xfail else c for c in CASES], ids=_ids(CASES))
def test_hostile_input(case: Case, world, capsys, monkeypatch):
    root = Path(world["B"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(root)  # default outputs (collect's traces/run, DuckDB temp folders) would land in the world
    if case.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(Template(case.stdin).substitute(world)))
    if case.interrupt:
        mod, fn = case.interrupt.split(":")

        def interrupt(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(__import__(mod, fromlist=[fn]), fn, interrupt)
    before = snapshot(root)
    capsys.readouterr()
    try:
        main(_argv(case, world))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:  # put the world back first, so that later cases see it intact whatever this one asserts
        restore(root, Path(world["PRISTINE"]))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in out + err, err
    assert code == case.code, f"exit {code}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("interrupted: " if case.code == 130 else "error: "), err
    if case.expect:
        assert case.expect in lines[0], lines[0]
    assert not changed, f"files or folders changed: {changed[:5]}"


def test_every_command_has_hostile_cases():
    """Each command of the CLI (and each import format) appears in the table."""
    from typer.main import get_command

    from tracekit.cli import app

    group = get_command(app)
    commands = set(group.commands)
    imports = set(group.commands["import"].commands)
    used = {c.argv.split()[0] for c in CASES if c.argv}
    used_imports = {c.argv.split()[1] for c in CASES if c.argv.startswith("import ") and len(c.argv.split()) > 1}
    assert commands <= used, commands - used
    assert imports <= used_imports, imports - used_imports
    assert len(CASES) >= 100


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["query", "RUN", "-- note\nselect 1"], ["export", "x.json"]])
def test_console_script_one_line(argv, tmp_path):
    """The installed entry point, as a user runs it: one line, exit 2, no traceback (typer's own click copy)."""
    proc = subprocess.run([sys.executable, "-m", "tracekit", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert list(tmp_path.iterdir()) == []
