"""Folding an eval-mode BatchNorm into the preceding convolution: the one place it is done."""
import torch
from torch import nn


def fold_bn(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
            bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight, bias) such that conv(x, weight) + bias == bn(conv(x, conv_weight) + conv_bias)
    with `bn` in eval mode (its running statistics). Computed in float32 or better, returned in the
    conv weight's dtype."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_bn: bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn: bn has no running statistics (track_running_stats=False); nothing to fold")
    if conv_weight.dim() != 4:
        raise ValueError(f"fold_bn: conv_weight must be 4-D (C_out, C_in/groups, kH, kW), got shape {tuple(conv_weight.shape)}")
    if conv_weight.shape[0] != bn.num_features:
        raise ValueError(
            f"fold_bn: the conv has {conv_weight.shape[0]} output channels but bn has {bn.num_features} features"
        )
    if conv_bias is not None and conv_bias.shape != (conv_weight.shape[0],):
        raise ValueError(f"fold_bn: conv_bias must have shape ({conv_weight.shape[0]},), got {tuple(conv_bias.shape)}")
    dtype = torch.promote_types(conv_weight.dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    shift = -bn.running_mean.to(dtype) * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(dtype) * scale
    if bn.affine:
        scale = scale * bn.weight.to(dtype)
        shift = shift * bn.weight.to(dtype) + bn.bias.to(dtype)
    weight = conv_weight.to(dtype) * scale.reshape(-1, 1, 1, 1)
    return weight.to(conv_weight.dtype), shift.to(conv_weight.dtype)
