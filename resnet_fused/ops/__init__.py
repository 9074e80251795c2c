"""The public ops: argument checks, backend choice, fake kernels and autograd."""
from .add_act import add_act
from .bn_act import bn_act
from .conv_bn_act import conv_bn_act
from .conv_stats import conv_stats
from .fold_bn import fold_bn
from .max_pool import max_pool2d
from .scale_add_act import scale_add_act
from . import triton_backend  # noqa: F401  (registers the Triton ops)

__all__ = ["add_act", "bn_act", "conv_bn_act", "conv_stats", "fold_bn", "max_pool2d", "scale_add_act"]
