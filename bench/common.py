"""Helpers shared by the CPU benchmarks (dmd2_step.py, compile_depth.py, convert_throughput.py).

Conventions (as in forward.py / train_step.py): progress goes to stderr, the result is one JSON
line on stdout; every timing comparison runs both sides in the same process, interleaved
(a, b, b, a, ...) so drifts in machine load hit both alike, and reports medians, minima and ratios
together with the 1-minute load average (above the core count the timings are contended).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def device_info(torch_threads: int | None = None) -> dict:
    """The machine fields every benchmark line carries; call it at the end of the run."""
    import jax

    info = {"platform": jax.devices()[0].platform, "cpu_count": os.cpu_count()}
    if torch_threads is not None:
        info["torch_threads"] = torch_threads
    info["loadavg_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count: the timings are contended
    info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")  # malloc settings change XLA's step times
    return info


def versions(*, torch: bool = True) -> dict:
    import jax

    out = {"jax": jax.__version__}
    if torch:
        import diffusers
        import torch as _torch

        out.update(torch=_torch.__version__, diffusers=diffusers.__version__)
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, label: str = "repeat") -> dict[str, list[float]]:
    """Wall seconds of `repeats` calls of each function, alternating which goes first."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        log(f"{label} {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
    return times


def summary(times: list[float], scale: float = 1e3, digits: int = 1) -> dict:
    """{"median", "min"} of a list of seconds, scaled (default: milliseconds)."""
    return {"median": round(statistics.median(times) * scale, digits), "min": round(min(times) * scale, digits)}


def ratio(a: float, b: float, digits: int = 3) -> float:
    return round(a / b, digits)
