"""GPU utilisation and memory per optimizer step, for logs/metrics.jsonl, TensorBoard and train.log.

Memory comes from torch.cuda's allocator (allocated, reserved, the peak during the step: the peak
counter is reset after each sample) and the device's total; utilisation from NVML through
torch.cuda.utilization when the nvidia-ml-py (pynvml) package is installed, else it is left out
(no hard dependency). On the CPU there is nothing to sample: rows and log lines stay as they were.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

MIB = 1024 * 1024
GIB = 1024 * MIB


def sample(device: torch.device) -> dict[str, float] | None:
    """This step's GPU numbers (bytes, percent), or None off CUDA."""
    if device.type != "cuda":
        return None
    out = {
        "allocated": float(torch.cuda.memory_allocated(device)),
        "reserved": float(torch.cuda.memory_reserved(device)),
        "peak": float(torch.cuda.max_memory_allocated(device)),
        "total": float(torch.cuda.get_device_properties(device).total_memory),
    }
    torch.cuda.reset_peak_memory_stats(device)  # the next sample's peak is that step's
    try:
        out["util"] = float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no pynvml, or NVML unusable in this container: leave it out
        pass
    return out


def metrics_fields(stats: Mapping[str, float] | None) -> dict[str, float]:
    """The metrics.jsonl columns for one sample (pure): MiB and percent; {} when there is none."""
    if not stats:
        return {}
    out = {f"gpu_mem_{k}_mib": round(stats[k] / MIB, 1) for k in ("allocated", "reserved", "peak", "total")}
    if "util" in stats:
        out["gpu_util_percent"] = stats["util"]
    return out


def log_text(stats: Mapping[str, float] | None) -> str:
    """The train.log suffix for one sample (pure), e.g. `gpu 87% mem 10.2/24.0 GiB peak 11.0 GiB`; '' without one."""
    if not stats:
        return ""
    util = f" {stats['util']:.0f}%" if "util" in stats else ""
    return (f"gpu{util} mem {stats['allocated'] / GIB:.1f}/{stats['total'] / GIB:.1f} GiB "
            f"peak {stats['peak'] / GIB:.1f} GiB")
