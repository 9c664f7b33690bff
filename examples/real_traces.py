"""Real routing: the Mixtral-8x7B traces of ../shared/data imported, analysed and placed.

The traces (HumanEval and GSM8K through Mixtral-8x7B-Instruct in vLLM, 32 MoE layers, 8 experts, top-2) come from
a public research repository without a license to redistribute, so they are not in this repository. Point
TRACEKIT_SHARED_DATA at the folder that holds `traces/mixtral-8x7b/` (default: ../shared/data next to the repo).

    python examples/real_traces.py [OUT]          # exits 0 with one line when the traces are absent
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

from tracekit.analysis import analyze
from tracekit.importers.jsonl import import_jsonl
from tracekit.placement.select import place
from tracekit.placement.scoring.table import WIDTH, pick_line, render_narrow
from tracekit.placement.data.traces import load_traces

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRACEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
TRACES = SHARED / "traces" / "mixtral-8x7b"
# one run per task family: two problems each, decode only, plus one problem with prefill and decode
FILES = {
    "code": ["routing_data_collected_humaneval_2_routing.jsonl", "analysis_deep_analysis_routing_raw.jsonl"],
    "math": ["routing_data_collected_gsm8k_2_routing.jsonl"],
}


def main(out: Path) -> None:
    runs = []
    for domain, files in FILES.items():
        run = out / domain
        if not (run / "manifest.json").exists():
            # the defaults read these files' fields (experts, gating_probs, problem_id, layer, token_idx/token_pos)
            import_jsonl([TRACES / f for f in files], model="mixtral-8x7b", out=run)
        runs.append(run)

    for name, result in analyze(runs, what="imbalance,domain,correlation").items():
        for title, table in result.summaries.items():
            print(f"\n== {name}: {title}\n{table.to_pandas().to_string(index=False)}")
        for note in result.notes:
            print(f"note: {note}")

    # 8 experts on 2 nodes x 2 GPUs with one spare slot per GPU; fitted on each request's first half of tokens
    comparison, validation = place(load_traces(runs), {"nodes": 2, "gpus_per_node": 2, "redundant": 4}, "all",
                                   engine="sglang", split="tokens", max_imbalance=1.25,
                                   hidden_size=4096, moe_intermediate_size=14336, decode_batch=16)
    Console(width=WIDTH).print(render_narrow(comparison, validation.to_json()))
    print(pick_line(validation.to_json()))


if __name__ == "__main__":
    if not TRACES.is_dir():
        print(f"skipped: no Mixtral traces at {TRACES} (set TRACEKIT_SHARED_DATA to the folder holding traces/)")
        sys.exit(0)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("examples_out/real_traces"))
