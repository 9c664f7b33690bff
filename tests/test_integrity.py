"""Chunk integrity: the manifest records every chunk's rows, bytes and SHA-256; a missing, extra, truncated or
corrupt chunk is named by `info`, refused by every reader, and skipped (with a warning) under --allow-partial."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tracekit.errors import TracekitError
from tracekit.query import connect, fetch_arrow, run_sql
from tracekit.store import open_run, partial_reads, verify_run
from tracekit.synth import generate_run

from _cli import cli

VICTIM = "routes/part-r000-c000001.parquet"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "run"
    generate_run(out, num_experts=16, top_k=2, moe_layers=[1, 2, 3], requests=24, prompt_tokens=(6, 10),
                 decode_tokens=(3, 5), rows_per_chunk=300, seed=3)
    return out


@pytest.fixture()
def run(pristine, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    return dst


def _count(run: Path) -> int:
    con = connect(run)
    try:
        return fetch_arrow(run_sql(con, "SELECT count(*) AS n FROM routes")).column("n")[0].as_py()
    finally:
        con.close()


def test_manifest_records_every_chunk(pristine):
    m = json.loads((pristine / "manifest.json").read_text())
    files = sorted(p.relative_to(pristine).as_posix() for p in (pristine / "routes").glob("*.parquet"))
    assert len(files) >= 4 and sorted(m["chunks"]) == files
    for rel, rec in m["chunks"].items():
        p = pristine / rel
        assert rec["bytes"] == p.stat().st_size and rec["rows"] == pq.read_metadata(p).num_rows
        assert len(rec["sha256"]) == 64
    assert verify_run(pristine, checksums=True).state == "verified"


def test_info_verified(run, capsys):
    code, out, err = cli(capsys, "info", str(run), "--verify")
    assert code == 0, err
    assert "verified" in out and "sha256" in out


def _damage(run: Path, how: str) -> tuple[str, int]:
    """Damage the run; returns (the chunk named in the error, rows that --allow-partial still reads)."""
    victim = run / VICTIM
    total = sum(pq.read_metadata(p).num_rows for p in (run / "routes").glob("*.parquet"))
    lost = pq.read_metadata(victim).num_rows
    if how == "missing":
        victim.unlink()
        return VICTIM, total - lost
    if how == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        return VICTIM, total - lost
    if how == "corrupt_footer":  # same size, footer bytes overwritten
        data = bytearray(victim.read_bytes())
        data[-40:-8] = b"\xff" * 32
        victim.write_bytes(bytes(data))
        return VICTIM, total - lost
    if how == "corrupt_longer":
        with open(victim, "ab") as f:
            f.write(b"junk")
        return VICTIM, total - lost
    if how == "extra":
        shutil.copy(victim, run / "routes/part-r000-c000099.parquet")
        return "routes/part-r000-c000099.parquet", total
    if how == "swapped":  # another chunk of the same run under the victim's name: rows differ from the record
        other = run / "routes/part-r000-c000000.parquet"
        data = other.read_bytes()
        recorded = json.loads((run / "manifest.json").read_text())["chunks"][VICTIM]["bytes"]
        if len(data) == recorded:
            pytest.skip("chunks happen to have equal sizes")
        victim.write_bytes(data)
        return VICTIM, total - lost
    raise AssertionError(how)


KINDS = {"missing": "missing", "truncated": "truncated", "corrupt_footer": "corrupt", "corrupt_longer": "corrupt",
         "extra": "extra", "swapped": "corrupt"}


@pytest.mark.parametrize("how", list(KINDS))
def test_damage_is_named_refused_and_skippable(run, capsys, how):
    name, rows_left = _damage(run, how)
    word = KINDS[how]
    # info names the chunk and what is wrong with it, and exits 2
    code, out, err = cli(capsys, "info", str(run))
    assert code == 2
    assert name in err and f"is {word}" in err and err.count("\n") == 1, err
    # query refuses in one line
    code, out, err = cli(capsys, "query", str(run), "SELECT count(*) FROM routes")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and name in err and "--allow-partial" in err, err
    # --allow-partial reads the intact chunks and warns once per skipped chunk
    code, out, err = cli(capsys, "query", str(run), "SELECT count(*) AS n FROM routes", "--format", "csv",
                         "--allow-partial")
    assert code == 0, err
    assert out.split()[-1] == str(rows_left)
    assert f"warning: {run}: skipping chunk {name} is {word}" in err
    # the library: open_run refuses, allow_partial=True reads the rest
    with pytest.raises(TracekitError, match=name.replace(".", r"\.")):
        open_run(run)
    assert sum(pq.read_metadata(p).num_rows for p in open_run(run, allow_partial=True).files["routes"]) == rows_left


def test_bit_flip_needs_verify(run, capsys):
    """Same size, footer intact, one data byte changed: only the full checksum sees it (documented trade-off)."""
    victim = run / VICTIM
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, err = cli(capsys, "info", str(run))
    assert code == 0, err
    code, out, err = cli(capsys, "info", str(run), "--verify")
    assert code == 2 and VICTIM in err and "sha256 differs" in err


def test_analyze_and_place_refuse_then_allow_partial(run, capsys):
    from tracekit.analysis.run import analyze
    from tracekit.placement.data.traces import load_traces

    _damage(run, "missing")
    with pytest.raises(TracekitError, match="is missing"):
        analyze([run], what="imbalance")
    with pytest.raises(TracekitError, match="is missing"):
        load_traces([run])
    skipped: list[str] = []
    with partial_reads(True, on_skip=skipped.append):
        assert "imbalance" in analyze([run], what="imbalance")
        traces = load_traces([run])
    assert len(traces) > 0 and len(skipped) == 2 and VICTIM in skipped[0]
    code, out, err = cli(capsys, "analyze", str(run), "--what", "imbalance")
    assert code == 2 and VICTIM in err
    code, out, err = cli(capsys, "analyze", str(run), "--what", "imbalance", "--allow-partial")
    assert code == 0 and "warning:" in err


def test_runs_without_chunk_records_open_unverified(run, capsys):
    """A run of a tracekit from before chunk records: its chunks carry no run id either (a run whose chunks do
    carry one lost its records: damaged, see test_a_manifest_that_lost_its_chunk_records_is_damaged)."""
    for p in (run / "routes").glob("*.parquet"):
        t = pq.read_table(p)
        kv = {k: v for k, v in (t.schema.metadata or {}).items() if k != b"tracekit.run_id"}
        pq.write_table(t.replace_schema_metadata(kv), p)
    m = json.loads((run / "manifest.json").read_text())
    del m["chunks"]
    (run / "manifest.json").write_text(json.dumps(m))
    code, out, err = cli(capsys, "info", str(run))
    assert code == 0, err
    assert "unverified" in out
    assert _count(run) == sum(pq.read_metadata(p).num_rows for p in (run / "routes").glob("*.parquet"))


def test_unfinished_run_accepts_its_own_unrecorded_chunk(run):
    """A kill between a chunk's rename and its manifest update: the chunk names the run, so it is data, not damage;
    in a complete run, or naming another run, it is an extra chunk."""
    m = json.loads((run / "manifest.json").read_text())
    del m["chunks"][VICTIM]
    m["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(m))
    integ = open_run(run).integrity
    assert integ.state == "verified" and integ.unrecorded == [VICTIM]
    m["status"] = "complete"
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TracekitError, match="is extra"):
        open_run(run)
    m["status"], m["run_id"] = "running", "someone-else"
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TracekitError, match="belongs to run"):
        open_run(run)


MANIFEST_EDITS = [
    ("not_an_object", lambda m: [], "a manifest is a JSON object, not list"),
    ("run_id_int", lambda m: m.update(run_id=5), "field 'run_id' must be a string"),
    ("kind_bogus", lambda m: m.update(kind="bogus"), "field 'kind' must be routes or loads"),
    ("geometry_text", lambda m: m.update(geometry="E=16"), "field 'geometry' must be an object"),
    ("num_experts_text", lambda m: m["geometry"].update(num_experts="16"), "'geometry.num_experts' must be an integer"),
    ("moe_layers_text", lambda m: m["geometry"].update(moe_layers="1-3"), "'geometry.moe_layers' must be a list of layer indices"),
    ("chunks_list", lambda m: m.update(chunks=[]), "field 'chunks' must map files"),
    ("chunk_rows_text", lambda m: m["chunks"][VICTIM].update(rows="10"), "field 'chunks' must map files"),
    ("totals_list", lambda m: m.update(totals={"routes": []}), "field 'totals' must be"),
    ("notes_object", lambda m: m.update(notes={"a": 1}), "field 'notes' must be a list of strings"),
    ("schema_newer", lambda m: m.update(schema_version=99), "newer than this tracekit"),
]


@pytest.mark.parametrize("case,edit,needle", MANIFEST_EDITS, ids=[c[0] for c in MANIFEST_EDITS])
def test_hand_edited_manifest_is_one_line(run, capsys, case, edit, needle):
    m = json.loads((run / "manifest.json").read_text())
    edited = edit(m)
    (run / "manifest.json").write_text(json.dumps(m if edited is None else edited))
    for argv in (["info", str(run)], ["query", str(run), "SELECT 1"]):
        code, out, err = cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


def test_resume_refuses_to_adopt_another_runs_chunk(run, tmp_path):
    from tracekit.store import read_manifest, reconcile_chunks

    other = tmp_path / "other"
    generate_run(other, num_experts=16, top_k=2, moe_layers=[1, 2, 3], requests=4, prompt_tokens=6, decode_tokens=3,
                 seed=9)
    shutil.copy(next((other / "routes").glob("part-*.parquet")), run / "routes/part-r000-c000777.parquet")
    with pytest.raises(TracekitError, match="belongs to run"):
        reconcile_chunks(read_manifest(run), run)


# --- issue 19.5 ------------------------------------------------------------------------------------------------


def _small_run(path):
    from tracekit.synth import generate_run

    generate_run(path, num_experts=16, top_k=2, moe_layers=[0, 1], requests=4, prompt_tokens=5, decode_tokens=3,
                 domains=("code",), weights=True, seed=3)
    return path


@pytest.mark.parametrize("edit", ["delete", "null", "list"])
def test_a_manifest_that_lost_its_chunk_records_is_damaged(tmp_path, edit):
    import json as _json

    from tracekit.store import verify_run

    run = _small_run(tmp_path / "run")
    m = _json.loads((run / "manifest.json").read_text())
    if edit == "delete":
        del m["chunks"]
    else:
        m["chunks"] = None if edit == "null" else []
    (run / "manifest.json").write_text(_json.dumps(m))
    assert verify_run(run, checksums=True).state == "damaged"
    r = subprocess.run([sys.executable, "-m", "tracekit", "info", str(run), "--verify"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)


def test_an_empty_run_reads_as_empty(tmp_path):
    import json as _json
    import shutil

    run = _small_run(tmp_path / "run")  # then made what a kill between the manifest and the first chunk leaves
    m = _json.loads((run / "manifest.json").read_text())
    m.update(chunks={}, status="interrupted")
    m.pop("totals", None)
    (run / "manifest.json").write_text(_json.dumps(m))
    for p in (run / "routes").iterdir():
        p.unlink()
    shutil.rmtree(run / "summaries")
    con = connect(run)
    try:
        for view in ("routes", "requests", "loads", "choices"):
            assert fetch_arrow(run_sql(con, f"SELECT count(*) AS n FROM {view}")).column("n")[0].as_py() == 0
    finally:
        con.close()


# --- issue 19.5, round two: the summaries are hashed too; the geometry is checked against the data ---------------


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 3 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _loads_total(run: Path, capsys, *extra) -> tuple[int, str]:
    code, out, err = cli(capsys, "query", str(run), "SELECT sum(count) AS n FROM loads", "--format", "csv", *extra)
    assert code == 0, err
    return int(out.split()[-1]), err


def test_summaries_are_recorded(pristine):
    m = json.loads((pristine / "manifest.json").read_text())
    assert m["summaries"]["summaries/loads.parquet"]["bytes"] == (pristine / "summaries/loads.parquet").stat().st_size
    for rel, rec in m["chunks"].items():
        assert set(rec["summaries"]) == {"loads", "requests"}
    integ = verify_run(pristine)
    assert integ.summaries.state == "verified" and integ.summaries.per_chunk and integ.summaries.run_loads


@pytest.mark.parametrize("victim", ["summaries/loads.parquet", "summaries/loads/part-r000-c000001.parquet",
                                    "summaries/requests/part-r000-c000001.parquet"])
def test_a_flipped_summary_byte_is_damage_and_never_served(run, capsys, victim):
    want, _ = _loads_total(run, capsys)
    rows = _count(run)
    _flip(run / victim)
    code, out, err = cli(capsys, "info", str(run), "--verify")
    assert code == 2 and victim in err and "sha256 differs" in err and err.count("\n") == 1, err
    code, out, err = cli(capsys, "info", str(run))
    assert code == 2 and victim in err
    # the views fall back to verified files with one warning: the totals are the true ones
    got, err = _loads_total(run, capsys)
    assert got == want == rows * 2 and victim in err and "warning:" in err
    code, out, err = cli(capsys, "query", str(run), "SELECT sum(rows) AS n FROM requests", "--format", "csv")
    assert code == 0 and int(out.split()[-1]) == rows, err


@pytest.mark.parametrize("edit", ["run_level", "per_chunk"])
def test_a_manifest_that_lost_its_summary_records_does_not_serve_them(run, capsys, edit):
    want, _ = _loads_total(run, capsys)
    m = json.loads((run / "manifest.json").read_text())
    if edit == "run_level":
        del m["summaries"]
    else:
        for rec in m["chunks"].values():
            rec.pop("summaries")
    (run / "manifest.json").write_text(json.dumps(m))
    _flip(run / ("summaries/loads.parquet" if edit == "run_level" else "summaries/loads/part-r000-c000000.parquet"))
    code, out, err = cli(capsys, "info", str(run))
    assert code == 2 and "unrecorded" in err
    got, err = _loads_total(run, capsys)
    assert got == want and "warning:" in err


def test_a_run_without_summary_records_reads_as_unverified(run, capsys):
    """A run written before the summaries were hashed: no records, no flags in its files; it works, said so."""
    want, _ = _loads_total(run, capsys)
    for p in list((run / "routes").glob("*.parquet")) + [run / "summaries/loads.parquet"]:
        t = pq.read_table(p)
        kv = {k: v for k, v in (t.schema.metadata or {}).items() if k != b"tracekit.summaries_recorded"}
        pq.write_table(t.replace_schema_metadata(kv), p)
    m = json.loads((run / "manifest.json").read_text())
    del m["summaries"], m["chunks"]  # its chunks were rewritten above: no chunk records either
    for p in (run / "routes").glob("*.parquet"):
        t = pq.read_table(p)
        kv = {k: v for k, v in (t.schema.metadata or {}).items() if k != b"tracekit.run_id"}
        pq.write_table(t.replace_schema_metadata(kv), p)
    (run / "manifest.json").write_text(json.dumps(m))
    code, out, err = cli(capsys, "info", str(run))
    assert code == 0, err
    assert "summaries unverified" in " ".join(out.split())
    assert _loads_total(run, capsys)[0] == want


@pytest.mark.parametrize("command", ["analyze", "report", "query", "place"])
def test_a_manifest_with_too_few_experts_is_refused(run, capsys, tmp_path, command):
    m = json.loads((run / "manifest.json").read_text())
    m["geometry"]["num_experts"] = 8  # the routes hold ids up to 15
    (run / "manifest.json").write_text(json.dumps(m))
    argv = {"analyze": ["analyze", str(run), "--what", "imbalance"],
            "report": ["report", str(run), "-o", str(tmp_path / "rep")],
            "query": ["query", str(run), "SELECT count(*) FROM loads"],
            "place": ["place", str(run), "--nodes", "1", "--gpus-per-node", "2", "-o", str(tmp_path / "pl")]}[command]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "num_experts 8" in err and "expert id 15" in err, err
    assert not (tmp_path / "rep").exists() and not (tmp_path / "pl").exists()
