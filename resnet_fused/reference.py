"""The semantics of every op, in plain PyTorch.

This is the `reference` backend, the float64 oracle of every parity test, and the default on GPUs
whose fused kernels have no recorded parity run (it runs cuDNN through PyTorch).
"""

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

