"""A fake SGLang HTTP server for the router's tests and benchmark: records what arrives, answers like SGLang.

POST /generate, /v1/completions, /v1/chat/completions: records (path, raw body, headers, routed_dp_rank) and
answers JSON with ``meta_info`` / ``usage`` token counts, or, when the body has ``"stream": true``, an SSE stream
of ``chunks`` events (``data: {...}\\n\\n``) ending with ``data: [DONE]``. Test controls in the body's
``"fake"`` object: ``chunks`` (default 3), ``gap`` (seconds between chunks), ``gate`` (an event name: after the
first chunk, wait until the test sets that event), ``die`` (abort the connection after the first chunk), ``sleep`` (seconds to wait before answering).
GET /get_server_info: model_path and dp_size. Run as a script: ``python _fake_sglang.py PORT [MODEL] [DP]``.
"""
from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


class FakeSGLang:
    def __init__(self, model_path: str = "fake/model", dp_size: int = 4, record: bool = True):
        self.model_path = model_path
        self.dp_size = dp_size
        self.record = record
        self.seen: list[dict] = []
        self.gates: dict[str, asyncio.Event] = {}

    health = 200  # what GET /health answers

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        obj = json.loads(raw)
        rank = obj.get("routed_dp_rank")
        if self.record:
            self.seen.append({"path": request.path, "body": raw, "headers": dict(request.headers), "rank": rank})
        fake = obj.get("fake") or {}
        meta = {"prompt_tokens": 7, "completion_tokens": int(fake.get("chunks", 3)), "dp_rank": rank}
        if fake.get("sleep"):
            await asyncio.sleep(float(fake["sleep"]))
        if not obj.get("stream"):
            if request.path == "/generate":
                return web.json_response({"text": "ok", "meta_info": meta})
            return web.json_response({"id": "x", "choices": [{"index": 0, "text": "ok"}],
                                      "usage": {"prompt_tokens": 7, "completion_tokens": meta["completion_tokens"]}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = int(fake.get("chunks", 3))
        for i in range(n):
            event = {"index": i, "text": f"t{i}", "meta_info": {**meta, "completion_tokens": i + 1}}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            if i == 0 and fake.get("die"):
                request.transport.abort()
                return resp
            if i == 0 and fake.get("gate"):
                await self.gate(fake["gate"]).wait()
            if fake.get("gap"):
                await asyncio.sleep(float(fake["gap"]))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health_page(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health)

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.model_path, "dp_size": self.dp_size})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 28)
        for p in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(p, self.handle)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/health", self.health_page)
        return app


async def start(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (port 0: a free one); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, runner.addresses[0][1]


if __name__ == "__main__":
    fake = FakeSGLang(*(sys.argv[2:3] or ["fake/model"]), int(sys.argv[3]) if len(sys.argv) > 3 else 4, record=False)
    web.run_app(fake.app(), host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: print("ready", flush=True),
                access_log=None)
