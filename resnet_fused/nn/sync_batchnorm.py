"""rf.nn.convert_sync_batchnorm: synchronized batch statistics for a model with fused modules."""
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fused import FusedModule


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """The fused counterpart of nn.SyncBatchNorm.convert_sync_batchnorm.

    Every FusedModule in `module` gets `process_group`, which it passes to rf.bn_act in training, so
    its batch statistics are reduced across that group; every other BatchNorm layer (one that no fused
    module replaces, e.g. in a timm stem) becomes an nn.SyncBatchNorm, as torch's function does.
    `process_group=None` means the default group (torch.distributed.group.WORLD), which needs
    torch.distributed initialized first. Returns the module (a new one when `module` itself was a
    BatchNorm layer).
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "convert_sync_batchnorm: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first, or pass a process_group"
            )
        process_group = dist.group.WORLD
    return _convert(module, process_group, set())


def _convert(module: nn.Module, process_group, fused_norms: set[int]) -> nn.Module:
    if isinstance(module, _BatchNorm):
        if id(module) in fused_norms:  # its fused module computes it, with the process group
            return module
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, FusedModule):
        module.process_group = process_group
        fused_norms = fused_norms | {id(norm) for norm in module._fused_norms()}
    # rf.fuse's graph pass puts a module's fused steps beside the BN layers they compute
    fused_norms = fused_norms | {id(norm) for child in module.children() if isinstance(child, FusedModule)
                                 for norm in child._fused_norms()}
    for name, child in module.named_children():
        new = _convert(child, process_group, fused_norms)
        if new is not child:
            setattr(module, name, new)
    return module
