"""The error bound every parity check uses, in tests and before any benchmark timing."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parity:
    error: float  # max |actual - oracle|
    torch_error: float  # max |PyTorch's own result in the same dtype - oracle|
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        return f"max error {self.error:.3g} vs bound {self.bound:.3g} (2 x PyTorch's {self.torch_error:.3g} + ulps)"


def parity(actual: torch.Tensor, same_dtype_torch: torch.Tensor, oracle: torch.Tensor) -> Parity:
    """actual passes when its error against the float64 `oracle` is at most twice PyTorch's own error in the
    same dtype, plus a few ulps of the output's magnitude (PyTorch's error can be exactly zero).
    NaN anywhere in `actual` fails."""
    if oracle.numel() == 0:
        return Parity(0.0, 0.0, 0.0)
    error = (actual.double() - oracle).abs().max().item()
    if torch.isnan(actual).any():
        error = float("inf")
    torch_error = (same_dtype_torch.double() - oracle).abs().max().item()
    floor = 4 * torch.finfo(actual.dtype).eps * max(1.0, oracle.abs().max().item())
    return Parity(error, torch_error, 2 * torch_error + floor)
