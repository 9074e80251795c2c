"""resnet-fused: fused conv + BN + residual + ReLU kernels for residual networks.

    import resnet_fused as rf
    y = rf.conv_bn_act(x, *rf.fold_bn(conv.weight, conv.bias, bn), residual=identity)
"""
from . import backends as _backends
from ._library import build_info
from .backends import available_backends, use_backend
from .ops import add_act, bn_act, conv_bn_act, conv_stats, fold_bn, max_pool2d, scale_add_act
from . import models, nn
from .fuse import fuse

_backends.refresh_kernel_table()

__version__ = "0.1.0"
__all__ = ["add_act", "available_backends", "bn_act", "build_info", "conv_bn_act", "conv_stats", "fold_bn", "fuse",
           "max_pool2d", "models", "nn", "scale_add_act", "use_backend"]
