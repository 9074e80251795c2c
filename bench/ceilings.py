"""The machine's ceilings, measured in the same run as the kernels they are quoted against: a
device-to-device copy (bytes read + written) and a large matmul."""
import torch

from .timing import measure


def copy_bandwidth_gbps(device: torch.device, megabytes: int) -> float:
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / timing["median_ms"] / 1e6


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = measure(lambda: torch.matmul(a, b), device)
    return 2 * size**3 / timing["median_ms"] / 1e9


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """{"copy_gbps", "matmul_tflops", and what was measured}: 8192^3 matmul and 1 GiB copies on a GPU,
    smaller ones on a CPU."""
    gpu = device.type == "cuda"
    size = 8192 if gpu else (512 if quick else 2048)
    megabytes = 1024 if gpu else (64 if quick else 256)
    return {
        "copy_gbps": copy_bandwidth_gbps(device, megabytes),
        "copy_what": f"device copy of {megabytes} MiB, bytes read + written",
        "matmul_tflops": matmul_tflops(device, dtype, size),
        "matmul_what": f"{str(dtype)[6:]} matmul {size}^3",
    }
