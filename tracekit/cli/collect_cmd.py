"""`tracekit collect`, `tracekit info`, `tracekit models`, `tracekit datasets`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from ..errors import TracekitError
from . import app
from ._params import MAX_COUNT, MAX_LAYERS, MAX_SEED, check_device_map, positive_float, server_url

console = Console(stderr=True)
out_console = Console()


def _escaped_add_row(table: Table):
    """``table.add_row`` that shows every cell as plain text: rich would read ``[value]`` in a cell as markup and
    drop it (ShareGPT's template ``{conversations[0]["value"]}`` printed as ``{conversations[0]}``)."""
    add_row = table.add_row

    def add(*cells, **kwargs):
        return add_row(*(escape(c) if isinstance(c, str) else c for c in cells), **kwargs)

    return add


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


@app.command()
def collect(
    model: str = typer.Option("tiny-deepseek-v3", "--model", "-m", help="Registry name, hub id or local path."),
    dataset: str = typer.Option("humaneval", "--dataset", "-d", help="Dataset config name (see `tracekit datasets`)."),
    out: Path = typer.Option(Path("traces/run"), "--out", "-o", help="Run directory (created; resumed if it holds the same run)."),
    limit: Optional[int] = typer.Option(None, min=1, max=MAX_COUNT, help="Sample this many prompts (seeded)."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Sampling seed."),
    max_new_tokens: int = typer.Option(64, min=0, max=1_000_000, help="Decode tokens recorded per request (fewer if EOS comes first)."),
    batch_size: int = typer.Option(8, min=1, max=65536, help="Requests per generate() call."),
    chunk_requests: int = typer.Option(64, min=1, max=MAX_COUNT, help="Requests per Parquet file (the unit of resume)."),
    data_file: Optional[Path] = typer.Option(None, help="Local JSONL/Parquet with the dataset config's fields."),
    device_map: Optional[str] = typer.Option(None, help="accelerate device_map: auto, cpu, cuda, cuda:N (checked before loading)."),
    dtype: Literal["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"] = typer.Option("auto", help="Weights dtype."),
    max_memory: Optional[str] = typer.Option(None, help="Per-device memory caps, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the checkpoint."),
    layers: Optional[int] = typer.Option(None, min=1, max=MAX_LAYERS, help="Depth of a tiny preset (real checkpoints keep theirs)."),
    weights: Literal["float16", "float32", "none"] = typer.Option("float16", help="Gate weights as float16, float32, or none (ids only)."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template."),
    do_sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, callback=positive_float("--temperature", 100.0),
                                      help="Sampling temperature (with --sample), > 0."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Always decode --max-new-tokens tokens."),
    server: Optional[str] = typer.Option(None, callback=server_url, help="Trace a running SGLang/vLLM server (started with --enable-return-routed-experts) instead of a local model."),
    engine: Literal["sglang", "vllm"] = typer.Option("sglang", help="With --server: the engine behind it."),
    concurrency: int = typer.Option(8, min=1, max=4096, help="With --server: requests in flight."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Trace which experts every token uses, in prefill and every decode step, into Parquet."""
    if server:
        from ..datasets import get_dataset, load_prompts
        from ..server_client import collect_from_server

        cfg = get_dataset(dataset)
        prompts = load_prompts(cfg, data_file=data_file, limit=limit, seed=seed)
        manifest = collect_from_server(server, prompts, out, engine=engine, model=model, dataset=cfg.name,
                                       concurrency=concurrency, max_new_tokens=max_new_tokens,
                                       temperature=temperature if do_sample else 0.0, progress=progress)
        t = manifest.get("totals", {}).get("routes", {})
        out_console.print(f"run {manifest['run_id']}: {t.get('requests', 0):,} requests, {t.get('rows', 0):,} rows "
                          f"-> {out}", markup=False, highlight=False)
        return
    from ..collect import CollectOptions
    from ..collect import collect as run_collect

    check_device_map(device_map)

    opts = CollectOptions(
        model=model, dataset=dataset, out=out, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
        batch_size=batch_size, chunk_requests=chunk_requests, data_file=data_file, device_map=device_map,
        dtype=dtype, max_memory=max_memory, revision=revision, layers=layers, weights=weights,
        chat_template=chat_template, do_sample=do_sample, temperature=temperature, ignore_eos=ignore_eos,
    )
    # The ETA is this call's mean rate since tracing started (rich's own estimate needs two updates within its
    # speed window: with one batch per ~10 s it showed -:--:-- for the first batches, and a resumed run's jump
    # from 0 to the requests already done counted as speed).
    bar = Progress(
        TextColumn("[bold]collect[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
        console=console, disable=not progress,
    )
    task = bar.add_task("collect", total=None, tps="-", eta="-:--:--")
    start: list = []  # (time, requests done) when tracing started: the first on_progress call

    def on_progress(done: int, total: int, tokens: int) -> None:
        now = time.perf_counter()
        if not start:
            start.append((now, done))
        if not bar.live.is_started:  # start only once the work starts, so early errors print alone
            bar.start()
        t_start, done_start = start[0]
        rate = tokens / max(now - t_start, 1e-9)
        bar.update(task, completed=done, total=total, tps=f"{rate:,.0f}" if tokens else "-",
                   eta=eta_text(now - t_start, done - done_start, total - done))

    try:
        result = run_collect(opts, on_progress=on_progress)
    finally:
        bar.stop()
    _summary(result)


def eta_text(elapsed: float, done_now: int, left: int) -> str:
    """Time left as H:MM:SS at the mean rate of this call (``done_now`` requests in ``elapsed`` seconds);
    ``-:--:--`` before the first request of this call is done."""
    if left <= 0:
        return "0:00:00"
    if done_now <= 0 or elapsed <= 0:
        return "-:--:--"
    secs = int(round(elapsed / done_now * left))
    return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def _summary(result) -> None:
    m = result.manifest
    t = m.get("totals", {}).get("routes", {})
    table = Table(title=escape(f"run {m['run_id']}"), show_header=True)
    table.add_column("")
    table.add_column("this call", justify="right")
    table.add_column("whole run", justify="right")
    from ..store import list_chunks

    now = list_chunks(result.run_dir, "routes", only=result.chunk_paths) if result.chunk_paths else []  # this call's
    table.add_row("requests", f"{result.requests_done_now:,}", f"{t.get('requests', '-'):,}" if t else "-")
    table.add_row("prompt tokens", f"{sum(c.prompt_tokens for c in now):,}",
                  f"{t.get('prompt_tokens', 0):,}" if t else "-")
    table.add_row("generated tokens", f"{sum(c.generated_tokens for c in now):,}",
                  f"{t.get('generated_tokens', 0):,}" if t else "-")
    table.add_row("rows (token x layer)", f"{result.rows_now:,}", f"{t.get('rows', 0):,}" if t else "-")
    table.add_row("bytes on disk", _human_bytes(sum(c.bytes for c in now)), _human_bytes(t.get("bytes", 0)) if t else "-")
    table.add_row("time", f"{result.seconds:.1f} s", "")
    table.add_row("status", "", m.get("status", "?"))
    out_console.print(table)
    out_console.print(f"run directory: {result.run_dir}", markup=False, highlight=False)


@app.command()
def info(
    run: Path = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's manifest as JSON, with totals from its intact files, live status and the integrity check."),
    verify: bool = typer.Option(False, "--verify", help="Also compare the SHA-256 of every chunk with the manifest "
                                "(reads every byte; by default sizes and Parquet footer row counts are checked)."),
) -> None:
    """What a run recorded: model geometry, dataset, requests, tokens, rows, files, and whether they are intact."""
    from ..runlock import writer_pid
    from ..manifest_check import check_manifest
    from ..store import MANIFEST, open_run, totals, verify_run
    from ._params import check_runs

    if run.is_dir():
        check_runs([run])
    r = open_run(run, allow_partial=True)
    check_manifest(r.manifest, str(r.path / MANIFEST))
    integrity = verify_run(r.path, r.manifest, checksums=True) if verify else r.integrity
    m = dict(r.manifest)
    m.pop("chunks", None)
    m["totals"] = totals(r.path, integrity.good)  # from the intact files, also for an unfinished run
    pid = writer_pid(r.path)
    m["status"] = _live_status(m.get("status"), pid)
    m["writer_pid"] = int(pid) if pid and pid.isdigit() else None
    m["integrity"] = {"state": integrity.state, "checked": integrity.checked,
                      "problems": [vars(p) for p in integrity.problems], "unrecorded": integrity.unrecorded,
                      "summaries": {"state": integrity.summaries.state, "problems": integrity.summaries.problems}}
    damaged = integrity.damaged
    if as_json:
        print(json.dumps(m, indent=2, default=str))
        if damaged:
            raise TracekitError(f"{run}: {integrity.lines()[0]}; the run is damaged")
        return
    g = m.get("geometry", {})
    t = Table(title=escape(str(run)), show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    model = m.get("model", {})
    t.add_row = _escaped_add_row(t)  # manifest text is user data, never rich markup
    t.add_row("run id", m.get("run_id", ""))
    hint = {"interrupted": ": run the same command again to resume",
            "running": f" (pid {m['writer_pid']})" if m.get("writer_pid") else ""}.get(m.get("status"), "")
    t.add_row("status", str(m.get("status")) + hint)
    t.add_row("source", str(m.get("source")))
    origin = model.get("hub_id") or ("built-in" if str(model.get("name", "")).startswith("tiny-") else None)
    t.add_row("model", str(model.get("name")) + (f"  ({origin}" + (f", rev {model['revision']}" if model.get("revision") else "") + ")" if origin else ""))
    t.add_row("geometry", _geometry_line(g))
    d = m.get("dataset", {})
    t.add_row("dataset", f"{d.get('name')} ({d.get('domain')}), {d.get('prompts', '?')} prompts")
    for kind, tot in m["totals"].items():
        t.add_row(f"{kind}", f"{tot['requests']:,} requests, {tot['prompt_tokens']:,} prompt + {tot['generated_tokens']:,} "
                             f"generated tokens, {tot['rows']:,} rows, {len(tot['files'])} file{'s' if len(tot['files']) != 1 else ''}, {_human_bytes(tot['bytes'])}")
    t.add_row("schema", f"v{m.get('schema_version')}, tracekit {m.get('tracekit_version')}")
    t.add_row("integrity", integrity.summary(), style="bold red" if damaged else None)
    for line in integrity.lines()[1:]:
        t.add_row("", line, style="bold red")
    for note in m.get("notes", []):
        t.add_row("note", str(note))
    out_console.print(t)
    if damaged:
        if integrity.problems:
            raise TracekitError(f"{run}: {integrity.problems[0].line()}; the run is damaged (restore the file or "
                                "collect it again; --allow-partial reads the intact chunks)")
        raise TracekitError(f"{run}: {integrity.lines()[0]}; the run's summaries are damaged (the loads and requests "
                            "views fall back to the intact files; restore the file, or collect or import the run again)")


def _live_status(status, pid: str | None) -> str:
    """The manifest's status, corrected by the writer lock: ``running`` with no live writer means interrupted."""
    if status == "running" and pid is None:
        return "interrupted"
    return str(status)


def _geometry_line(g: dict) -> str:
    """One line of routing geometry, naming only what the run knows."""
    moe = g.get("moe_layers") or []
    parts = [f"{g['num_layers']} layers" if g.get("num_layers") else None,
             f"{len(moe)} MoE {_layer_span(moe)}" if moe else None,
             f"E={g['num_experts']}" if g.get("num_experts") else None,
             f"top-{g['top_k']}" if g.get("top_k") else None,
             f"groups {g['topk_group']} of {g['n_group']}" if g.get("n_group") else None,
             f"{g['n_shared_experts']} shared" if g.get("n_shared_experts") else None,
             g.get("scoring")]
    body = ", ".join(p for p in parts if p)
    return f"{g['family']}: {body}" if g.get("family") else body


def _layer_span(layers: list[int]) -> str:
    if not layers:
        return ""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"[{layers[0]}..{layers[-1]}]"
    return "[" + ",".join(map(str, layers[:6])) + (",..]" if len(layers) > 6 else "]")


MODEL_COLUMNS = ("name", "hub id / source", "layers (MoE)", "E", "k", "routing")


def model_rows() -> list[tuple[str, ...]]:
    """One row per registered model (MODEL_COLUMNS): what `tracekit models` prints and the README's table holds.
    Tiny presets are built (in memory, no download) so their geometry is the one their routers really have."""
    from ..hooks import find_routers, router_geometry
    from ..models import REGISTRY, load_model

    rows = []
    for spec in REGISTRY.values():
        g = spec.geometry
        if spec.is_tiny:
            lm = load_model(spec.name)
            g = router_geometry(lm.model, find_routers(lm.model))
        routing = str(g.get("scoring"))
        if g.get("n_group"):
            routing += f", groups {g['topk_group']} of {g['n_group']}"
        if g.get("n_shared_experts"):
            routing += f", {g['n_shared_experts']} shared"
        if g.get("hash_layers"):
            routing += f", hash-routed layers {_layer_span(g['hash_layers'])}"
        rows.append((spec.name, spec.hub_id or spec.summary,
                     f"{g.get('num_layers')} ({len(g['moe_layers'])} {_layer_span(g['moe_layers'])})",
                     str(g.get("num_experts")), str(g.get("top_k")), routing))
    return rows


def models_markdown() -> str:
    """The README's model table: :func:`model_rows` as markdown (`tracekit models --markdown`)."""
    lines = ["<!-- generated by `tracekit models --markdown` -->", "| " + " | ".join(MODEL_COLUMNS) + " |",
             "|" + "---|" * len(MODEL_COLUMNS)]
    for name, *rest in model_rows():
        lines.append("| " + " | ".join([f"`{name}`", *(c.replace("|", "\\|") for c in rest)]) + " |")
    return "\n".join(lines)


@app.command()
def models(families: bool = typer.Option(False, "--families", help="print the MoE families of the installed "
                                         "transformers and their router contracts, as a markdown table"),
           markdown: bool = typer.Option(False, "--markdown", help="print the model table as markdown (the "
                                         "README's)")) -> None:
    """The model registry with each model's routing geometry."""
    if families:
        from ..hooks.families import families_markdown

        print(families_markdown())
        return
    if markdown:
        print(models_markdown())
        return
    t = Table(title="models")
    for c in MODEL_COLUMNS:
        t.add_column(c)
    t.add_row = _escaped_add_row(t)  # layer spans like [1..3] are text, not rich markup
    for row in model_rows():
        t.add_row(*row)
    out_console.print(t)


@app.command()
def datasets() -> None:
    """The dataset registry (datasets_cfg/)."""
    from ..datasets import list_datasets

    t = Table(title="datasets")
    for c in ("name", "domain", "hub id", "split", "prompt", "offline"):
        t.add_column(c)
    t.add_row = _escaped_add_row(t)  # a template like {conversations[0]} is text, not rich markup
    for c in list_datasets():
        t.add_row(c.name, c.domain, c.hub_id or "-", c.split, c.prompt_template,
                  "bundled" if c.bundled else "--data-file")
    out_console.print(t)
