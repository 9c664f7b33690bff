"""Which model types of the installed transformers are Mixture-of-Experts families, read from transformers itself.

A *family* is one modeling module of ``transformers.models`` (``modeling_<name>.py``) that defines a routed-experts
module (a class whose name ends in ``Experts``, shared experts excluded) or a known sparse mixture block without one
(Doge's ``CDMoE``). Its model type is the config's own ``model_type`` for that module. Nothing here is a hard-coded
list of families: a family added by a later transformers release shows up here by name, and the tests then require
an adapter for it.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

#: module classes that are a sparse mixture without an ``*Experts`` module (product-key retrieval experts)
_MIXTURE_BLOCKS = ("CDMoE",)


@dataclass(frozen=True)
class MoeFamily:
    model_type: str  # the config's model_type, e.g. "deepseek_v3"
    module: str  # transformers.models.<module>
    experts_classes: tuple[str, ...]  # routed experts module classes defined by the family's modeling code
    router_classes: tuple[str, ...]  # candidate router classes (names with Router / Gate / Gating)


def _modeling(module_name: str):
    try:
        return importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    except Exception:  # a modeling file that needs an optional dependency: not a family we can build
        return None


def _own_module_classes(mod) -> dict[str, type]:
    return {n: c for n, c in vars(mod).items()
            if inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__ == mod.__name__}


@lru_cache(maxsize=1)
def installed_moe_families() -> tuple[MoeFamily, ...]:
    """Every MoE family of the installed transformers, one per modeling module, sorted by model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    by_module: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        by_module.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    families = []
    for module_name, model_types in by_module.items():
        mod = _modeling(module_name)
        if mod is None:
            continue
        classes = _own_module_classes(mod)
        experts = tuple(n for n in classes if n.endswith("Experts") and "Shared" not in n)
        blocks = tuple(n for n in classes if n.endswith(_MIXTURE_BLOCKS))
        if not experts and not blocks:
            continue
        routers = tuple(n for n in classes if any(s in n for s in ("Router", "Gate", "Gating"))
                        and "Norm" not in n and "Delta" not in n)
        # the family's own model type: the one spelled like its module, else the shortest of its model types
        main = next((t for t in model_types if t.replace("-", "_") == module_name), min(model_types, key=len))
        families.append(MoeFamily(main, module_name, experts or blocks, routers))
    return tuple(sorted(families, key=lambda f: f.model_type))
