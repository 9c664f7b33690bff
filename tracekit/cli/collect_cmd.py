"""`tracekit collect`, `tracekit info`, `tracekit models`, `tracekit datasets`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import app

console = Console(stderr=True)
out_console = Console()


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
    limit: Optional[int] = typer.Option(None, help="Sample this many prompts (seeded)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    max_new_tokens: int = typer.Option(64, help="Decode tokens recorded per request (fewer if EOS comes first)."),
    batch_size: int = typer.Option(8, help="Requests per generate() call."),
    chunk_requests: int = typer.Option(64, help="Requests per Parquet file (the unit of resume)."),
    data_file: Optional[Path] = typer.Option(None, help="Local JSONL/Parquet with the dataset config's fields."),
    device_map: Optional[str] = typer.Option(None, help="accelerate device_map, e.g. auto, cuda:0, cpu."),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16, float32."),
    max_memory: Optional[str] = typer.Option(None, help="Per-device memory caps, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the checkpoint."),
    layers: Optional[int] = typer.Option(None, help="Depth of a tiny preset (real checkpoints keep theirs)."),
    weights: str = typer.Option("float16", help="Gate weights as float16, float32, or none (ids only)."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template."),
    do_sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (with --sample)."),
    ignore_eos: bool = typer.Option(False, help="Always decode --max-new-tokens tokens."),
    server: Optional[str] = typer.Option(None, help="Trace a running SGLang/vLLM server (started with --enable-return-routed-experts) instead of a local model."),
    engine: str = typer.Option("sglang", help="With --server: sglang or vllm."),
    concurrency: int = typer.Option(8, help="With --server: requests in flight."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
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
                          f"-> {out}")
        return
    from ..collect import CollectOptions
    from ..collect import collect as run_collect

    opts = CollectOptions(
        model=model, dataset=dataset, out=out, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
        batch_size=batch_size, chunk_requests=chunk_requests, data_file=data_file, device_map=device_map,
        dtype=dtype, max_memory=max_memory, revision=revision, layers=layers, weights=weights,
        chat_template=chat_template, do_sample=do_sample, temperature=temperature, ignore_eos=ignore_eos,
    )
    bar = Progress(
        TextColumn("[bold]collect[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not progress,
    )
    task = bar.add_task("collect", total=None, tps="-")
    t0 = time.perf_counter()

    def on_progress(done: int, total: int, tokens: int) -> None:
        if not bar.live.is_started:  # start only once the work starts, so early errors print alone
            bar.start()
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        bar.update(task, completed=done, total=total, tps=f"{rate:,.0f}")

    try:
        result = run_collect(opts, on_progress=on_progress)
    finally:
        bar.stop()
    _summary(result)


def _summary(result) -> None:
    m = result.manifest
    t = m.get("totals", {}).get("routes", {})
    table = Table(title=f"run {m['run_id']}", show_header=True)
    table.add_column("")
    table.add_column("this call", justify="right")
    table.add_column("whole run", justify="right")
    table.add_row("requests", f"{result.requests_done_now:,}", f"{t.get('requests', '-'):,}" if t else "-")
    table.add_row("prompt tokens", "", f"{t.get('prompt_tokens', 0):,}" if t else "-")
    table.add_row("generated tokens", "", f"{t.get('generated_tokens', 0):,}" if t else "-")
    table.add_row("rows (token x layer)", f"{result.rows_now:,}", f"{t.get('rows', 0):,}" if t else "-")
    table.add_row("bytes on disk", "", _human_bytes(t.get("bytes", 0)) if t else "-")
    table.add_row("time", f"{result.seconds:.1f} s", "")
    table.add_row("status", "", m.get("status", "?"))
    out_console.print(table)
    out_console.print(f"run directory: {result.run_dir}")


@app.command()
def info(run: Path = typer.Argument(..., help="A run directory."), as_json: bool = typer.Option(False, "--json")) -> None:
    """What a run recorded: model geometry, dataset, requests, tokens, rows, files."""
    from ..store import open_run, totals

    r = open_run(run)
    m = dict(r.manifest)
    m["totals"] = totals(r.path)  # from the files, also for an unfinished run
    if as_json:
        print(json.dumps(m, indent=2, default=str))
        return
    g = m.get("geometry", {})
    t = Table(title=f"{run}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    model = m.get("model", {})
    t.add_row("run id", m.get("run_id", ""))
    t.add_row("status", str(m.get("status")))
    t.add_row("source", str(m.get("source")))
    origin = model.get("hub_id") or ("built-in" if str(model.get("name", "")).startswith("tiny-") else None)
    t.add_row("model", str(model.get("name")) + (f"  ({origin}" + (f", rev {model['revision']}" if model.get("revision") else "") + ")" if origin else ""))
    t.add_row("geometry", _geometry_line(g))
    d = m.get("dataset", {})
    t.add_row("dataset", f"{d.get('name')} ({d.get('domain')}), {d.get('prompts', '?')} prompts")
    for kind, tot in m["totals"].items():
        t.add_row(f"{kind}", f"{tot['requests']:,} requests, {tot['prompt_tokens']:,} prompt + {tot['generated_tokens']:,} "
                             f"generated tokens, {tot['rows']:,} rows, {len(tot['files'])} files, {_human_bytes(tot['bytes'])}")
    t.add_row("schema", f"v{m.get('schema_version')}, tracekit {m.get('tracekit_version')}")
    for note in m.get("notes", []):
        t.add_row("note", str(note))
    out_console.print(t)


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


@app.command()
def models(families: bool = typer.Option(False, "--families", help="print the MoE families of the installed "
                                         "transformers and their router contracts, as a markdown table")) -> None:
    """The model registry with each model's routing geometry."""
    from ..models import REGISTRY, load_model
    from ..hooks import find_routers, router_geometry

    if families:
        from ..hooks.families import families_markdown

        print(families_markdown())
        return

    t = Table(title="models")
    for c in ("name", "hub id / source", "layers (MoE)", "E", "k", "routing"):
        t.add_column(c)
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
        t.add_row(spec.name, spec.hub_id or spec.summary, f"{g.get('num_layers')} ({len(g['moe_layers'])} {_layer_span(g['moe_layers'])})",
                  str(g.get("num_experts")), str(g.get("top_k")), routing)
    out_console.print(t)


@app.command()
def datasets() -> None:
    """The dataset registry (datasets_cfg/)."""
    from ..datasets import list_datasets

    t = Table(title="datasets")
    for c in ("name", "domain", "hub id", "split", "prompt", "offline"):
        t.add_column(c)
    for c in list_datasets():
        t.add_row(c.name, c.domain, c.hub_id or "-", c.split, c.prompt_template,
                  "bundled" if c.bundled else "--data-file")
    out_console.print(t)
