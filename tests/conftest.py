"""Shared fixtures: prompt-set excerpts in tests/data (always present) and the real Mixtral traces (optional).

The real traces have no license to redistribute, so they are never in the repository: tests that need them take the
``shared_data`` fixture and skip, all with one reason, unless the data folder is found. It is
``$TRACEKIT_SHARED_DATA`` when set, else ``../shared/data`` next to the checkout; it must hold
``traces/mixtral-8x7b/``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_VAR = "TRACEKIT_SHARED_DATA"
PROMPT_DATA = Path(__file__).resolve().parent / "data"
MIXTRAL = Path("traces") / "mixtral-8x7b"


def _shared_data_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config) -> None:
    """A folder named explicitly that lacks the traces is a mistake to report, not a reason to skip quietly."""
    env = os.environ.get(ENV_VAR)
    if env and not (_shared_data_dir() / MIXTRAL).is_dir():
        raise pytest.UsageError(f"{ENV_VAR}={env}: no {MIXTRAL}/ in that folder; point it at the folder that holds it")


@pytest.fixture(scope="session")
def prompt_data() -> Path:
    """tests/data: the first 20 records of each permissively licensed prompt set (see tests/data/README.md)."""
    return PROMPT_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding ``traces/mixtral-8x7b/`` (the real Mixtral traces); skips when there is none."""
    root = _shared_data_dir()
    if not (root / MIXTRAL).is_dir():
        pytest.skip(f"real Mixtral traces not found ({root / MIXTRAL}); set {ENV_VAR}=/path/to/shared/data to run")
    return root
