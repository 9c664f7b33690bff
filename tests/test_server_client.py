"""collect_from_server against fake SGLang / vLLM servers on 127.0.0.1 that answer in the engines' formats."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.server_client import collect_from_server
from tracekit.store import open_run

NUM_LAYERS, MOE, E, K = 4, [1, 2, 3], 16, 2
GEO = dict(num_experts=E, top_k=K, moe_layers="1-3", num_layers=NUM_LAYERS)


def fake_routing(text: str, max_new: int, layers: int) -> tuple[int, int, np.ndarray]:
    """What the fake engine 'routes' for a prompt: one token per word, deterministic ids."""
    p = len(text.split())
    g = max_new
    rng = np.random.default_rng(sum(map(ord, text)))
    return p, g, rng.random((p + g - 1, layers, E)).argsort(-1)[..., :K].astype(np.int32)  # k distinct ids


class FakeEngine(BaseHTTPRequestHandler):
    fail_on: str | None = None
    seen: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _json(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": "fake-moe", "object": "model"}]})
        self._json(404, {"error": "no route"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        text = body.get("text", body.get("prompt"))
        if self.fail_on and self.fail_on in text:
            return self._json(500, {"error": "engine exploded"})
        if self.path == "/generate":  # SGLang
            p, g, arr = fake_routing(text, body["sampling_params"]["max_new_tokens"], NUM_LAYERS)
            meta = {"id": "rid", "prompt_tokens": p, "completion_tokens": g, "cached_tokens": 0}
            if body.get("return_routed_experts"):
                meta["routed_experts"] = base64.b64encode(arr.tobytes()).decode()
            return self._json(200, {"text": "out", "output_ids": list(range(7, 7 + g)), "meta_info": meta})
        if self.path == "/v1/completions":  # vLLM
            assert body.get("model") == "fake-moe" and body.get("return_token_ids") is True
            p, g, arr = fake_routing(text, body["max_tokens"], len(MOE))
            return self._json(200, {
                "id": "cmpl-x", "object": "text_completion", "model": "fake-moe",
                "choices": [{"index": 0, "text": "out", "finish_reason": "length",
                             "prompt_token_ids": list(range(p)), "token_ids": list(range(9, 9 + g)),
                             "routed_experts": arr.tolist()}],
                "usage": {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}})
        self._json(404, {"error": "no route"})


@pytest.fixture
def server():
    FakeEngine.fail_on = None
    FakeEngine.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    t.join()


PROMPTS = [(f"p{i}", " ".join(["word"] * (3 + i % 4)) + f" n{i}", "math" if i % 2 else "code") for i in range(10)]


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_collect_from_server_writes_exact_routes(server, tmp_path, engine):
    out = tmp_path / "run"
    m = collect_from_server(server, PROMPTS, out, engine=engine, concurrency=4, max_new_tokens=3, progress=False,
                            keep_responses=True, dataset="unit", **GEO)
    assert m["status"] == "complete" and m["source"] == f"server:{engine}"
    assert len(FakeEngine.seen) == len(PROMPTS)
    if engine == "sglang":
        assert all(b["return_routed_experts"] is True for _, b in FakeEngine.seen)
    run = open_run(out)
    con = duckdb.connect()
    con.execute(f"create view t as select * from read_parquet('{out}/routes/*.parquet')")
    per_req = con.execute("select request_id, any_value(prompt_id), any_value(domain), "
                          "count(*) filter (where phase='prefill') / 3, count(*) filter (where phase='decode') / 3 "
                          "from t group by 1 order by 1").fetchall()
    assert [r[0] for r in per_req] == list(range(len(PROMPTS)))  # request_id = prompt index, whatever the order
    for (rid, pid, dom, n_pre, n_dec), (want_pid, text, want_dom) in zip(per_req, PROMPTS):
        p, g, arr = fake_routing(text, 3, NUM_LAYERS if engine == "sglang" else len(MOE))
        assert (pid, dom, n_pre, n_dec) == (want_pid, want_dom, p, g - 1)
        rows = con.execute("select experts from t where request_id = ? order by position, layer", [rid]).fetchall()
        got = np.array([r[0] for r in rows])
        want = arr[:, MOE] if engine == "sglang" else arr
        np.testing.assert_array_equal(got, want.reshape(-1, K))
    assert (out / "server_responses.jsonl").read_text().count("\n") == len(PROMPTS)
    assert run.manifest["totals"]["routes"]["requests"] == len(PROMPTS)


def test_collect_from_server_failure_leaves_nothing(server, tmp_path):
    FakeEngine.fail_on = "n7"
    out = tmp_path / "run"
    with pytest.raises(TracekitError, match="HTTP 500"):
        collect_from_server(server, PROMPTS, out, engine="sglang", concurrency=3, max_new_tokens=2, progress=False,
                            chunk_requests=2, **GEO)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_collect_from_server_unreachable(tmp_path):
    with pytest.raises(TracekitError, match="cannot reach"):
        collect_from_server("http://127.0.0.1:9", PROMPTS[:1], tmp_path / "run", progress=False, timeout=5, **GEO)
    assert not (tmp_path / "run").exists()
