"""The Triton backend: custom ops around the launchers in triton_kernels/.

Registered with torch.library.custom_op + register_fake, not triton_op: triton_op's wrap_triton fails
under TRITON_INTERPRET=1 (shared ENV.md), and one registration path that CI can test on a CPU is
worth more than Inductor seeing inside a kernel that is already fused.
"""
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ._layout import empty_output
from .conv_bn_act import conv_output_shape, register_formulas

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

if TRITON_INSTALLED:
    from ..triton_kernels import conv_bn_act as conv_kernels

    @torch.library.custom_op("resnet_fused::conv_bn_act_triton", mutates_args=())
    def conv_bn_act_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                           stride: list[int], padding: list[int], dilation: list[int], groups: int,
                           relu: bool) -> Tensor:
        out = empty_output(x, conv_output_shape(x, weight, stride, padding, dilation))
        return conv_kernels.conv_bn_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, out)

    register_formulas("resnet_fused::conv_bn_act_triton")
