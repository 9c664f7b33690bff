"""`tracekit route`: serve a grouping file as an HTTP proxy in front of SGLang (request -> DP rank)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import app


def _upstream_info(upstream: str, timeout: float = 2.0) -> dict:
    """SGLang's ``/get_server_info`` (model_path, dp_size) when the upstream answers now; {} otherwise."""
    import urllib.error
    import urllib.request

    for path in ("/get_server_info", "/get_model_info"):
        try:
            with urllib.request.urlopen(upstream.rstrip("/") + path, timeout=timeout) as r:
                d = json.loads(r.read() or b"{}")
                if isinstance(d, dict):
                    return d
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return {}


def parse_listen(listen: str) -> tuple[str, int]:
    from ..errors import TracekitError

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise TracekitError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


@app.command("route")
def route_cmd(
    grouping: Path = typer.Option(..., "--grouping", help="Grouping file written by tracekit export --format grouping."),
    upstream: str = typer.Option(..., "--upstream", help="SGLang server URL, e.g. http://127.0.0.1:30000."),
    listen: str = typer.Option("127.0.0.1:8000", "--listen", help="HOST:PORT to serve on (default: loopback only; "
                               "0.0.0.0:8000 serves every interface, with no authentication: firewall it)."),
    dp_size: Optional[int] = typer.Option(None, "--dp-size", min=1, max=1 << 20, help="SGLang's --dp-size (checked against the placement's GPUs; default: asked from the upstream)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model the upstream serves (checked against the grouping; default: asked from the upstream)."),
    max_concurrency: int = typer.Option(1024, "--max-concurrency", help="Requests forwarded at once; more wait for a slot."),
    queue_timeout: float = typer.Option(30.0, "--queue-timeout", help="Seconds a request may wait for a slot before a 503."),
    connect_timeout: float = typer.Option(5.0, "--connect-timeout", help="Seconds to connect to the upstream (502/504 after)."),
    read_timeout: float = typer.Option(600.0, "--read-timeout", help="Longest silence from the upstream, in seconds, before the request fails."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body accepted (413 above); "
                                      "at most --max-concurrency bodies are held at once."),
    header_timeout: float = typer.Option(30.0, "--header-timeout", help="Seconds for a request's line and headers "
                                         "to arrive, and for an idle kept-alive connection (closed after)."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", help="Seconds for a request's whole body to arrive "
                                       "once it holds a slot (408 after)."),
    sample_routed: float = typer.Option(0.0, "--sample-routed", help="Share (0..1) of non-streaming requests whose "
                                        "routed experts are asked of SGLang (return_routed_experts; the server needs "
                                        "--enable-return-routed-experts) and spooled for tracekit watch --spool."),
    spool: Optional[Path] = typer.Option(None, "--spool", help="Folder the sampled responses go to (with --sample-routed)."),
) -> None:
    """Forward /generate, /v1/completions and /v1/chat/completions to SGLang, adding routed_dp_rank: the least
    loaded DP rank on the nodes of the request's group (its prompt classified online). /healthz, /metrics."""
    from ..errors import TracekitError
    from ..route.server import RouteOptions, serve
    from ..route.table import check_dp_size, check_model, load_route_table

    table = load_route_table(grouping)
    host, port = parse_listen(listen)
    if not upstream.startswith(("http://", "https://")):
        raise TracekitError(f"--upstream {upstream!r}: expected an http:// or https:// URL")
    for name, v in (("--max-concurrency", max_concurrency), ("--queue-timeout", queue_timeout),
                    ("--connect-timeout", connect_timeout), ("--read-timeout", read_timeout), ("--max-body-mb", max_body_mb),
                    ("--header-timeout", header_timeout), ("--body-timeout", body_timeout)):
        if not (0 < v < float("inf")):
            raise TracekitError(f"{name} must be positive and finite (got {v})")
    if not 0.0 <= sample_routed <= 1.0:
        raise TracekitError(f"--sample-routed must be a share in 0..1 (got {sample_routed})")
    if sample_routed > 0 and spool is None:
        raise TracekitError("--sample-routed needs --spool FOLDER (where tracekit watch --spool reads the responses)")
    check_dp_size(table, dp_size)
    check_model(table, model)
    info = {} if (dp_size is not None and model is not None) else _upstream_info(upstream)
    if dp_size is None and info.get("dp_size") is not None:
        check_dp_size(table, int(info["dp_size"]))
    if model is None:
        check_model(table, info.get("model_path") or info.get("served_model_name"))
    if not info and (dp_size is None or model is None):
        typer.echo(f"note: {upstream} did not answer /get_server_info now; DP size and model not checked against it",
                   err=True)
    opts = RouteOptions(upstream=upstream, max_concurrency=max_concurrency, queue_timeout=queue_timeout,
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        max_body_bytes=int(max_body_mb * 2**20), header_timeout=header_timeout,
                        body_timeout=body_timeout, sample_routed=sample_routed,
                        spool=str(spool) if spool is not None else None)
    typer.echo(f"tracekit route: {table.kind} grouping over {table.dp_size} DP ranks "
               f"({table.nodes} nodes x {table.gpus_per_node}), {len(table.group_ranks)} groups; "
               f"http://{host}:{port} -> {upstream}", err=True)
    try:
        serve(table, opts, host, port)
    except OSError as exc:
        raise TracekitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
