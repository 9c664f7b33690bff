"""`tracekit watch`: read routing from a running engine, keep a rolling run, serve metrics, propose re-placement."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from . import app
from ._params import positive_float


@app.command("watch")
def watch_cmd(
    server: str = typer.Option(..., "--server", help="The engine's base URL (http://host:port)."),
    engine: Literal["sglang", "vllm"] = typer.Option("sglang", "--engine", help="sglang or vllm (its dispatch scores placements)."),
    placement: Path = typer.Option(..., "--placement", help="The deployed placement (JSON of tracekit place -o)."),
    out: Path = typer.Option(..., "--out", help="The rolling run (created, or resumed when it is one)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry name or geometry string (default: the placement's layers and experts with --top-k)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, max=64, help="Experts per token (when --model does not say)."),
    recorder: Literal["per_token", "stat", "off"] = typer.Option("per_token", "--recorder", help="SGLang's --expert-distribution-recorder-mode (off: read the spool only)."),
    dump_dir: Optional[Path] = typer.Option(None, "--dump-dir", help="The server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR (the recorder writes its dumps there)."),
    spool: Optional[Path] = typer.Option(None, "--spool", help="Folder of routed-experts responses (JSONL) written in front of the engine."),
    sample: float = typer.Option(0.1, "--sample", callback=positive_float("--sample", 1.0), help="Share of the time the recorder records, and of spooled requests kept, in (0, 1]."),
    interval: float = typer.Option(10.0, "--interval", callback=positive_float("--interval", 86400.0), help="Seconds per cycle."),
    min_gain: float = typer.Option(0.05, "--min-gain", min=0.0, max=1.0, help="Propose only when the predicted step time drops by at least this share."),
    max_moves: Optional[int] = typer.Option(None, "--max-moves", min=0, max=1 << 20, help="Slots changed per layer, at most."),
    max_move_gb: Optional[float] = typer.Option(None, "--max-move-gb", min=0.0, max=1e9, help="GB of expert copies in all, at most."),
    window: int = typer.Option(256, "--window", min=2, max=1 << 20, help="Requests in the live window that metrics and judgements read."),
    judge_every: int = typer.Option(30, "--judge-every", min=1, max=1 << 20, help="Judge re-placement every this many cycles (and at once on a mix shift)."),
    drift_threshold: float = typer.Option(0.1, "--drift-threshold", min=0.0, max=1.0, help="Mean Jensen-Shannon drift per layer that counts as a mix shift."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The run the deployed placement was fitted on (drift reference; default: the first window)."),
    max_run_mb: float = typer.Option(1024.0, "--max-run-mb", callback=positive_float("--max-run-mb", 1e9), help="Retention: drop the oldest chunks beyond this size."),
    max_age_h: float = typer.Option(24.0, "--max-age-h", callback=positive_float("--max-age-h", 1e6), help="Retention: drop chunks older than this."),
    metrics_port: int = typer.Option(9464, "--metrics-port", min=0, max=65535, help="Prometheus metrics on this port (0: none)."),
    metrics_addr: str = typer.Option("127.0.0.1", "--metrics-addr", help="Address the metrics listen on."),
    cycles: Optional[int] = typer.Option(None, "--cycles", min=1, help="Stop after this many cycles (default: until SIGTERM / Ctrl-C)."),
) -> None:
    """Read routing from a running engine, append it to a rolling run, serve Prometheus metrics, and write a
    proposed placement and move plan when re-placing would cut the predicted step time by --min-gain."""
    import logging
    import signal
    import sys
    import threading

    from ..errors import TracekitError
    from ..importers.geometry import resolve_model
    from ..placement.export import load_placement
    from ..watch.metrics import Metrics
    from ..watch.rolling import RollingRun
    from ..watch.sources import RecorderSource, SpoolSource
    from ..watch.watcher import Watcher, layer_loads

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s watch %(levelname)s %(message)s")
    if not server.startswith(("http://", "https://")):
        raise TracekitError(f"--server {server!r}: give the engine's URL, e.g. http://127.0.0.1:30000")
    dep = load_placement(placement)
    c = dep.cluster
    name, geo = resolve_model(model, num_experts=None if model else c.num_experts, top_k=top_k,
                              moe_layers=None if model else [int(x) for x in dep.layers],
                              num_layers=None if model else dep.meta.get("num_hidden_layers"))
    if geo["num_experts"] != c.num_experts or list(geo["moe_layers"]) != [int(x) for x in dep.layers]:
        raise TracekitError(f"--placement {placement} is for {c.num_experts} experts at layers "
                            f"{[int(x) for x in dep.layers][:4]}..., the model {name!r} differs")
    sources = []
    if recorder != "off" and engine == "sglang":
        if dump_dir is None:
            raise TracekitError("--recorder needs --dump-dir (the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR); "
                                "or --recorder off with --spool")
        sources.append(RecorderSource(server, dump_dir, geo, recorder))
    if spool is not None:
        sources.append(SpoolSource(spool, geo, rate=sample))
    if not sources:
        raise TracekitError("nothing to read: give --dump-dir (SGLang's recorder) or --spool (routed experts)")
    base = None
    if baseline is not None:
        from ..placement.data.traces import load_traces

        base = layer_loads(load_traces([baseline]))
    run = RollingRun(out, model_name=name or "watch", geometry=geo, engine=engine, max_bytes=int(max_run_mb * 1e6),
                     max_age_s=max_age_h * 3600, args={"server": server, "engine": engine, "placement": str(placement)})
    log = logging.getLogger("tracekit.watch")
    log.info("%s %s: %s, placement %s, sampling %.0f%%, every %gs", "resumed" if run.resumed else "started", out,
             server, placement, 100 * sample, interval)
    metrics = Metrics()
    http = None
    if metrics_port:
        from prometheus_client import start_http_server

        try:
            http, _ = start_http_server(metrics_port, addr=metrics_addr, registry=metrics.registry)
        except OSError as exc:
            raise TracekitError(f"--metrics-port {metrics_port}: cannot listen ({exc.strerror or exc})") from None
        log.info("metrics on http://%s:%d/metrics", metrics_addr, http.server_port)
    w = Watcher(sources, run, dep, engine=engine, min_gain=min_gain, max_moves=max_moves, max_move_gb=max_move_gb,
                window_requests=window, judge_every=judge_every, drift_threshold=drift_threshold, baseline=base,
                metrics=metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cycles is not None:
        threading.Thread(target=_stop_after, args=(w, cycles, stop), daemon=True).start()
    try:
        w.loop(stop, interval, rate=sample if recorder != "off" else 0.0)
    finally:
        run.close()
        if http is not None:
            http.shutdown()
        log.info("stopped: %s holds %.1f MB", out, run.bytes() / 1e6)


def _stop_after(w, cycles: int, stop) -> None:
    while not stop.is_set() and w.cycles < cycles:
        stop.wait(0.05)
    stop.set()
