"""The semantics of every op, in plain PyTorch.

This is the `reference` backend, the float64 oracle of every parity test, and the default on GPUs
whose fused kernels have no recorded parity run (it runs cuDNN through PyTorch).
"""

import torch
import torch.nn.functional as F

def conv_bn_act(x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """act(conv2d(x, weight) + bias[c] + residual)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y

def bn_act(x, weight, bias, running_mean, running_var, residual=None, *, training, momentum=0.1, eps=1e-5,
           relu=True):
    """act(batch_norm(x) + residual); in training, updates the running statistics in place."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y

def add_act(x, residual, relu=True):
    """act(x + residual)."""
    y = x + residual
    return F.relu(y) if relu else y


def scale_add_act(x, scale, residual, relu=True):
    """act(x * scale[n, c] + residual), scale of shape (N, C): a squeeze-and-excitation gate, the shortcut, ReLU."""
    y = x * scale[:, :, None, None] + residual
    return F.relu(y) if relu else y


def max_pool2d(x, kernel_size, stride, padding=0, dilation=1, ceil_mode=False):
    """max_pool2d(x), without indices."""
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def conv_stats(x, weight, scale=None, shift=None, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """(y, mean, var): y = conv2d(z, weight), no bias, with z = act(x * scale[c] + shift[c]) (z = x without
    scale and shift) and zero padding applied to z; the mean and biased variance of the conv per channel over
    N, H, W, taken from the accumulator (float32 for a 16-bit x, else x's dtype) before it is rounded to y."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The op's dtypes are its contract: autocast must not recast the conv.
    with torch.autocast(x.device.type, enabled=False):
        z = x
        if scale is not None:
            shape = (1, -1, 1, 1)
            z = x.to(acc_dtype) * scale.to(acc_dtype).reshape(shape) + shift.to(acc_dtype).reshape(shape)
            z = (F.relu(z) if relu else z).to(x.dtype)
        acc = F.conv2d(z.to(acc_dtype), weight.to(acc_dtype), None, stride, padding, dilation, groups)
        var, mean = torch.var_mean(acc, dim=(0, 2, 3), correction=0)
    return acc.to(x.dtype), mean, var
