"""The Triton backend: custom ops around the launchers in triton_kernels/.

Registered with torch.library.custom_op + register_fake, not triton_op: triton_op's wrap_triton fails
under TRITON_INTERPRET=1 (shared ENV.md), and one registration path that CI can test on a CPU is
worth more than Inductor seeing inside a kernel that is already fused.
"""
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ._layout import empty_output, output_memory_format
from .add_act import register_formulas as register_add_act_formulas
from .bn_act import register_formulas as register_bn_act_formulas
from .conv_bn_act import conv_output_shape
from .conv_bn_act import register_formulas as register_conv_bn_act_formulas
from .conv_stats import register_bn_add_relu_formulas
from .conv_stats import register_formulas as register_conv_stats_formulas

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

def _dense_as(x: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """t contiguous in x's output memory format: the BN kernels take every activation in one layout."""
    return None if t is None else t.contiguous(memory_format=output_memory_format(x))


if TRITON_INSTALLED:
    from ..triton_kernels import bn_act as bn_kernels
    from ..triton_kernels import conv_bn_act as conv_kernels
    from ..triton_kernels import conv_stats as conv_stats_kernels

    @torch.library.custom_op("resnet_fused::conv_bn_act_triton", mutates_args=())
    def conv_bn_act_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                           stride: list[int], padding: list[int], dilation: list[int], groups: int,
                           relu: bool) -> Tensor:
        out = empty_output(x, conv_output_shape(x.shape, weight.shape, stride, padding, dilation))
        return conv_kernels.conv_bn_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, out)

    register_conv_bn_act_formulas("resnet_fused::conv_bn_act_triton")

    @torch.library.custom_op("resnet_fused::conv_stats_triton", mutates_args=())
    def conv_stats_triton(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                          stride: list[int], padding: list[int], dilation: list[int], groups: int,
                          relu: bool) -> tuple[Tensor, Tensor, Tensor]:
        out = empty_output(x, conv_output_shape(x.shape, weight.shape, stride, padding, dilation))
        return conv_stats_kernels.conv_stats(x, weight, scale, shift, stride, padding, dilation, groups, relu, out)

    register_conv_stats_formulas("resnet_fused::conv_stats_triton")

    @torch.library.custom_op("resnet_fused::bn_add_relu_triton", mutates_args=())
    def bn_add_relu_triton(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                           residual_scale: Optional[Tensor], residual_shift: Optional[Tensor]) -> Tensor:
        y = _dense_as(y, y)
        params = [None if t is None else t.contiguous() for t in (scale, shift, residual_scale, residual_shift)]
        out = empty_output(y, y.shape)
        return conv_stats_kernels.bn_add_relu(y, params[0], params[1], _dense_as(y, residual), params[2], params[3],
                                              out)

    register_bn_add_relu_formulas("resnet_fused::bn_add_relu_triton")

    @torch.library.custom_op("resnet_fused::bn_act_triton", mutates_args=())
    def bn_act_triton(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], running_mean: Tensor,
                      running_var: Tensor, training: bool, momentum: float, eps: float,
                      relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x = _dense_as(x, x)
        out = empty_output(x, x.shape)
        stats = bn_kernels.bn_act_forward(x, weight, bias, _dense_as(x, residual), running_mean, running_var,
                                          training, momentum, eps, relu, out)
        return (out, *stats)

    @torch.library.custom_op("resnet_fused::bn_act_backward_triton", mutates_args=())
    def bn_act_backward_triton(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor, save_mean: Tensor,
                               save_invstd: Tensor, training: bool, relu: bool,
                               need_grad_pre: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = _dense_as(x, x)
        grad_x, grad_pre = empty_output(x, x.shape), empty_output(x, x.shape)
        grad_weight, grad_bias = bn_kernels.bn_act_backward(
            _dense_as(x, grad_out), _dense_as(x, out), x, weight, save_mean, save_invstd, training, relu,
            grad_x, grad_pre)
        # The kernel always writes grad_pre; the op's contract is an empty one when it is not asked for.
        return grad_x, grad_weight, grad_bias, grad_pre if need_grad_pre else grad_pre.new_empty((0,))

    register_bn_act_formulas("resnet_fused::bn_act_triton", "resnet_fused::bn_act_backward_triton")

    @torch.library.custom_op("resnet_fused::add_act_triton", mutates_args=())
    def add_act_triton(x: Tensor, residual: Tensor, relu: bool) -> Tensor:
        x = _dense_as(x, x) if x.dim() == 4 else x.contiguous()
        residual = _dense_as(x, residual) if x.dim() == 4 else residual.contiguous()
        return bn_kernels.add_act(x, residual, relu, empty_output(x, x.shape))

    register_add_act_formulas("resnet_fused::add_act_triton")
