"""Hardware profiles for the per-step time estimate (:mod:`tracekit.placement.replay`).

Per GPU: dense BF16 tensor throughput, NVLink bandwidth (one direction) and RDMA bandwidth (one 400 Gb/s NIC per
GPU, as in DGX/HGX systems). Peak numbers from the vendors' data sheets; a real kernel reaches less, so the
estimate is a lower bound on time, good for comparing placements, not for promising a latency. Every field can be
overridden (``tracekit place --tflops/--nvlink-gbps/--rdma-gbps``).

Sources:
- H100 SXM5 and H200 SXM: NVIDIA H100 / H200 Tensor Core GPU data sheets: BF16 tensor 1,979 TFLOP/s *with
  sparsity*, so 989 dense; NVLink 4, 900 GB/s per GPU (both directions) -> 450 GB/s one way.
- B200 (HGX B200): NVIDIA Blackwell data sheet: BF16 tensor 4.5 PFLOP/s with sparsity per GPU in HGX B200 (72
  PFLOP/s FP8 training for 8 GPUs), so 2,250 dense; NVLink 5, 1.8 TB/s per GPU -> 900 GB/s one way.
- RDMA: ConnectX-7 400 Gb/s per GPU (DGX H100/H200/B200 compute fabric: 8 x 400 Gb/s) -> 50 GB/s per direction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import TracekitError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    tflops: float  # dense BF16 tensor TFLOP/s per GPU
    nvlink_gbps: float  # GB/s per GPU, one direction
    rdma_gbps: float  # GB/s per GPU, one direction (one NIC per GPU)


PROFILES = {
    "h100": HardwareProfile("h100", tflops=989.0, nvlink_gbps=450.0, rdma_gbps=50.0),
    "h200": HardwareProfile("h200", tflops=989.0, nvlink_gbps=450.0, rdma_gbps=50.0),
    "b200": HardwareProfile("b200", tflops=2250.0, nvlink_gbps=900.0, rdma_gbps=50.0),
}


def get_profile(name: str | HardwareProfile = "h200", *, tflops: float | None = None,
                nvlink_gbps: float | None = None, rdma_gbps: float | None = None) -> HardwareProfile:
    """The named profile with any given field overridden (one-line error for an unknown name or a bad value)."""
    if isinstance(name, HardwareProfile):
        prof = name
    else:
        prof = PROFILES.get(str(name).lower())
        if prof is None:
            raise TracekitError(f"unknown hardware profile {name!r}; use one of {', '.join(PROFILES)}")
    over = {k: v for k, v in (("tflops", tflops), ("nvlink_gbps", nvlink_gbps), ("rdma_gbps", rdma_gbps))
            if v is not None}
    for k, v in over.items():
        if not v > 0:
            raise TracekitError(f"--{k.replace('_', '-')} must be positive, got {v}")
    return replace(prof, **over) if over else prof
