"""Memory-format rules of the ops, mirrored from csrc/layout.h so fake kernels match real ones."""
import torch


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is channels_last-contiguous (and not also NCHW-contiguous), else NCHW.
    An empty tensor counts as NCHW-contiguous whatever its strides: the channels_last test decides."""
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not (x.is_contiguous() and x.numel() > 0)):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An uninitialized output of `shape` in the memory format the ops give for input `x`."""
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=output_memory_format(x))


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is contiguous in either format; otherwise a copy in the format its strides
    resemble (channels innermost: channels_last), so slices of channels_last tensors stay NHWC."""
    if x.dim() != 4 or x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    channels_innermost = x.stride(1) == min(x.stride())
    return x.contiguous(memory_format=torch.channels_last if channels_innermost else torch.contiguous_format)
