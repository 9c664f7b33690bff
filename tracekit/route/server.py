"""The proxy: aiohttp server in front of one SGLang HTTP endpoint, adding a DP rank to every generation request.

Per request: read the body (a JSON object), keep a rank the client already gave (``X-Data-Parallel-Rank`` header,
``routed_dp_rank`` or ``data_parallel_rank``), else classify the prompt text into its group and pick the least
loaded DP rank on the group's nodes; insert ``routed_dp_rank`` (:func:`tracekit.route.body.insert_rank`); forward
with the client's headers (hop-by-hop headers, Host and Content-Length aside); relay the response. A response
without Content-Length, or an SSE stream, is relayed chunk by chunk as it arrives (``iter_any``: no buffering).

Bounded resources (nginx's model): a request takes its concurrency slot *before* its body is read, so at most
``max_concurrency`` bodies of at most ``max_body_bytes`` are held at once (a waiting request holds only aiohttp's
read buffer: the socket is not read while the handler waits). A Content-Length above the limit gets 413 before a
byte of the body is read; a chunked body is cut off at the limit. The request line and headers must arrive within
``header_timeout`` (also the idle time of a kept-alive connection; nginx ``client_header_timeout``), the whole body
within ``body_timeout`` (408; nginx ``client_body_timeout`` counts between reads, this counts the whole body, so a
one-byte drip cannot hold a slot). Bodies above :data:`THREAD_PARSE_BYTES` are parsed and classified in a worker
thread, and the classifier reads a bounded part of any batch (:meth:`RouteTable.label_of`), so one huge request
does not stall the event loop. ``/healthz`` asks the upstream's ``/health`` (cached :data:`HEALTH_TTL` s) and answers
503 when it is unreachable or unhealthy.

Faults stay per request: an upstream that refuses or drops the connection before answering gives that client a
502 (a timeout: 504); one that dies mid-stream ends that client's stream with an SSE error event (for SSE) and an
aborted connection, so the client sees an incomplete response rather than a clean end. Concurrency is bounded
(``max_concurrency``; a request waiting longer than ``queue_timeout`` for a slot gets 503).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..watch.sampler import keep
from .balancer import Balancer
from .body import RANK_HEADER, BadRequest, carried_rank, insert_rank, parse_object, prompt_texts
from .metrics import RouteMetrics, token_counts
from .table import UNROUTED, RouteTable

PROXIED = ("/generate", "/v1/completions", "/v1/chat/completions")
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
))
# aiohttp's client adds these unless told not to; the proxy sends the client's own headers only
SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass
class RouteOptions:
    upstream: str
    max_concurrency: int = 1024
    queue_timeout: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest wait for the next bytes from the upstream
    max_body_bytes: int = 64 * 2**20
    header_timeout: float = 30.0  # request line + headers, and a kept-alive connection's idle time
    body_timeout: float = 60.0  # the whole request body, from the moment the request holds a slot
    #: share of requests (0..1) whose routed experts are asked of the engine and spooled for ``tracekit watch
    #: --spool`` (:class:`tracekit.watch.sampler.RoutedSampler`); 0: none, the body is forwarded untouched
    sample_routed: float = 0.0
    spool: str | None = None
    engine: str = "sglang"


THREAD_PARSE_BYTES = 1 << 20  # bodies above this are parsed and classified off the event loop
HEALTH_TTL = 1.0  # seconds a /healthz answer about the upstream is reused


def error_response(status: int, message: str) -> web.Response:
    """One-line JSON error in the OpenAI shape: ``{"error": {"message", "type", "code"}}``."""
    body = json.dumps({"error": {"message": message, "type": "tracekit_route", "code": status}}) + "\n"
    return web.Response(status=status, text=body, content_type="application/json")


class Router:
    """State of one proxy: the table, the balancer, the metrics, the upstream session."""

    def __init__(self, table: RouteTable, opts: RouteOptions):
        self.table = table
        self.opts = opts
        self.upstream = opts.upstream.rstrip("/")
        self.balancer = Balancer(table.dp_size)
        self.metrics = RouteMetrics()
        self.slots = asyncio.Semaphore(opts.max_concurrency)
        self.session: aiohttp.ClientSession | None = None
        self._health: tuple[float, int, dict] | None = None  # (time, status, upstream part) of the last probe
        self.sampler = None
        if opts.sample_routed > 0 and opts.spool:
            from ..watch.sampler import RoutedSampler

            self.sampler = RoutedSampler(opts.spool, opts.sample_routed, opts.engine)
        self._requests = 0  # a per-process request number: the sampling key

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.opts.max_concurrency, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.opts.connect_timeout,
                                          sock_read=self.opts.read_timeout),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO,
        )

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        if self.sampler is not None:
            self.sampler.flush()  # the last, partial spool file becomes readable

    # ---------------------------------------------------------------------------------------------- decisions

    def given_rank(self, obj: dict, header: str | None) -> int | None:
        """The rank the client already chose (validated against the DP size), or None."""
        given = carried_rank(obj, header)
        if given is not None and not 0 <= given < self.table.dp_size:
            raise BadRequest(f"DP rank {given} is outside 0..{self.table.dp_size - 1}")
        return given

    def choose(self, path: str, obj: dict) -> tuple[int, str, str]:
        """(rank, group label, source) for a request without a rank: classify, then the least loaded group rank."""
        try:
            label = self.table.label_of(prompt_texts(path, obj))
        except (ValueError, UnicodeError):  # text the classifier cannot read (e.g. lone surrogates): any rank
            label = UNROUTED
        if label != UNROUTED:
            self.metrics.child(self.metrics.decisions, label).inc()
        ranks = self.table.ranks_of(label)
        return self.balancer.pick(ranks), label, "classifier" if label in self.table.group_ranks else "any"

    # ---------------------------------------------------------------------------------------------- handlers

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        m = self.metrics
        size = request.content_length
        if size is not None and size > self.opts.max_body_bytes:  # refused before a byte of the body is read
            m.child(m.rejected, "too_large").inc()
            return _closing(error_response(413, f"body of {size} bytes is over the limit of "
                                                f"{self.opts.max_body_bytes} bytes (--max-body-mb)"))
        try:  # the slot first: a request waiting for one holds no body in memory
            await asyncio.wait_for(self.slots.acquire(), self.opts.queue_timeout)
        except asyncio.TimeoutError:
            m.child(m.rejected, "concurrency_limit").inc()
            return error_response(503, f"proxy at its concurrency limit ({self.opts.max_concurrency}) for "
                                       f"{self.opts.queue_timeout:g} s; retry later")
        try:
            return await self._proxy_holding_slot(request, t0)
        finally:
            self.slots.release()
            m.child(m.latency, request.path).observe(time.perf_counter() - t0)

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, read under the size limit and the body deadline (:class:`BodyRefused` past either)."""
        limit, buf = self.opts.max_body_bytes, bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.body_timeout
        while True:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(request.content.readany(), left)
            except asyncio.TimeoutError:
                raise BodyRefused(408, f"request body not received within {self.opts.body_timeout:g} s") from None
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise BodyRefused(413, f"body is over the limit of {limit} bytes (--max-body-mb)")

    def decide(self, path: str, raw: bytes, header: str | None) -> tuple[dict, int, str, str, bytes]:
        """(object, rank, label, source, body to forward) of a request; :class:`BadRequest` for a bad one."""
        obj = parse_object(raw)
        given = self.given_rank(obj, header)
        if given is not None:  # a header-only rank goes into the body too (native /generate reads no header)
            in_body = obj.get("routed_dp_rank") is not None or obj.get("data_parallel_rank") is not None
            return obj, given, "client", "client", raw if in_body else insert_rank(raw, obj, given)
        rank, label, source = self.choose(path, obj)
        return obj, rank, label, source, insert_rank(raw, obj, rank)

    async def _proxy_holding_slot(self, request: web.Request, t0: float) -> web.StreamResponse:
        path = request.path
        m = self.metrics
        try:
            raw = await self.read_body(request)
        except BodyRefused as exc:
            m.child(m.rejected, "too_large" if exc.status == 413 else "body_timeout").inc()
            return _closing(error_response(exc.status, str(exc)))
        header = request.headers.get(RANK_HEADER)
        try:
            if len(raw) > THREAD_PARSE_BYTES:
                _, rank, label, source, body = await asyncio.to_thread(self.decide, path, raw, header)
            else:
                _, rank, label, source, body = self.decide(path, raw, header)
        except BadRequest as exc:
            m.child(m.rejected, "bad_request").inc()
            return error_response(400, str(exc))
        del raw
        sampled, body = self.sample(body)
        self.balancer.start(rank)
        m.child(m.inflight, str(rank)).inc()
        m.child(m.requests, path, label, str(rank), source).inc()
        try:
            return await self._forward(request, path, body, label, rank, sampled)
        finally:
            self.balancer.finish(rank)
            m.child(m.inflight, str(rank)).dec()

    def sample(self, body: bytes) -> tuple[str | None, bytes]:
        """(sampling key or None, body to forward): a sampled non-streaming request asks the engine for its routed
        experts (the sampler's flag added to the body); every other body goes on byte for byte. A streamed response
        is not sampled (its routed experts would come in pieces)."""
        if self.sampler is None:
            return None, body
        self._requests += 1
        key = f"{os.getpid()}-{self._requests}"
        if not keep(key, self.sampler.rate):
            return None, body
        obj = json.loads(body)
        if obj.get("stream"):
            return None, body
        self.sampler.prepare(obj, key)
        return key, json.dumps(obj).encode()

    def record(self, key: str | None, data: bytes, status: int, label: str) -> None:
        """Spool a sampled request's answer (an unreadable or failed one is skipped: the engine answered no routing)."""
        if key is None or self.sampler is None or status != 200:
            return
        try:
            self.sampler.record(key, json.loads(data), domain=label)
        except ValueError:
            return

    async def _forward(self, request: web.Request, path: str, body: bytes, label: str, rank: int,
                       sampled: str | None = None):
        m = self.metrics
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        url = self.upstream + request.path_qs
        assert self.session is not None
        try:
            ctx = self.session.request(request.method, url, data=body, headers=headers)
            up = await ctx.__aenter__()
        except asyncio.TimeoutError:
            m.child(m.upstream_errors, path, "timeout").inc()
            return error_response(504, f"upstream {self.upstream} did not answer within {self.opts.connect_timeout:g} s "
                                       f"(connect) / {self.opts.read_timeout:g} s (read)")
        except aiohttp.ClientError as exc:
            m.child(m.upstream_errors, path, "connect").inc()
            return error_response(502, f"upstream {self.upstream} unreachable: {type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}")
        try:
            out_headers = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP]
            ctype = up.headers.get("Content-Type", "")
            streaming = ctype.startswith("text/event-stream") or up.headers.get("Content-Length") is None
            if not streaming:
                try:
                    data = await up.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    m.child(m.upstream_errors, path, "midstream").inc()
                    return error_response(502, f"upstream {self.upstream} failed while answering: {type(exc).__name__}")
                self._count_tokens(token_counts(data), label, rank)
                self.record(sampled, data, up.status, label)
                resp = web.Response(status=up.status, body=data)
                for k, v in out_headers:
                    resp.headers.add(k, v)
                return resp
            return await self._relay(request, up, out_headers, ctype, path, label, rank)
        finally:
            await ctx.__aexit__(None, None, None)

    async def _relay(self, request, up, out_headers, ctype, path, label, rank):
        """Relay a streamed upstream body chunk by chunk; on upstream death, end the client's stream as broken."""
        m = self.metrics
        resp = web.StreamResponse(status=up.status)
        for k, v in out_headers:
            resp.headers.add(k, v)
        await resp.prepare(request)
        tail = b""
        seen: dict[str, int] = {}
        try:
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
                seen.update(token_counts(tail + chunk))
                tail = chunk[-64:]
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError,
                asyncio.TimeoutError) as exc:
            if isinstance(exc, (ConnectionResetError,)) or request.transport is None or request.transport.is_closing():
                return resp  # the client left; nothing to tell it
            m.child(m.upstream_errors, path, "midstream").inc()
            if ctype.startswith("text/event-stream"):
                msg = json.dumps({"error": {"message": f"upstream connection lost mid-stream ({type(exc).__name__})",
                                            "type": "tracekit_route", "code": 502}})
                try:
                    await resp.write(f"data: {msg}\n\n".encode())
                except ConnectionError:
                    pass
            request.transport.abort()  # no terminating chunk: the client sees an incomplete response
            self._count_tokens(seen, label, rank)
            return resp
        except ConnectionError:  # writing to a client that went away
            return resp
        self._count_tokens(seen, label, rank)
        await resp.write_eof()
        return resp

    def _count_tokens(self, counts: dict[str, int], label: str, rank: int) -> None:
        for key, kind in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
            if counts.get(key):
                self.metrics.child(self.metrics.tokens, label, str(rank), kind).inc(counts[key])

    async def upstream_health(self) -> tuple[int, dict]:
        """(HTTP status for /healthz, the upstream's part): 200 when its ``/health`` answers 2xx, else 503."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_TTL:
            return self._health[1], self._health[2]
        assert self.session is not None
        limit = min(self.opts.connect_timeout, 5.0)
        try:
            async with self.session.get(self.upstream + "/health", timeout=aiohttp.ClientTimeout(total=limit)) as r:
                await r.read()
                state = {"url": self.upstream, "state": "ok" if r.status < 300 else "unhealthy", "http_status": r.status}
        except asyncio.TimeoutError:
            state = {"url": self.upstream, "state": "unreachable", "detail": f"no answer within {limit:g} s"}
        except aiohttp.ClientError as exc:
            state = {"url": self.upstream, "state": "unreachable", "detail": type(exc).__name__}
        status = 200 if state["state"] == "ok" else 503
        self._health = (now, status, state)
        return status, state

    async def healthz(self, request: web.Request) -> web.Response:
        t = self.table
        status, up = await self.upstream_health()
        return web.json_response({
            "status": "ok" if status == 200 else "upstream " + up["state"], "upstream": up, "grouping": t.kind,
            "dp_size": t.dp_size, "groups": {k: v for k, v in t.group_ranks.items()},
            "inflight": list(self.balancer.inflight),
        }, status=status)

    async def metrics_page(self, request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def unknown(self, request: web.Request) -> web.Response:
        self.metrics.child(self.metrics.rejected, "unknown_path").inc()
        if request.path in PROXIED:
            return error_response(405, f"{request.method} {request.path}: use POST")
        return error_response(404, f"unknown path {request.path}; the router serves POST {', '.join(PROXIED)}, "
                                   "GET /healthz and GET /metrics")


class BodyRefused(Exception):
    """A request body over the size limit (413) or not received in time (408)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _closing(resp: web.Response) -> web.Response:
    """``resp`` answered on a connection that is then closed (its unread body is not drained)."""
    resp.force_close()
    return resp


ROUTER = web.AppKey("router", Router)


def make_app(table: RouteTable, opts: RouteOptions) -> web.Application:
    """The aiohttp application of one router (start it with ``web.AppRunner`` or :func:`serve`)."""
    router = Router(table, opts)
    # keepalive_timeout bounds the wait for a request's headers too (aiohttp arms it when the connection opens and
    # closes a connection that has not delivered a complete request by then); lingering_time bounds draining the
    # unread body of a refused request
    app = web.Application(client_max_size=opts.max_body_bytes, handler_args={
        "keepalive_timeout": opts.header_timeout, "lingering_time": min(opts.header_timeout, 2.0)})
    app[ROUTER] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    for p in PROXIED:
        app.router.add_post(p, router.proxy)
    app.router.add_get("/healthz", router.healthz)
    app.router.add_get("/metrics", router.metrics_page)
    app.router.add_route("*", "/{tail:.*}", router.unknown)
    return app


def serve(table: RouteTable, opts: RouteOptions, host: str, port: int) -> None:
    """Run the router until interrupted."""
    web.run_app(make_app(table, opts), host=host, port=port, print=None, access_log=None)
