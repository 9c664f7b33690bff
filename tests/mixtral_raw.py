"""Independent reading of the raw Mixtral JSONL traces for the tests (plain json + numpy, no tracekit code).

Phases follow the data README: in analysis_deep_analysis_routing_raw.jsonl rows 0-4197 are prefill (token_pos is
the prompt position) and rows 4198-6776 are decode, ordered by decode step and then by layer; the decode-only files
number each layer's generated tokens with token_idx.
"""
from __future__ import annotations

import json
from pathlib import Path

FILES = (
    "routing_data_collected_humaneval_2_routing.jsonl",
    "routing_data_collected_gsm8k_2_routing.jsonl",
    "analysis_deep_analysis_routing_raw.jsonl",
)
RAW = "analysis_deep_analysis_routing_raw.jsonl"
RAW_PREFILL_ROWS = 4198
DOMAIN = {"humaneval": "code", "gsm8k": "math"}


def records(data_dir: Path) -> list[dict]:
    """One dict per JSONL row: request (file, problem_id), dataset, domain, phase, token (a token key unique within
    the request and phase), layer, experts, weights. Requests are numbered in order of first appearance."""
    out, req_ids = [], {}
    for name in FILES:
        rows = [json.loads(l) for l in open(data_dir / name)]
        step, prev_layer = 0, 10**9
        for i, r in enumerate(rows):
            key = (name, r["problem_id"])
            req_ids.setdefault(key, len(req_ids))
            if name == RAW and i < RAW_PREFILL_ROWS:
                phase, token = "prefill", r["token_pos"]
            elif name == RAW:
                if r["layer"] <= prev_layer:
                    step += 1
                prev_layer = r["layer"]
                phase, token = "decode", step
            else:
                phase, token = "decode", r["token_idx"]
            out.append({"request": req_ids[key], "dataset": r["dataset"], "domain": DOMAIN[r["dataset"]],
                        "phase": phase, "token": token, "layer": r["layer"], "experts": r["experts"],
                        "weights": r["gating_probs"]})
    return out
