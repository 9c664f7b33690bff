"""Hardware profiles for the per-step time estimate (:mod:`tracekit.placement.scoring.replay`).

Per GPU: dense BF16 tensor throughput, HBM bandwidth, NVLink bandwidth (one direction) and RDMA bandwidth (one
400 Gb/s NIC per GPU, as in DGX/HGX systems). Peak numbers from the vendors' data sheets; a real kernel reaches
less, so the estimate is a lower bound on time, good for comparing placements, not for promising a latency. Every
field can be overridden (``tracekit place --tflops/--hbm-gbps/--nvlink-gbps/--rdma-gbps``), and another GPU is
described by a JSON file (``tracekit place --gpu-spec FILE.json``, read by :func:`load_gpu_spec`)::

    {"name": "my-gpu", "tflops": 1307, "hbm_gbps": 5300, "nvlink_gbps": 448, "rdma_gbps": 50}

Sources:
- H100 SXM5 and H200 SXM: NVIDIA H100 / H200 Tensor Core GPU data sheets: BF16 tensor 1,979 TFLOP/s *with
  sparsity*, so 989 dense; NVLink 4, 900 GB/s per GPU (both directions) -> 450 GB/s one way. HBM: H100 SXM 80 GB
  HBM3 at 3.35 TB/s; H200 SXM 141 GB HBM3e at 4.8 TB/s (same compute, more and faster memory).
- B200 (HGX B200): NVIDIA Blackwell data sheet: BF16 tensor 4.5 PFLOP/s with sparsity per GPU in HGX B200 (72
  PFLOP/s FP8 training for 8 GPUs), so 2,250 dense; NVLink 5, 1.8 TB/s per GPU -> 900 GB/s one way; HBM3e at
  8 TB/s per GPU (DGX B200 data sheet: 64 TB/s for 8 GPUs).
- RDMA: ConnectX-7 400 Gb/s per GPU (DGX H100/H200/B200 compute fabric: 8 x 400 Gb/s) -> 50 GB/s per direction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ...errors import TracekitError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    tflops: float  # dense BF16 tensor TFLOP/s per GPU
    hbm_gbps: float  # GB/s of HBM bandwidth per GPU
    nvlink_gbps: float  # GB/s per GPU, one direction
    rdma_gbps: float  # GB/s per GPU, one direction (one NIC per GPU)


#: the numeric fields, in the order of the CLI's override flags
RATES = ("tflops", "hbm_gbps", "nvlink_gbps", "rdma_gbps")
_MAX_RATE = 1e7  # far above any GPU (TFLOP/s or GB/s); catches a unit slip (bytes/s typed as GB/s)

PROFILES = {
    "h100": HardwareProfile("h100", tflops=989.0, hbm_gbps=3350.0, nvlink_gbps=450.0, rdma_gbps=50.0),
    "h200": HardwareProfile("h200", tflops=989.0, hbm_gbps=4800.0, nvlink_gbps=450.0, rdma_gbps=50.0),
    "b200": HardwareProfile("b200", tflops=2250.0, hbm_gbps=8000.0, nvlink_gbps=900.0, rdma_gbps=50.0),
}


def _check_rate(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= _MAX_RATE:
        raise TracekitError(f"{where}{key.replace('_', '-')} must be a positive number up to {_MAX_RATE:g}, "
                            f"got {value!r}")
    return float(value)


def get_profile(name: str | HardwareProfile = "h200", *, tflops: float | None = None, hbm_gbps: float | None = None,
                nvlink_gbps: float | None = None, rdma_gbps: float | None = None) -> HardwareProfile:
    """The named profile with any given field overridden (one-line error for an unknown name or a bad value).

    A name outside :data:`PROFILES` is accepted when every rate is given (a GPU described field by field, e.g.
    from :func:`load_gpu_spec`)."""
    over = {k: v for k, v in (("tflops", tflops), ("hbm_gbps", hbm_gbps), ("nvlink_gbps", nvlink_gbps),
                              ("rdma_gbps", rdma_gbps)) if v is not None}
    for k, v in over.items():
        over[k] = _check_rate(k, v, "--")
    if isinstance(name, HardwareProfile):
        prof = name
    else:
        prof = PROFILES.get(str(name).lower())
        if prof is None:
            if len(over) == len(RATES) and str(name).strip():
                return HardwareProfile(str(name), **over)
            raise TracekitError(f"unknown hardware profile {name!r}; use one of {', '.join(PROFILES)} "
                                "or describe the GPU with --gpu-spec FILE.json")
    return replace(prof, **over) if over else prof


def profile_from_spec(spec: Any, where: str = "GPU spec") -> HardwareProfile:
    """A profile from a mapping ``{"name", "tflops", "hbm_gbps", "nvlink_gbps", "rdma_gbps"}``; ``"base": "h200"``
    takes the rates not given from a built-in profile. One-line error naming the field."""
    if not isinstance(spec, Mapping):
        raise TracekitError(f"{where}: a GPU spec is a JSON object like "
                            '{"name": "my-gpu", "tflops": 989, "hbm_gbps": 4800, "nvlink_gbps": 450, "rdma_gbps": 50}')
    known = {f.name for f in fields(HardwareProfile)} | {"base"}
    extra = sorted(set(spec) - known)
    if extra:
        raise TracekitError(f"{where}: unknown field {extra[0]!r}; fields are {', '.join(sorted(known))}")
    base = None
    if spec.get("base") is not None:
        base = PROFILES.get(str(spec["base"]).lower())
        if base is None:
            raise TracekitError(f"{where}: base {spec['base']!r} is not one of {', '.join(PROFILES)}")
    name = spec.get("name", base.name if base else None)
    if not isinstance(name, str) or not name.strip():
        raise TracekitError(f"{where}: field 'name' must be a non-empty string")
    rates = {}
    for key in RATES:
        if key in spec:
            rates[key] = _check_rate(key, spec[key], f"{where}: field ")
        elif base is not None:
            rates[key] = getattr(base, key)
        else:
            raise TracekitError(f"{where}: field {key!r} is missing (or give \"base\": one of {', '.join(PROFILES)})")
    return HardwareProfile(name.strip(), **rates)


def load_gpu_spec(path: str | Path) -> HardwareProfile:
    """Read ``--gpu-spec FILE.json`` (see the module docstring); one-line error for a missing or bad file."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except FileNotFoundError:
        raise TracekitError(f"--gpu-spec {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TracekitError(f"--gpu-spec {p}: cannot read it ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise TracekitError(f"--gpu-spec {p}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return profile_from_spec(spec, f"--gpu-spec {p}")
