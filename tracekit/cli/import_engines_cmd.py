"""`tracekit import sglang-per-token | sglang-stat | routed-experts | trtllm-stats`: serving-engine recordings."""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from ._params import MAX_EXPERTS, MAX_LAYERS
from .import_cmd import import_app

Domain = Literal["code", "math", "chat", "general", "unknown"]  # tracekit.datasets.DOMAINS + unknown
_MODEL_HELP = ("Registry name (see `tracekit models`) or a geometry like experts=256,top_k=8,moe_layers=3-60,"
               "num_layers=61[,name=my-model].")


def _run(fmt: str, sources: List[Path], out: Path, model: Optional[str], num_experts: Optional[int],
         top_k: Optional[int], moe_layers: Optional[str], num_layers: Optional[int], dataset: Optional[str],
         domain: str, slot_map: Optional[Path] = None, sizes: Optional[dict] = None,
         max_line: Optional[str] = None) -> None:
    from rich.console import Console

    from ..importers.engines import import_engine_run

    from ..progress import status

    from ..jsonlines import max_line_bytes, parse_line_limit

    with max_line_bytes(parse_line_limit(max_line)), \
            status(f"importing {len(sources)} {fmt} source{'s' if len(sources) != 1 else ''} into {out}"):
        m = import_engine_run(fmt, sources, out, model=model, num_experts=num_experts, top_k=top_k,
                              moe_layers=moe_layers, num_layers=num_layers, dataset=dataset, domain=domain,
                              slot_map=slot_map, **(sizes or {}))
    kind = m.get("kind", "routes")
    t = m.get("totals", {}).get(kind, {})
    con = Console(markup=False, highlight=False)  # paths and notes are text, not rich markup
    if kind == "routes":
        con.print(f"wrote {out}: {t.get('requests', 0)} requests, {t.get('prompt_tokens', 0)} prefill + "
                  f"{t.get('generated_tokens', 0)} decode tokens, {t.get('rows', 0)} rows, {t.get('bytes', 0)} bytes")
    else:
        con.print(f"wrote {out}: {t.get('rows', 0)} (window, layer, expert) counts, {t.get('bytes', 0)} bytes")
    for note in m.get("notes", []):
        con.print(f"  note: {note}")


def _register(fmt: str, help_text: str, source_help: str, with_slot_map: bool = False) -> None:
    def command(
        sources: List[Path] = typer.Argument(..., help=source_help),
        model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
        out: Path = typer.Option(..., "--out", help="New run directory to create (must not hold files)."),
        num_experts: Optional[int] = typer.Option(None, "--num-experts", min=1, max=MAX_EXPERTS, help="Routed experts per MoE layer."),
        top_k: Optional[int] = typer.Option(None, "--top-k", min=1, max=1024, help="Experts per token."),
        moe_layers: Optional[str] = typer.Option(None, "--moe-layers", help="MoE layer indices, e.g. 3-60 or 1-47:2."),
        num_layers: Optional[int] = typer.Option(None, "--num-layers", min=1, max=MAX_LAYERS, help="Decoder layers of the model."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset label stored in the run."),
        domain: Domain = typer.Option("unknown", "--domain", help="Task family of every request."),
        slot_map: Optional[Path] = typer.Option(
            None, "--slot-map", hidden=not with_slot_map, help="The server's --init-expert-location JSON, to map physical slots (redundant "
            "experts) back to logical experts."),
        hidden_size: Optional[int] = typer.Option(None, "--hidden-size", min=1, max=1 << 24, help="The model's hidden size (default: the registry's)."),
        moe_intermediate_size: Optional[int] = typer.Option(None, "--moe-intermediate-size", min=1, max=1 << 24, help="One routed expert's FFN width (default: the registry's)."),
        expert_dtype: Optional[str] = typer.Option(None, "--expert-dtype", help="Dtype of the expert weights: bfloat16, float8_e4m3fn, mxfp4, ... (default: the registry's)."),
        max_line: Optional[str] = typer.Option(None, "--max-line-bytes", help="JSONL sources: longest line read, e.g. 256MB (default 64MB)."),
    ) -> None:
        sizes = {"hidden_size": hidden_size, "moe_intermediate_size": moe_intermediate_size, "expert_dtype": expert_dtype}
        _run(fmt, sources, out, model, num_experts, top_k, moe_layers, num_layers, dataset, domain, slot_map, sizes,
             max_line)

    # --slot-map shows only where it applies; elsewhere it stays accepted so the importer can say why it is refused
    command.__doc__ = help_text
    import_app.command(fmt)(command)


_register("sglang-per-token", "SGLang expert distribution recorder dumps (per_token mode) -> routes.",
          "expert_distribution_recorder_*_RANK.pt files from /dump_expert_distribution_record.")
_register("sglang-stat", "SGLang expert distribution recorder dumps (stat mode) -> loads.",
          "expert_distribution_recorder_*.pt files (logical_count).")
_register("routed-experts", "SGLang or vLLM responses with routed experts (JSONL) -> routes.",
          "JSONL files, one /generate or /v1/completions response per line.", with_slot_map=True)
_register("trtllm-stats", "TensorRT-LLM expert statistics (EXPERT_STATISTIC_PATH) -> loads.",
          "EXPERT_STATISTIC_PATH directories holding meta_info.json and rank*.safetensors.")
