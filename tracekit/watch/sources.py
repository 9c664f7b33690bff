"""Where ``watch`` reads routing from: SGLang's expert-distribution recorder, and per-request routed experts.

**Recorder** (SGLang, ``--expert-distribution-recorder-mode per_token`` or ``stat``; layout in
:mod:`tracekit.importers.sglang`). ``POST /start_expert_distribution_record`` starts recording, ``POST
/dump_expert_distribution_record`` makes the ranks ``torch.save`` what they recorded into the server's
``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (``--dump-dir`` here: watch runs beside the engine) and clears the
recorder's buffer, ``POST /stop_expert_distribution_record`` stops it. The sampling rate bounds the cost on the
engine: every cycle of ``interval`` seconds records for ``rate * interval`` seconds, then dumps and stops, so the
recorder never holds more than one short window (the unbounded per-token growth of sglang #18587 cannot happen).
Dump files are read with the importer's own functions and deleted once read.

**Routed experts** (SGLang ``return_routed_experts`` / vLLM ``--enable-return-routed-experts``): JSONL files in a
spool folder, one response a line as :mod:`tracekit.importers.routed_experts` reads them (``{"prompt_id",
"domain", "response"}``), written by whatever sits in front of the engine (:class:`tracekit.watch.sampler.RoutedSampler`
for a sampled share of requests). Finished files (``*.jsonl``) are read, then deleted.

Every source returns :class:`Batch` es of per-token arrays; neither keeps state that could grow.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracekitError
from ..importers.sglang import (DECODE, EXTEND, IDLE, MIXED, RequestAssembler, as_numpy, check_per_token,
                                load_dump, segments, slots_to_logical, sort_dump_files, stat_counts)

START, DUMP, STOP = ("/start_expert_distribution_record", "/dump_expert_distribution_record",
                     "/stop_expert_distribution_record")


@dataclass
class Batch:
    """Per token (T,): ``request`` (local ids, 0..), ``phase``, ``position``; ``experts`` (T, nL, k) logical ids;
    ``domain`` (T,) labels into ``domains``; or, for a stat dump, ``loads`` (nL, E) counts only."""

    request: np.ndarray
    phase: np.ndarray
    position: np.ndarray
    experts: np.ndarray
    domain: np.ndarray
    domains: list[str]
    loads: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.request.size)

    @property
    def requests(self) -> int:
        return int(np.unique(self.request).size)


def post(url: str, timeout: float = 10.0) -> str:
    """POST with an empty JSON body; the answer's text. One-line TracekitError when the engine is unreachable."""
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read(1 << 16).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise TracekitError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TracekitError(f"cannot reach {url} ({getattr(exc, 'reason', exc)})") from None


def per_token_batch(obj: Any, geometry: dict[str, Any], where: str) -> Batch | None:
    """One per_token dump (every rank's passes) as a :class:`Batch` (None when it holds no routed token): one
    request per extend segment, each decode token its own request (the dump records no request ids)."""
    records, p2l = check_per_token(obj, Path(where))
    asm = RequestAssembler()
    cols: dict[str, list] = {k: [] for k in ("req", "phase", "pos", "experts")}
    seen: set = set()
    for i, rec in enumerate(records):
        w = f"{where} record {i}"
        mode = int(rec.get("forward_mode", 0))
        if mode == IDLE or mode not in (EXTEND, DECODE, MIXED):
            continue
        positions = as_numpy(rec["positions"], "positions", w, ndim=1).astype(np.int64)
        topk = as_numpy(rec["topk_ids_of_layer"], "topk_ids_of_layer", w, ndim=3)
        t = positions.shape[0]
        if t == 0 or topk.shape[1] != t:
            continue
        key = (rec.get("forward_pass_id"), t, mode, topk.tobytes())
        if key in seen:  # tensor-parallel ranks record the same pass
            continue
        seen.add(key)
        logical = slots_to_logical(topk, p2l, geometry["moe_layers"], geometry["top_k"], geometry["num_experts"], w)
        segs = segments(mode, rec.get("extend_seq_lens"), t, w)
        req, phase, _ = asm.assign(int(rec.get("rank") or 0), int(rec.get("forward_pass_id") or i), mode, segs,
                                   positions)
        for k, v in (("req", req), ("phase", phase), ("pos", positions), ("experts", logical)):
            cols[k].append(v)
    if not cols["req"]:
        return None
    req = np.concatenate(cols["req"])
    return Batch(req, np.concatenate(cols["phase"]), np.concatenate(cols["pos"]), np.concatenate(cols["experts"]),
                 np.zeros(req.size, dtype=np.int32), ["unknown"])


class RecorderSource:
    """SGLang's recorder, read through its HTTP endpoints and its dump folder (see the module docstring)."""

    def __init__(self, url: str, dump_dir: str | Path, geometry: dict[str, Any], mode: str = "per_token"):
        if mode not in ("per_token", "stat"):
            raise TracekitError(f"--recorder {mode!r}: use per_token or stat")
        self.url, self.dump_dir, self.geometry, self.mode = url.rstrip("/"), Path(dump_dir), geometry, mode
        if not self.dump_dir.is_dir():
            raise TracekitError(f"--dump-dir {self.dump_dir}: no such folder (the server's "
                                "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR)")

    def start(self) -> None:
        post(self.url + START)

    def collect(self) -> list[Batch]:
        """Dump, stop, and read (then delete) every dump file in the folder."""
        post(self.url + DUMP)
        try:
            post(self.url + STOP)
        except TracekitError:
            pass  # the dump is what matters; a server that restarts in between is caught on the next start
        out = []
        files = sort_dump_files(self.dump_dir.glob("expert_distribution_recorder_*.pt"))
        for path in files:
            obj = load_dump(path)
            if self.mode == "stat" or (isinstance(obj, dict) and "logical_count" in obj):
                counts = stat_counts(obj, path, self.geometry).sum(0)  # (nL, E)
                z = np.zeros(0, dtype=np.int64)
                out.append(Batch(z, z.astype(np.int8), z, np.zeros((0, len(self.geometry["moe_layers"]),
                                                                       self.geometry["top_k"]), dtype=np.int64),
                                 z.astype(np.int32), ["unknown"], loads=counts))
            else:
                b = per_token_batch(obj, self.geometry, str(path))
                if b is not None:
                    out.append(b)
            path.unlink(missing_ok=True)
        return out


class SpoolSource:
    """Routed-experts responses spooled as JSONL files (see the module docstring); ``rate`` keeps that share of
    requests (seeded by their prompt id, so a restart keeps the same ones)."""

    def __init__(self, spool: str | Path, geometry: dict[str, Any], rate: float = 1.0, slot_map=None):
        self.spool, self.geometry, self.rate, self.slot_map = Path(spool), geometry, rate, slot_map
        if not self.spool.is_dir():
            raise TracekitError(f"--spool {self.spool}: no such folder")

    def start(self) -> None:
        return None

    def collect(self) -> list[Batch]:
        from ..importers.routed_experts import parse_response, request_tokens
        from .sampler import keep

        reqs: list[tuple[str, dict]] = []
        for path in sorted(self.spool.glob("*.jsonl")):
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            path.unlink(missing_ok=True)
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{n}"
                try:
                    obj = json.loads(line)
                    for r in parse_response(obj, self.geometry, where):
                        if keep(r.prompt_id or where, self.rate):
                            reqs.append((r.domain or "unknown", request_tokens(r, self.geometry, where,
                                                                               self.slot_map)))
                except (TracekitError, ValueError) as exc:  # logged by the watcher, which carries on
                    raise TracekitError(f"spool {where}: {str(exc).splitlines()[0][:200]}") from None
        if not reqs:
            return []
        names = sorted({d for d, _ in reqs})
        idx = {d: i for i, d in enumerate(names)}
        req = np.concatenate([np.full(c["position"].size, i) for i, (_, c) in enumerate(reqs)])
        dom = np.concatenate([np.full(c["position"].size, idx[d], dtype=np.int32) for d, c in reqs])
        cat = lambda k: np.concatenate([c[k] for _, c in reqs])  # noqa: E731
        return [Batch(req, cat("phase"), cat("position"), cat("experts"), dom, names)]
