"""Trace a model that is already being served: send prompts to SGLang or vLLM, write the routes they return.

The server must record routing per request:

- SGLang: ``python -m sglang.launch_server ... --enable-return-routed-experts``; each request goes to
  ``POST /generate`` with ``"return_routed_experts": true`` and comes back with ``meta_info["routed_experts"]``.
- vLLM: ``vllm serve ... --enable-return-routed-experts``; each request goes to ``POST /v1/completions`` with
  ``"return_token_ids": true`` (for the prompt length) and comes back with ``choices[0]["routed_experts"]``.

Responses are decoded by :mod:`tracekit.importers.routed_experts` (the same code as ``tracekit import
routed-experts``) and written through the store; the run appears at ``out`` only when every prompt succeeded.
Prompts are sent as given (apply a chat template before, if the model needs one). Uses only the standard
library's ``urllib`` and a thread pool: requests are I/O bound, the server does the batching.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from .errors import TracekitError
from .importers.geometry import resolve_model
from .importers.routed_experts import RoutesBatcher, add_notes, parse_response
from .importers.staging import StagedRun
from .jsonlines import loads_strict
from .store import read_manifest

ENGINES = ("sglang", "vllm")


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return _send(req, timeout)


def _send(req: urllib.request.Request, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace").replace("\n", " ")
        raise TracekitError(f"{req.full_url}: HTTP {exc.code} ({detail})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TracekitError(f"cannot reach {req.full_url} ({reason}); is the server running?") from None
    try:
        return loads_strict(data)
    except json.JSONDecodeError:
        raise TracekitError(f"{req.full_url}: the server answered something that is not JSON") from None
    except (ValueError, RecursionError) as exc:
        raise TracekitError(f"{req.full_url}: the server's JSON holds a bad number ({str(exc)[:80]})") from None


def served_model_name(base_url: str, timeout: float = 30.0) -> str | None:
    """First model id listed by an OpenAI-compatible server's ``GET /v1/models`` (None if it lists none)."""
    data = _send(urllib.request.Request(base_url.rstrip("/") + "/v1/models"), timeout)
    models = data.get("data") if isinstance(data, dict) else None
    return models[0].get("id") if models else None


def request_body(engine: str, text: str, *, max_new_tokens: int, temperature: float, served_model: str | None,
                 extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one generation request that asks for routed experts."""
    if engine == "sglang":
        body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": temperature},
                "return_routed_experts": True}
        path = "/generate"
    elif engine == "vllm":
        body = {"prompt": text, "max_tokens": max_new_tokens, "temperature": temperature, "return_token_ids": True}
        if served_model:
            body["model"] = served_model
        path = "/v1/completions"
    else:
        raise TracekitError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    body.update(extra or {})
    return path, body


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]server"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def collect_from_server(
    url: str,
    prompts: Sequence[Any],
    out: str | os.PathLike,
    *,
    engine: str = "sglang",
    model: str | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    moe_layers: str | list[int] | None = None,
    num_layers: int | None = None,
    dataset: str = "server",
    concurrency: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    served_model: str | None = None,
    timeout: float = 600.0,
    keep_responses: bool = False,
    extra_body: dict[str, Any] | None = None,
    progress: bool = True,
    chunk_requests: int = 256,
) -> dict[str, Any]:
    """Send ``prompts`` to a running server and write the run at ``out``.

    ``prompts`` are ``(prompt_id, text, domain)`` tuples or objects with those attributes
    (:class:`tracekit.datasets.Prompt`).

    ``model`` and the geometry keywords resolve as in :func:`tracekit.importers.geometry.resolve_model`.
    ``request_id`` is the prompt's index in ``prompts``. With ``keep_responses`` the raw responses are kept in
    ``out/server_responses.jsonl`` (re-importable with ``tracekit import routed-experts``). Returns the manifest.
    """
    if engine not in ENGINES:
        raise TracekitError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    prompts = [(p.prompt_id, p.text, p.domain) if hasattr(p, "text") else tuple(p) for p in prompts]
    if not prompts:
        raise TracekitError("no prompts to send")
    if concurrency < 1 or max_new_tokens < 1:
        raise TracekitError("--concurrency and --max-new-tokens must be at least 1")
    name, geometry = resolve_model(model, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                                   num_layers=num_layers)
    base = url.rstrip("/")
    if engine == "vllm" and served_model is None:
        served_model = served_model_name(base, timeout)
    domains = sorted({d for _, _, d in prompts})
    args = {"url": url, "engine": engine, "model": model, "concurrency": concurrency, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "served_model": served_model, "prompts": len(prompts)}
    ds = {"name": dataset, "domain": domains[0] if len(domains) == 1 else "mixed", "prompts": len(prompts)}

    def one(i: int) -> tuple[int, dict[str, Any]]:
        pid, text, domain = prompts[i]
        path, body = request_body(engine, text, max_new_tokens=max_new_tokens, temperature=temperature,
                                  served_model=served_model, extra=extra_body)
        return i, {"prompt_id": pid, "domain": domain, "response": _post(base + path, body, timeout)}

    t0 = time.perf_counter()
    with StagedRun(out, kind="routes", source=f"server:{engine}", model_name=name, geometry=geometry, dataset=ds,
                   args=args) as staged:
        batcher = RoutesBatcher(staged, chunk_requests=chunk_requests)
        raw = open(staged.tmp / "server_responses.jsonl", "w", encoding="utf-8") if keep_responses else None
        tokens = 0
        try:
            with _progress(progress) as bar, ThreadPoolExecutor(max_workers=concurrency) as pool:
                task = bar.add_task("requests", total=len(prompts), tps="")
                pending = {pool.submit(one, i) for i in range(len(prompts))}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        if fut.exception() is not None:
                            for p in pending:
                                p.cancel()
                            raise fut.exception()
                        i, wrapped = fut.result()
                        where = f"{base} prompt {prompts[i][0]!r}"
                        for req in parse_response(wrapped, geometry, where):
                            batcher.add(req, where, request_id=i)
                            tokens += req.experts.shape[0] + 1
                        if raw is not None:
                            raw.write(json.dumps(wrapped) + "\n")
                        rate = tokens / max(time.perf_counter() - t0, 1e-9)
                        bar.update(task, advance=1, tps=f"{rate:,.0f} tok/s")
            batcher.flush()
        finally:
            if raw is not None:
                raw.close()
        add_notes(staged)
        staged.extra["import_counts"] = dict(batcher.totals)
        staged.extra["server_seconds"] = round(time.perf_counter() - t0, 3)
    return read_manifest(Path(out)) or {}
