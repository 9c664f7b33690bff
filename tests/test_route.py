"""tracekit route against a fake SGLang upstream on 127.0.0.1: ranks, bytes, streaming, faults, bad input, CLI."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tracekit.placement import export
from tracekit.placement.strategies import baselines
from tracekit.placement.strategies.classifier import fit_text_classifier
from tracekit.placement.data.types import Cluster, GroupingRule, Placement
from tracekit.route.balancer import Balancer
from tracekit.route.body import BadRequest, insert_rank, parse_object
from tracekit.route.server import HEALTH_TTL, ROUTER, RouteOptions, make_app
from tracekit.route.table import load_route_table

from _cli import run_cli

sys.path.insert(0, str(Path(__file__).parent))
from _fake_sglang import FakeSGLang, start  # noqa: E402

CODE = [
    "def add(a, b):\n    return a + b", "Write a Python function to reverse a linked list.",
    "class Stack:\n    def push(self, x):", "import numpy as np\nx = np.zeros(3)", "for i in range(10): print(i)",
    "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"", "Write a function to sort a list of tuples.",
    "return sorted(items, key=lambda t: t[1])",
]
MATH = [
    "Janet has 16 eggs and eats three. How many are left?", "Solve for x: 3x + 5 = 20.",
    "What is the sum of the first 100 positive integers?", "A train travels 60 miles per hour for 3 hours.",
    "Find the area of a circle with radius 4.", "If 5 apples cost 2 dollars, how much do 20 apples cost?",
    "Compute the derivative of x^2 + 3x.", "How many minutes are there in 7 hours?",
]


def grouping_file(tmp: Path, model: str = "fake/model") -> Path:
    """A 2-node x 2-GPU domain grouping (code -> node 0 = ranks 0,1; math -> node 1 = ranks 2,3) with a classifier."""
    c = Cluster(2, 2, num_experts=8, redundant=0)
    clf = fit_text_classifier(CODE + MATH, ["code"] * len(CODE) + ["math"] * len(MATH), seed=0)
    p = Placement(c, np.arange(2), baselines.linear(c, 2), "test",
                  grouping=GroupingRule(kind="domain", domain_nodes={"code": [0], "math": [1]}),
                  meta={"model": {"name": "fake-model", "hub_id": model}, "classifier": clf.to_dict()})
    path = tmp / "grouping.json"
    export.export(p, "grouping", path)
    return path


@dataclass
class Stack:
    fake: FakeSGLang
    url: str
    session: aiohttp.ClientSession
    app: object
    table: object


@contextlib.asynccontextmanager
async def stack(grouping: Path, **opts):
    fake = FakeSGLang()
    up, up_port = await start(fake.app())
    table = load_route_table(grouping)
    app = make_app(table, RouteOptions(upstream=f"http://127.0.0.1:{up_port}", **opts))
    px, px_port = await start(app)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            yield Stack(fake, f"http://127.0.0.1:{px_port}", s, app, table)
    finally:
        await px.cleanup()
        await up.cleanup()


def arun(coro):
    return asyncio.run(coro)


@pytest.fixture()
def gfile(tmp_path):
    return grouping_file(tmp_path)


# ------------------------------------------------------------------------------------------------ routing


def test_every_request_reaches_a_rank_of_its_group(gfile):
    async def go():
        async with stack(gfile) as st:
            sent = []
            for i, text in enumerate(CODE + MATH):
                path, body = [("/generate", {"text": text}), ("/v1/completions", {"model": "m", "prompt": text}),
                              ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": text}]})][i % 3]
                async with st.session.post(st.url + path, json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                sent.append(st.table.label_of([text]))
            ranks = [s["rank"] for s in st.fake.seen]
            assert len(ranks) == len(sent)
            for label, rank in zip(sent, ranks):
                assert rank in st.table.group_ranks[label], (label, rank)
            # the classifier routes its training texts to their own domain, so both groups were used
            assert {0, 1} & set(ranks) and {2, 3} & set(ranks)
            # sequential requests of a group spread over its ranks (ties go to the rank sent the fewest)
            assert set(ranks) == {0, 1, 2, 3}
            metrics = await (await st.session.get(st.url + "/metrics")).text()
            assert 'tracekit_route_requests_total{endpoint="/generate",group="code"' in metrics
            assert 'tracekit_route_tokens_total{group="math",kind="prompt"' in metrics
            assert "tracekit_route_classifier_decisions_total" in metrics
            assert "tracekit_route_request_seconds_bucket" in metrics
            health = await (await st.session.get(st.url + "/healthz")).json()
            assert health["status"] == "ok" and health["groups"] == {"code": [0, 1], "math": [2, 3]}
    arun(go())


def test_body_is_byte_identical_but_for_the_rank_and_headers_pass(gfile):
    raw = '{ "text" :"def f(x):\\n    return x  # \u00e9\u4e2d" ,\n "sampling_params": {"max_new_tokens": 8, "temperature": 0.0},"zz":[1, 2.50, null]}  \n'.encode()
    headers = {"Content-Type": "application/json", "X-Custom": "abc", "Authorization": "Bearer secret-token"}

    async def go():
        async with stack(gfile) as st, aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")) as s:
            async with s.post(st.url + "/generate", data=raw, headers=headers) as r:
                assert r.status == 200
                await r.read()
            got = st.fake.seen[0]
            rank = got["rank"]
            member = b',"routed_dp_rank":%d' % rank
            cut = got["body"].rindex(member)
            assert got["body"][:cut] + got["body"][cut + len(member):] == raw
            assert json.loads(got["body"])["routed_dp_rank"] == rank
            for k, v in headers.items():
                assert got["headers"][k] == v
            assert set(got["headers"]) == set(headers) | {"Host", "Content-Length"}  # the proxy adds none of its own
    arun(go())


@pytest.mark.parametrize("body, header, want, unchanged", [
    (b'{"text": "1+1", "routed_dp_rank": 3}', None, 3, True),
    (b'{"text": "1+1", "data_parallel_rank": 2}', None, 2, True),
    (b'{"text": "def f(): pass"}', "1", 1, False),       # header only: the rank goes into the body too
    (b'{"text": "1+1", "routed_dp_rank": null}', None, None, False),  # null: the router chooses; last key wins
])
def test_a_request_that_carries_a_rank_keeps_it(gfile, body, header, want, unchanged):
    async def go():
        async with stack(gfile) as st:
            h = {"Content-Type": "application/json", **({"X-Data-Parallel-Rank": header} if header else {})}
            async with st.session.post(st.url + "/generate", data=body, headers=h) as r:
                assert r.status == 200
            got = st.fake.seen[0]
            if unchanged:
                assert got["body"] == body
            if want is not None:
                assert json.loads(got["body"]).get("routed_dp_rank", json.loads(got["body"]).get("data_parallel_rank")) == want
            else:
                assert json.loads(got["body"])["routed_dp_rank"] in (0, 1, 2, 3)
    arun(go())


def test_insert_rank_keeps_every_other_byte():
    for raw in (b"{}", b"  {}  ", b'{"a":1}', b'{"a": {"b": "}"}}\n', '{"t": "\u00fc}"}'.encode()):
        obj = parse_object(raw)
        out = insert_rank(raw, obj, 5)
        assert json.loads(out) == {**obj, "routed_dp_rank": 5}
        assert out.replace(b',"routed_dp_rank":5', b"").replace(b'"routed_dp_rank":5', b"") == raw


def test_balancer_picks_least_in_flight_then_least_sent():
    b = Balancer(4)
    b.start(0)
    assert b.pick([0, 1]) == 1
    b.start(1)
    b.finish(0)
    assert b.pick([0, 1]) == 0
    b.finish(1)
    assert b.pick([0, 1]) == 0 and b.pick([2, 3]) == 2  # 0 and 1 sent once each: lowest index


# ------------------------------------------------------------------------------------------------ streaming


def test_stream_chunks_arrive_in_order_and_unbuffered(gfile):
    async def go():
        async with stack(gfile) as st:
            gate = st.fake.gate("g1")
            body = {"text": "1+1", "stream": True, "fake": {"chunks": 3, "gate": "g1"}}
            async with st.session.post(st.url + "/generate", json=body) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
                assert not gate.is_set()  # the upstream is still waiting: the proxy did not hold the chunk back
                assert json.loads(first[len(b"data: "):])["index"] == 0
                gate.set()
                rest = (await r.read()).split(b"\n\n")
            events = [first.strip()] + [e for e in rest if e]
            assert [json.loads(e[6:])["index"] for e in events[:-1]] == [0, 1, 2] and events[-1] == b"data: [DONE]"
    arun(go())


def test_200_concurrent_streams_none_lost(gfile):
    async def one(st, i):
        body = {"text": CODE[i % 8] if i % 2 else MATH[i % 8], "stream": True, "fake": {"chunks": 4, "gap": 0.005},
                "rid": f"r{i}"}
        async with st.session.post(st.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            data = await r.read()
        events = [e for e in data.split(b"\n\n") if e]
        return [json.loads(e[6:])["index"] for e in events[:-1]], events[-1]

    async def go():
        async with stack(gfile) as st:
            got = await asyncio.gather(*(one(st, i) for i in range(200)))
            assert all(idx == [0, 1, 2, 3] and last == b"data: [DONE]" for idx, last in got)
            assert sorted(json.loads(s["body"])["rid"] for s in st.fake.seen) == sorted(f"r{i}" for i in range(200))
            router = st.app[ROUTER]
            assert router.balancer.inflight == [0, 0, 0, 0] and sum(router.balancer.sent) == 200
    arun(go())


# ------------------------------------------------------------------------------------------------ faults


def test_upstream_dying_mid_stream_fails_that_request_only(gfile):
    async def go():
        async with stack(gfile) as st:
            body = {"text": "1+1", "stream": True, "fake": {"chunks": 3, "die": True}}
            with pytest.raises(aiohttp.ClientPayloadError):
                async with st.session.post(st.url + "/generate", json=body) as r:
                    assert r.status == 200
                    await r.read()
            async with st.session.post(st.url + "/generate", json={"text": "1+1", "stream": True}) as r:
                assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
            metrics = await (await st.session.get(st.url + "/metrics")).text()
            assert 'tracekit_route_upstream_errors_total{endpoint="/generate",kind="midstream"} 1.0' in metrics
            assert st.app[ROUTER].balancer.inflight == [0, 0, 0, 0]
    arun(go())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_upstream(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_fake_sglang.py"), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def test_upstream_process_killed_mid_stream_then_down_then_back(gfile):
    port = _free_port()
    proc = _spawn_upstream(port)

    async def go():
        table = load_route_table(gfile)
        app = make_app(table, RouteOptions(upstream=f"http://127.0.0.1:{port}", connect_timeout=2))
        px, px_port = await start(app)
        url = f"http://127.0.0.1:{px_port}"
        nonlocal proc
        try:
            async with aiohttp.ClientSession() as s:
                body = {"text": "1+1", "stream": True, "fake": {"chunks": 50, "gap": 0.05}}
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with s.post(url + "/generate", json=body) as r:
                        assert r.status == 200
                        await r.content.readuntil(b"\n\n")
                        proc.send_signal(signal.SIGKILL)  # the upstream process dies mid-stream
                        await r.read()
                proc.wait()
                async with s.post(url + "/generate", json={"text": "1+1"}) as r:  # upstream down: 502, one line
                    assert r.status == 502
                    text = await r.text()
                    assert text.count("\n") == 1 and "unreachable" in json.loads(text)["error"]["message"]
                async with s.get(url + "/healthz") as r:  # the proxy keeps serving, and says the upstream is down
                    h = await r.json()
                    assert r.status == 503 and h["upstream"]["state"] == "unreachable" and h["dp_size"] == 4
                proc = _spawn_upstream(port)
                async with s.post(url + "/generate", json={"text": "1+1"}) as r:
                    assert r.status == 200 and (await r.json())["text"] == "ok"
                await asyncio.sleep(HEALTH_TTL)
                async with s.get(url + "/healthz") as r:
                    assert r.status == 200 and (await r.json())["upstream"]["state"] == "ok"
        finally:
            await px.cleanup()
    try:
        arun(go())
    finally:
        proc.kill()
        proc.wait()


def test_upstream_timeouts_fail_that_request_only(gfile):
    async def go():
        async with stack(gfile, read_timeout=0.3) as st:
            async with st.session.post(st.url + "/generate", json={"text": "1+1", "fake": {"sleep": 3}}) as r:
                text = await r.text()
                assert r.status == 504 and text.count("\n") == 1 and "did not answer" in text
            st.fake.gate("never")  # a stream that goes silent after its first chunk
            with pytest.raises(aiohttp.ClientPayloadError):
                async with st.session.post(st.url + "/generate",
                                           json={"text": "1+1", "stream": True, "fake": {"gate": "never"}}) as r:
                    await r.read()
            async with st.session.post(st.url + "/generate", json={"text": "1+1"}) as r:
                assert r.status == 200
            metrics = await (await st.session.get(st.url + "/metrics")).text()
            assert 'kind="timeout"} 1.0' in metrics and 'kind="midstream"} 1.0' in metrics
    arun(go())


def test_concurrency_limit_answers_503(gfile):
    async def go():
        async with stack(gfile, max_concurrency=1, queue_timeout=0.2) as st:
            gate = st.fake.gate("hold")
            body = {"text": "1+1", "stream": True, "fake": {"chunks": 2, "gate": "hold"}}
            async with st.session.post(st.url + "/generate", json=body) as first:
                await first.content.readuntil(b"\n\n")
                async with st.session.post(st.url + "/generate", json={"text": "1+1"}) as second:
                    assert second.status == 503 and "concurrency limit" in await second.text()
                gate.set()
                await first.read()
    arun(go())


MALFORMED = [
    ("POST", "/generate", b"", {}, 400, "empty body"),
    ("POST", "/generate", b"{", {}, 400, "malformed JSON"),
    ("POST", "/v1/completions", b'{"prompt": "x",}', {}, 400, "malformed JSON"),
    ("POST", "/generate", b"[1, 2]", {}, 400, "expected an object"),
    ("POST", "/generate", b'"text"', {}, 400, "expected an object"),
    ("POST", "/generate", b'{"text": "\xff"}', {}, 400, "not UTF-8"),
    ("POST", "/generate", '{"text": "x"}'.encode("utf-16"), {}, 400, "not UTF-8"),
    ("POST", "/generate", b'{"text": "x", "routed_dp_rank": "abc"}', {}, 400, "integer DP rank"),
    ("POST", "/generate", b'{"text": "x", "routed_dp_rank": true}', {}, 400, "integer DP rank"),
    ("POST", "/generate", b'{"text": "x", "routed_dp_rank": 99}', {}, 400, "outside 0..3"),
    ("POST", "/generate", b'{"text": "x", "data_parallel_rank": -1}', {}, 400, "outside 0..3"),
    ("POST", "/generate", b'{"text": "x"}', {"X-Data-Parallel-Rank": "zz"}, 400, "integer DP rank"),
    ("GET", "/generate", b"", {}, 405, "use POST"),
    ("POST", "/v2/generate", b"{}", {}, 404, "unknown path"),
    ("GET", "/", b"", {}, 404, "unknown path"),
    ("POST", "/generate", b'{"text": "' + b"x" * 70000 + b'"}', {}, 413, "over the limit"),
    # hostile JSON: nesting past the parser's recursion limit, integers past Python's int-string limit
    ("POST", "/generate", b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}", {}, 400, "nested too deeply"),
    ("POST", "/generate", b'{"a": {"b": ' * 1300 + b"1" + b"}}" * 1300 + b"}", {}, 400, "nested too deeply"),
    ("POST", "/generate", b'{"text": "x", "n": ' + b"9" * 5000 + b"}", {}, 400, "out of range"),
    ("POST", "/generate", b'{"text": "x", "routed_dp_rank": ' + b"1" * 4500 + b"}", {}, 400, "out of range"),
    ("POST", "/generate", b'{"text": "x", "routed_dp_rank": 1e999}', {}, 400, "integer DP rank"),
]


@pytest.mark.parametrize("method, path, body, headers, status, reason", MALFORMED)
def test_malformed_requests(gfile, method, path, body, headers, status, reason):
    async def go():
        async with stack(gfile, max_body_bytes=65536) as st:
            async with st.session.request(method, st.url + path, data=body, headers=headers) as r:
                text = await r.text()
                assert r.status == status, text
                if reason:
                    assert text.count("\n") == 1 and reason in json.loads(text)["error"]["message"]
            assert st.fake.seen == []  # nothing reached the upstream
            async with st.session.post(st.url + "/generate", json={"text": "1+1"}) as r:
                assert r.status == 200  # and the proxy still serves
    arun(go())


def test_parse_object_errors_are_one_line():
    with pytest.raises(BadRequest, match="line 2 column"):
        parse_object(b'{"a":\n}')


# ------------------------------------------------------------------------------------------------ start-up


@pytest.mark.parametrize("extra, message", [
    (["--dp-size", 8, "--model", "fake/model"], "--dp-size 8 does not match the placement's 4 GPUs"),
    (["--dp-size", 4, "--model", "other/model"], "fitted for model 'fake/model'"),
    (["--dp-size", 4, "--model", "fake/model", "--listen", "nohost"], "expected HOST:PORT"),
    (["--dp-size", 4, "--model", "fake/model", "--max-concurrency", 0], "must be positive"),
])
def test_start_up_checks_exit_2_with_one_line(gfile, capsys, extra, message):
    rc = run_cli(["route", "--grouping", gfile, "--upstream", "http://127.0.0.1:9", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_start_up_asks_the_upstream_for_model_and_dp_size(gfile, capsys):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_fake_sglang.py"), str(port), "other/model", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        rc = run_cli(["route", "--grouping", gfile, "--upstream", f"http://127.0.0.1:{port}"])
        assert rc == 2 and "but the upstream serves 'other/model'" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_not_a_grouping_file(tmp_path, capsys):
    bad = tmp_path / "g.json"
    bad.write_text('{"kind": "domain"}')
    assert run_cli(["route", "--grouping", bad, "--upstream", "http://127.0.0.1:9"]) == 2
    assert "not a tracekit grouping file" in capsys.readouterr().err


def test_route_cli_serves_until_interrupted(gfile, tmp_path):
    port, up_port = _free_port(), _free_port()
    up = _spawn_upstream(up_port)
    px = subprocess.Popen([sys.executable, "-m", "tracekit", "route", "--grouping", str(gfile), "--upstream",
                           f"http://127.0.0.1:{up_port}", "--listen", f"127.0.0.1:{port}", "--dp-size", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert json.loads(r.read())["dp_size"] == 4
                break
            except OSError:
                assert px.poll() is None, px.stderr.read().decode()
                assert time.time() < deadline
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=b'{"text": "def f(): pass"}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["meta_info"]["dp_rank"] in (0, 1, 2, 3)
    finally:
        px.send_signal(signal.SIGINT)
        px.wait(timeout=20)
        up.kill()
        up.wait()


# ------------------------------------------------------------------------------------------------ bounded resources


async def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a raw connection and return everything the proxy sends before it closes (or ``wait``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            out += chunk
    except (asyncio.TimeoutError, ConnectionError):
        pass
    writer.close()
    return out


def test_slot_is_taken_before_the_body_is_read(gfile, monkeypatch):
    """A request waiting for a slot has not had its body read; the body is read only once the slot is held."""
    from tracekit.route.server import Router

    seen = []
    real = Router.read_body

    async def spy(self, request):
        seen.append(self.slots._value)  # free slots when the body starts being read
        return await real(self, request)

    monkeypatch.setattr(Router, "read_body", spy)

    async def go():
        async with stack(gfile, max_concurrency=1, queue_timeout=0.3) as st:
            gate = st.fake.gate("hold")
            body = {"text": "1+1", "stream": True, "fake": {"chunks": 2, "gate": "hold"}}
            async with st.session.post(st.url + "/generate", json=body) as first:
                await first.content.readuntil(b"\n\n")
                assert seen == [0]  # the first read its body holding the only slot
                async with st.session.post(st.url + "/generate", data=b'{"text": "' + b"y" * 200_000 + b'"}') as r:
                    assert r.status == 503
                assert seen == [0]  # the second never read its body: it never got a slot
                gate.set()
                await first.read()
    arun(go())


def test_body_size_limit_is_enforced_before_and_while_reading(gfile):
    async def go():
        async with stack(gfile, max_body_bytes=1 << 20) as st:
            port = int(st.url.rsplit(":", 1)[1])
            # a Content-Length over the limit is refused at once, though no byte of the body was sent
            out = await _raw(port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 413") and b"over the limit" in out
            # a chunked body is cut off at the limit
            async def chunks():
                for _ in range(64):
                    yield b"x" * 65536
            async with st.session.post(st.url + "/generate", data=chunks()) as r:
                assert r.status == 413 and (await r.text()).count("\n") == 1
            assert st.fake.seen == []
            async with st.session.post(st.url + "/generate", json={"text": "1+1"}) as r:
                assert r.status == 200
    arun(go())


def test_slow_headers_and_idle_connections_are_closed(gfile):
    async def go():
        async with stack(gfile, header_timeout=0.5) as st:
            port = int(st.url.rsplit(":", 1)[1])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            # slowloris: a request line and one header, then nothing more; and a connection that never speaks
            outs = await asyncio.gather(_raw(port, b"POST /generate HTTP/1.1\r\nHost: x\r\n"), _raw(port, b""),
                                        *(_raw(port, b"GET /healthz HTTP/1.1\r\nX-Slow: ") for _ in range(20)))
            assert loop.time() - t0 < 4  # all closed by the proxy, long before _raw's own 5 s wait
            assert all(not o.startswith(b"HTTP/1.1 2") for o in outs)
            async with st.session.post(st.url + "/generate", json={"text": "1+1"}) as r:
                assert r.status == 200
    arun(go())


def test_slow_body_gets_408_and_frees_its_slot(gfile):
    async def go():
        async with stack(gfile, max_concurrency=1, body_timeout=0.5, queue_timeout=5) as st:
            port = int(st.url.rsplit(":", 1)[1])
            out = await _raw(port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"te")
            assert out.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in out
            async with st.session.post(st.url + "/generate", json={"text": "1+1"}) as r:
                assert r.status == 200  # the only slot was given back
            assert len(st.fake.seen) == 1
    arun(go())


def test_a_huge_batch_is_classified_in_bounded_work(gfile, monkeypatch):
    from tracekit.route import table as table_mod

    async def go():
        async with stack(gfile) as st:
            clf = st.table.classifier
            sizes = []
            real = clf.predict
            monkeypatch.setattr(clf, "predict", lambda texts: sizes.append((len(texts), max(map(len, texts))))
                                or real(texts))
            texts = ["def f(x): return x " * 2000] * 200  # 200 prompts of 38,000 characters (7.6 MB)
            body = json.dumps({"text": texts}).encode()
            async with stack_post(st, body) as r:
                assert r.status == 200
            assert sizes == [(table_mod.CLASSIFY_TEXTS, table_mod.CLASSIFY_CHARS)]
    arun(go())


@contextlib.asynccontextmanager
async def stack_post(st, body: bytes):
    async with st.session.post(st.url + "/generate", data=body) as r:
        yield r


def test_healthz_reports_an_unhealthy_upstream(gfile):
    async def go():
        async with stack(gfile) as st:
            async with st.session.get(st.url + "/healthz") as r:
                assert r.status == 200 and (await r.json())["upstream"]["state"] == "ok"
            st.fake.health = 500
            await asyncio.sleep(HEALTH_TTL)
            async with st.session.get(st.url + "/healthz") as r:
                h = await r.json()
                assert r.status == 503 and h["upstream"] == {"url": h["upstream"]["url"], "state": "unhealthy",
                                                             "http_status": 500}
    arun(go())


def test_listens_on_loopback_by_default():
    import inspect

    from tracekit.cli.route_cmd import parse_listen, route_cmd

    assert inspect.signature(route_cmd).parameters["listen"].default.default == "127.0.0.1:8000"
    assert parse_listen(":8000") == ("127.0.0.1", 8000)


# ------------------------------------------------------------------------------------------------ sampling for watch


def test_sampled_requests_ask_for_routed_experts_and_reach_the_spool(gfile, tmp_path):
    """--sample-routed 1: every non-streaming request asks SGLang for its routed experts and its answer is spooled
    (what tracekit watch --spool reads); a streamed request is forwarded untouched and not spooled."""
    spool = tmp_path / "spool"

    async def go():
        async with stack(gfile, sample_routed=1.0, spool=str(spool)) as st:
            for i in range(3):
                async with st.session.post(st.url + "/generate", json={"text": MATH[i], "rid": f"m{i}"}) as r:
                    assert r.status == 200
            async with st.session.post(st.url + "/generate", json={"text": "1+1", "stream": True}) as r:
                await r.read()
            return [json.loads(s["body"]) for s in st.fake.seen]

    bodies = arun(go())
    assert [b.get("return_routed_experts") for b in bodies] == [True, True, True, None]
    lines = [json.loads(ln) for f in sorted(spool.glob("*.jsonl")) for ln in f.read_text().splitlines()]
    assert len(lines) == 3 and all(ln["response"]["meta_info"]["prompt_tokens"] == 7 for ln in lines)
    assert not list(spool.glob(".*.part"))  # the stop flushed the last file


def test_sampling_off_forwards_bodies_untouched_and_half_samples_about_half(gfile, tmp_path):
    async def go(rate):
        async with stack(gfile, sample_routed=rate, spool=str(tmp_path / f"s{rate}")) as st:
            for i in range(40):
                async with st.session.post(st.url + "/generate", json={"text": CODE[i % 8], "rid": f"c{i}"}) as r:
                    assert r.status == 200
            return [json.loads(s["body"]).get("return_routed_experts") for s in st.fake.seen]

    assert arun(go(0.0)) == [None] * 40
    half = arun(go(0.5))
    assert 8 <= half.count(True) <= 32 and half.count(True) + half.count(None) == 40


def test_sample_routed_without_spool_is_one_line(gfile, capsys):
    from tests._cli import cli

    code, _, err = cli(capsys, "route", "--grouping", gfile, "--upstream", "http://127.0.0.1:9", "--dp-size", 4,
                       "--model", "fake/model", "--sample-routed", 0.5)
    assert code == 2 and "--sample-routed needs --spool" in err and err.count("\n") == 1
