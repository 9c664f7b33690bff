"""The prompt text of the requests placement reads, looked up from the runs (runs store dataset and prompt id, not
text) through one DuckDB query over their routes, and the model the runs were recorded with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import TracekitError


def run_models(runs: Sequence[Any]) -> dict[str, Any]:
    """The model the runs were recorded with (manifest ``model``: name, hub_id); {} when they disagree or lack one."""
    from ...store import open_run

    models = []
    for p in runs:
        m = open_run(p).manifest.get("model") or {}
        models.append({k: m.get(k) for k in ("name", "hub_id") if m.get(k)})
    return models[0] if models and all(m == models[0] for m in models) else {}


def request_prompts(runs: Sequence[Any], traces) -> np.ndarray:
    """(R_n,) object: the prompt text of each request of ``traces``, or None where it cannot be found here.

    Runs store (dataset, prompt_id), not text. The text comes from the dataset registry: the run's ``data_file`` or
    the bundled / hub copy (skipped offline); a prompt id that is a record index (what JSONL imports write) is
    looked up by position.
    """
    import duckdb

    from ...datasets import get_dataset, load_prompts
    from ...query import sql_text
    from ...store import open_run

    where: dict[str, tuple[str, str]] = {}
    data_files: dict[str, str] = {}
    con = duckdb.connect()
    for p in runs:
        run = open_run(p)
        if run.kind != "routes" or not run.files.get("routes"):
            continue
        ds = run.manifest.get("dataset") or {}
        if ds.get("data_file") and ds.get("name"):
            data_files[str(ds["name"])] = str(ds["data_file"])
        files = [str(f) for f in run.files["routes"]]
        for rid, dataset, pid in con.sql(sql_text("placement_prompts"), params={"files": files}).fetchall():
            where[f"{run.run_id}:{rid}"] = (str(dataset), str(pid))
    con.close()
    texts_by_set: dict[str, tuple[dict[str, str], list[str]] | None] = {}
    out = np.full(traces.num_requests, None, dtype=object)
    keys = traces.request_key if traces.request_key is not None else []
    for r, key in enumerate(keys):
        if key not in where:
            continue
        dataset, pid = where[key]
        if dataset not in texts_by_set:
            try:
                cfg = get_dataset(dataset)
                df = data_files.get(dataset)
                prompts = load_prompts(cfg, data_file=Path(df) if df and Path(df).is_file() else None)
                by_pos = [p.text for p in prompts] if not cfg.min_chars else []
                texts_by_set[dataset] = ({p.prompt_id: p.text for p in prompts}, by_pos)
            except TracekitError:
                texts_by_set[dataset] = None
        found = texts_by_set[dataset]
        if found is None:
            continue
        by_id, by_pos = found
        if pid in by_id:
            out[r] = by_id[pid]
        elif pid.isdigit() and int(pid) < len(by_pos):
            out[r] = by_pos[int(pid)]
    return out
