"""`tracekit import jsonl`: per-token routing records in JSON Lines -> a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from ._params import MAX_EXPERTS, MAX_LAYERS
from .import_cmd import import_app
from .import_engines_cmd import Domain


@import_app.command("jsonl")
def import_jsonl_cmd(
    files: List[Path] = typer.Argument(..., help="JSONL files, one routing record (token x layer) per line."),
    model: str = typer.Option(..., "--model", help="Model name stored in the run (e.g. mixtral-8x7b)."),
    out: Path = typer.Option(..., "--out", help="New run directory to create."),
    field_map: Optional[str] = typer.Option(
        None, "--field-map",
        help="key=field,... for experts, weights, request, layer, position, dataset, token_id "
        "(default experts=experts,weights=gating_probs,request=problem_id,layer=layer,"
        "position=token_idx|token_pos,dataset=dataset).",
    ),
    phase: Literal["auto", "decode", "prefill"] = typer.Option("auto", "--phase", help="decode, prefill or auto (split prompt + step-major decode)."),
    num_experts: Optional[int] = typer.Option(None, "--num-experts", min=1, max=MAX_EXPERTS, help="Routed experts per layer (default: max id + 1)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, max=1024, help="Experts per token (checked against the records)."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", min=1, max=MAX_LAYERS, help="Layers of the model (default: max layer + 1)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name for every record (overrides the field)."),
    domain: Optional[Domain] = typer.Option(None, "--domain", help="Domain for every record (default: from the dataset name)."),
    weight_dtype: Literal["float16", "float32"] = typer.Option("float32", "--weight-dtype", help="How the gate weights are stored: float16 or float32."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", min=1, max=1 << 24, help="The model's hidden size (default: the registry's, else unrecorded)."),
    moe_intermediate_size: Optional[int] = typer.Option(None, "--moe-intermediate-size", min=1, max=1 << 24, help="One routed expert's FFN width (default: the registry's)."),
    expert_dtype: Optional[str] = typer.Option(None, "--expert-dtype", help="Dtype of the expert weights: bfloat16, float8_e4m3fn, mxfp4, ... (default: the registry's)."),
    max_line: Optional[str] = typer.Option(None, "--max-line-bytes", help="Longest line read, e.g. 256MB (default 64MB; a longer line is refused in one line)."),
) -> None:
    """Import per-token routing records (JSON Lines) into a tracekit run directory."""
    from rich.console import Console

    from ..importers.jsonl import import_jsonl
    from ..store import open_run

    from ..progress import status

    from ..jsonlines import max_line_bytes, parse_line_limit

    with max_line_bytes(parse_line_limit(max_line)), \
            status(f"importing {len(files)} file{'s' if len(files) != 1 else ''} into {out}"):
        path = import_jsonl(files, model=model, out=out, field_map=field_map, phase=phase, num_experts=num_experts,
                            top_k=top_k, num_layers=num_layers, dataset=dataset, domain=domain,
                            weight_dtype=weight_dtype, hidden_size=hidden_size,
                            moe_intermediate_size=moe_intermediate_size, expert_dtype=expert_dtype)
    run = open_run(path)
    t = run.manifest["totals"]["routes"]
    Console(markup=False, highlight=False).print(
        f"wrote {out}: {t['requests']} requests, {t['prompt_tokens']} prompt + {t['generated_tokens']} generated tokens, "
        f"{t['rows']} rows, {t['bytes']} bytes; " + "; ".join(run.manifest.get("notes", []))
    )
