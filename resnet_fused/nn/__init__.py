"""Fused modules: drop-in replacements for torchvision's ResNet blocks, and ConvBNAct."""
from .blocks import BasicBlock, Bottleneck
from .conv_bn_act import ConvBNAct
from .fused import FusedModule
from .sync_batchnorm import convert_sync_batchnorm

__all__ = ["BasicBlock", "Bottleneck", "ConvBNAct", "FusedModule", "convert_sync_batchnorm"]
