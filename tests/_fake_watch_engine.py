"""A fake SGLang for `watch` tests and its benchmark: the expert-distribution recorder endpoints (per_token dumps
written with torch.save into a dump folder, as SGLang's ranks write them) and /generate returning routed experts.

It replays a queue of requests ``(domain, experts (T, nL, k))``: each dump while recording writes the next
``per_dump`` requests as EXTEND passes (one segment each; physical slot = logical expert); each /generate with
``return_routed_experts`` answers the next request's routing in base64 int32. Runs on 127.0.0.1 in a thread;
``stop()`` and ``start()`` again on the same port model an engine restart."""
from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from aiohttp import web


class FakeRecorderEngine:
    def __init__(self, dump_dir: Path, requests, *, num_layers: int, moe_layers, num_experts: int,
                 per_dump: int = 8):
        self.dump_dir = Path(dump_dir)
        self.queue = deque(requests)
        self.num_layers, self.moe_layers, self.E, self.per_dump = num_layers, list(moe_layers), num_experts, per_dump
        self.recording = False
        self.fp = 0
        self.calls: list[str] = []
        self.port = 0
        self._loop = self._runner = None
        self._thread = None

    # ------------------------------------------------------------------------------------------- handlers
    async def start_rec(self, request):
        self.calls.append("start")
        self.recording = True
        return web.Response(text="Start recording the expert distribution successfully")

    async def stop_rec(self, request):
        self.calls.append("stop")
        self.recording = False
        return web.Response(text="Stop recording the expert distribution successfully")

    async def dump_rec(self, request):
        import torch

        self.calls.append("dump")
        records = []
        n = self.per_dump if self.recording else 0
        for _ in range(min(n, len(self.queue))):
            _, ex = self.queue.popleft()
            t, nl, k = ex.shape
            topk = np.full((self.num_layers, t, 8), -1, dtype=np.int32)
            topk[self.moe_layers, :, :k] = ex.transpose(1, 0, 2)
            records.append({"forward_pass_id": self.fp, "rank": 0, "gatherer_key": "primary",
                            "input_ids": [0] * t, "positions": list(range(t)), "extend_seq_lens": [t],
                            "forward_mode": 1, "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": []})
            self.fp += 1
        p2l = torch.from_numpy(np.tile(np.arange(self.E, dtype=np.int64), (self.num_layers, 1)))
        if records:
            torch.save({"records": records, "last_physical_to_logical_map": p2l},
                       self.dump_dir / f"expert_distribution_recorder_{time.time()}_0.pt")
        return web.Response(text="Dump expert distribution record successfully")

    async def generate(self, request):
        body = await request.json()
        if not self.queue:
            return web.json_response({"error": "no more requests"}, status=503)
        dom, ex = self.queue.popleft()
        t = ex.shape[0]
        p = t // 2
        meta = {"id": f"r{self.fp}", "prompt_tokens": p, "completion_tokens": t - p + 1}
        self.fp += 1
        if body.get("return_routed_experts"):
            meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(ex, dtype=np.int32).tobytes()).decode()
        return web.json_response({"text": "ok", "meta_info": meta, "domain": dom})

    async def health(self, request):
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/start_expert_distribution_record", self.start_rec)
        app.router.add_post("/stop_expert_distribution_record", self.stop_rec)
        app.router.add_post("/dump_expert_distribution_record", self.dump_rec)
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", self.health)
        return app

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> int:
        ready = threading.Event()

        def serve():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(self.app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
        self.recording = False  # a restarted engine has forgotten the recording

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
