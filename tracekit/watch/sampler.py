"""Sampling per-request routed experts in front of the engine: which requests ask for them, and the spool line.

:class:`RoutedSampler` is what a proxy (``route``, a gateway) calls per request: ``prepare(body)`` adds the
engine's flag to a sampled share of request bodies (``return_routed_experts`` for SGLang, ``return_token_ids``
plus the server-wide ``--enable-return-routed-experts`` for vLLM), and ``record(...)`` appends the response to the
spool folder ``watch --spool`` reads. The choice is a hash of the request's id, so it costs no state.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any


def keep(key: str, rate: float) -> bool:
    """Deterministic sampling: True for about ``rate`` of keys."""
    if rate >= 1.0:
        return True
    return (zlib.crc32(str(key).encode()) & 0xFFFFFFFF) < rate * 0x100000000


class RoutedSampler:
    def __init__(self, spool: str | Path, rate: float, engine: str = "sglang", rotate_lines: int = 256):
        self.spool, self.rate, self.engine, self.rotate = Path(spool), float(rate), engine, rotate_lines
        self.spool.mkdir(parents=True, exist_ok=True)
        self._fh = None
        self._lines = 0
        self._name = None

    def prepare(self, body: dict[str, Any], key: str) -> bool:
        """Ask the engine for this request's routed experts when it is sampled; True when it is."""
        if not keep(key, self.rate):
            return False
        if self.engine == "sglang":
            body["return_routed_experts"] = True
        else:
            body["return_token_ids"] = True
        return True

    def record(self, key: str, response: Any, domain: str | None = None) -> None:
        """Append one response to the spool (files are renamed to ``*.jsonl`` when full: watch reads whole ones)."""
        if self._fh is None:
            self._name = f"spool-{os.getpid()}-{time.time_ns()}"
            self._fh = open(self.spool / f".{self._name}.part", "w")
        self._fh.write(json.dumps({"prompt_id": key, "domain": domain, "response": response}) + "\n")
        self._lines += 1
        if self._lines >= self.rotate:
            self.flush()

    def flush(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        os.replace(self.spool / f".{self._name}.part", self.spool / f"{self._name}.jsonl")
        self._fh, self._lines = None, 0
