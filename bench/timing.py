"""Timing: triton.testing.do_bench on a GPU (median and 20/80% quantiles after warm-up), PyTorch's
benchmark Timer on a CPU (median and 20/80% quantiles of blocked runs)."""
import numpy
import torch


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
