"""Timing: triton.testing.do_bench on a GPU (median and 20/80% quantiles after warm-up), PyTorch's
benchmark Timer on a CPU (median and 20/80% quantiles of blocked runs); and the side-by-side comparison of
several providers, interleaved round by round on a CPU, where a shared machine's noise would otherwise favour
whichever ran in a quiet moment."""
import math
import statistics
import time
from collections.abc import Callable

import numpy
import torch

# Providers the others are compared against, when a comparison has them.
BASELINES = ("eager", "conv_alone")


def measure(fn, device: torch.device, min_run_time: float = 0.2) -> dict:
    """Milliseconds per call of fn(): {"median_ms", "low_ms", "high_ms"}."""
    if device.type == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "low_ms": low, "high_ms": high}
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call allocations and dispatch caches
    runs = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    median, low, high = (float(q) * 1e3 for q in numpy.percentile(runs.times, [50, 20, 80]))
    return {"median_ms": median, "low_ms": low, "high_ms": high}


def _summary(times_ms: list[float]) -> dict:
    median, low, high = (float(q) for q in numpy.percentile(times_ms, [50, 20, 80]))
    return {"median_ms": median, "low_ms": low, "high_ms": high}


def measure_side_by_side(fns: dict[str, Callable], device: torch.device, min_run_time: float = 0.2,
                         min_rounds: int = 7) -> dict[str, dict]:
    """Per provider: its timing (as `measure`) and, for each baseline among `fns`, `vs_<baseline>`: how many times
    faster than the baseline it ran. On a CPU the providers run interleaved, round after round (each provider a
    block of calls per round, the order rotated each round), and the ratio is the median of the per-round ratios;
    on a GPU, do_bench's medians are steady enough to divide."""
    names = list(fns)
    if device.type == "cuda":
        result = {name: measure(fn, device, min_run_time) for name, fn in fns.items()}
        for name in names:
            for baseline in BASELINES:
                if baseline in result and name != baseline:
                    result[name][f"vs_{baseline}"] = result[baseline]["median_ms"] / result[name]["median_ms"]
        return result
    calls = {}
    for name, fn in fns.items():  # warm-up, and calls per block: about 5 ms of work, at least one call
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(0.005 / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds, start = 0, time.perf_counter()
    while rounds < min_rounds or (time.perf_counter() - start < min_run_time * len(names) and rounds < 200):
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            fn, n = fns[name], calls[name]
            begin = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - begin) / n * 1e3)
        rounds += 1
    result = {name: {**_summary(times[name]), "rounds": rounds} for name in names}
    for name in names:
        for baseline in BASELINES:
            if baseline in times and name != baseline:
                result[name][f"vs_{baseline}"] = statistics.median(
                    b / t for b, t in zip(times[baseline], times[name]))
    return result
