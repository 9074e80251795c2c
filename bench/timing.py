"""Timing: triton.testing.do_bench on a GPU (median and 20/80% quantiles after warm-up), PyTorch's
benchmark Timer on a CPU (median and 20/80% quantiles of blocked runs)."""
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
    times = sorted(runs.times)
    low, high = (times[int(q * (len(times) - 1))] for q in (0.2, 0.8))
    return {"median_ms": runs.median * 1e3, "low_ms": low * 1e3, "high_ms": high * 1e3}
