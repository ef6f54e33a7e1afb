"""Run a training program under a clock that notes the time of every optimizer step.

    python bench/sdxl_stepclock.py OUT.json --threads 1 (--module NAME | --script PATH) -- ARGS...

A global torch optimizer step post-hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
fires after each `optimizer.step()` of any optimizer, so `lora-train` and diffusers' example script
are timed by the same code at the same point, with nothing in either program changed. At exit it
writes {"steps": [perf_counter...], "cpu": [process_time...], "start": ..., "end": ..., "peak_rss_mib": ...,
"cuda_peak_mib": ...}.
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import runpy
import sys
import time

_KEEP: list[object] = []


def import_torchvision() -> str:
    """Import torchvision; "ops" when its compiled ops load, "no-ops" when they do not.

    PyPI's torchvision wheels are CUDA builds: beside a CPU-only torch its `_C` extension cannot
    load (no libtorch_cuda), and torchvision 0.28 then fails at import registering fake kernels for
    `torchvision::nms`/`qnms`, the two registrations it does not guard. Declaring those two schemas
    (no kernels) lets the pure-Python parts load; diffusers' script uses only `transforms`."""
    import torch

    try:
        import torchvision  # noqa: F401
        return "ops"
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)
    import torchvision  # noqa: F401
    return "no-ops"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--module")
    what.add_argument("--script")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ns = parser.parse_args(argv[:split])
    rest = argv[split + 1:]
    start = time.perf_counter()

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    if ns.threads:
        torch.set_num_threads(ns.threads)
    steps: list[float] = []
    cpu: list[float] = []  # CPU seconds of the whole process (all threads): contention on a shared machine
    #                        stretches wall time far more than it does CPU time

    def tick(*_: object) -> None:
        steps.append(time.perf_counter())
        cpu.append(time.process_time())

    register_optimizer_step_post_hook(tick)

    def write() -> None:
        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        data = {"start": start, "end": time.perf_counter(), "steps": steps, "cpu": cpu, "cuda_peak_mib": cuda,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        with open(ns.out, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    atexit.register(write)
    if ns.module:
        sys.argv = [ns.module, *rest]
        runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
    else:
        import_torchvision()
        sys.argv = [ns.script, *rest]
        sys.path.insert(0, str(__import__("pathlib").Path(ns.script).resolve().parent))
        runpy.run_path(ns.script, run_name="__main__")


if __name__ == "__main__":
    main()
