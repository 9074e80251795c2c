"""rf.fuse: turns an existing model (torchvision's and timm's ResNets and their relatives, or any model
holding their blocks) into the fused one, keeping its very parameters and buffers: first the blocks known by
their class, then the graph pass (resnet_fused.graph_fuse) for every other conv + BN pattern."""
import copy
import sys

from torch import nn

from .graph_fuse import FuseReport, fuse_graphs, sync_group
from .models.resnet import ResNet
from .nn.blocks import BasicBlock, Bottleneck
from .nn.fused import FusedModule, init_fused_state, is_fusable_conv, is_fusable_norm


def fuse(model: nn.Module, backend: str | None = None, inplace: bool = False,
         low_memory: bool | None = None, report: bool = False) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Returns `model` with every block it knows replaced by its fused counterpart:

    - torchvision.models.resnet.BasicBlock / Bottleneck -> rf.nn.BasicBlock / Bottleneck;
    - timm.models.resnet.BasicBlock / Bottleneck -> the same, when the block is a plain ResNet block
      (ReLU activations; no attention, anti-aliasing, DropBlock or drop path);
    - torchvision.models.ResNet itself -> rf.models.ResNet (the stem conv + BN + ReLU fused too), as a class that
      is a subclass of both (`FusedTorchvisionResNet`), so isinstance checks against torchvision's keep working.

    A block qualifies when its convs are nn.Conv2d with zero padding and its norms nn.BatchNorm2d or
    nn.SyncBatchNorm; anything else, and every module of another class (a subclass included, since it
    may change forward), is left alone. The fused module takes over the original's modules and
    attributes as they are, so the weights, train/eval state, device, dtype, memory format, state_dict
    keys and hooks stay; a block with SyncBatchNorm keeps synchronizing across its process group.
    `backend` is set on every fused module (existing ones included when it is not None); `low_memory` on
    every fused Bottleneck (see rf.nn.Bottleneck; existing ones included when it is not None).

    Then the graph pass fuses conv -> BN [-> + residual] [-> ReLU] and BN [-> + residual] -> ReLU wherever
    else they occur (SE/ECA/SK blocks, pre-activation blocks, deep stems, torchvision's Conv2dNormActivation,
    ...): each module holding such a pattern is traced with torch.fx and becomes an instance of a subclass of
    its class whose forward runs the fused graph (resnet_fused.graph_fuse). In training, a [conv ->] BN -> ReLU
    -> conv (or max pool) runs as the blocks' recomputing op (bn_relu_conv, bn_relu_max_pool), which keeps the
    BN input for the backward instead of the ReLU output; with `low_memory=True`, a BN [-> + residual]
    [-> ReLU] after that conv runs in the same op (bn_relu_conv_bn_act), which recomputes the conv output in the
    backward too (decided when fusing: modules the graph pass rewrote before keep their steps). Patterns it
    cannot prove safe are left alone; `report=True` returns `(model, FuseReport)`, which says for every
    BatchNorm layer, in training and in eval, whether it was fused (and, in training, whether it is
    recomputed) and why not.
    `inplace=False` converts a deep copy; with `inplace=True` the children are replaced in place,
    but a replaced root is a new object: use the returned model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model = _convert(model, backend, low_memory, _known_classes())
    what_was_fused = fuse_graphs(model, backend, low_memory=bool(low_memory))
    return (model, what_was_fused) if report else model


def _known_classes() -> dict[type, tuple]:
    """class -> (fused class, conv/BN names, kind). Only libraries already imported are looked at: a
    model of one of their classes means its module is loaded, and fuse() imports nothing."""
    known = {}
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        known[tv.BasicBlock] = (BasicBlock, ("conv1", "bn1", "conv2", "bn2"), "torchvision")
        known[tv.Bottleneck] = (Bottleneck, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"), "torchvision")
        known[tv.ResNet] = (fused_torchvision_resnet_class(), ("conv1", "bn1"), "torchvision")
    timm = sys.modules.get("timm.models.resnet")
    if timm is not None:
        known[timm.BasicBlock] = (BasicBlock, ("conv1", "bn1", "conv2", "bn2"), "timm")
        known[timm.Bottleneck] = (Bottleneck, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"), "timm")
    return known


def _convert(module: nn.Module, backend: str | None, low_memory: bool | None, known: dict) -> nn.Module:
    if isinstance(module, FusedModule):
        if backend is not None:
            module.backend = backend
    elif type(module) in known and _qualifies(module, *known[type(module)][1:]):
        module = _fused_copy(module, known[type(module)][0], known[type(module)][1], backend)
    if isinstance(module, Bottleneck) and low_memory is not None:
        module.low_memory = low_memory
    for name, child in list(module.named_children()):
        new = _convert(child, backend, low_memory, known)
        if new is not child:
            setattr(module, name, new)
    return module


def _qualifies(module: nn.Module, names: tuple[str, ...], kind: str) -> bool:
    convs, norms = names[0::2], names[1::2]
    if not all(is_fusable_conv(getattr(module, n, None)) for n in convs):
        return False
    if not all(is_fusable_norm(getattr(module, n, None)) for n in norms):
        return False
    if kind == "timm":
        acts = [getattr(module, n) for n in ("act1", "act2", "act3") if hasattr(module, n)]
        identities = [getattr(module, n, None) for n in ("aa", "drop_block")]
        return (all(type(a) is nn.ReLU for a in acts)
                and all(m is None or type(m) is nn.Identity for m in identities)
                and getattr(module, "se", None) is None
                and (getattr(module, "drop_path", None) is None or type(module.drop_path) is nn.Identity))
    return True


def _fused_copy(module: nn.Module, cls: type, names: tuple[str, ...], backend: str | None) -> nn.Module:
    """An instance of `cls` with `module`'s state: the same submodules, parameters, buffers, hooks and
    attributes (copies of the dicts that hold them, so the original keeps its own)."""
    fused = cls.__new__(cls)
    fused.__dict__.update({k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    init_fused_state(fused, backend)
    fused.plain = False
    fused.process_group = sync_group([getattr(module, n) for n in names[1::2]])
    return fused


_FUSED_TORCHVISION_RESNET: list[type] = []


def fused_torchvision_resnet_class() -> type:
    """rf.models.ResNet that is also a torchvision.models.ResNet: what rf.fuse makes of torchvision's ResNet. Its
    methods are rf.models.ResNet's (the MRO puts them first), isinstance checks against either class hold. Made
    on first use, since fuse() imports nothing (torchvision is already loaded when one of its models is fused),
    and found by pickle through the module's __getattr__ below."""
    if not _FUSED_TORCHVISION_RESNET:
        import torchvision.models.resnet as tv

        _FUSED_TORCHVISION_RESNET.append(type("FusedTorchvisionResNet", (ResNet, tv.ResNet), {
            "__module__": __name__, "__qualname__": "FusedTorchvisionResNet",
            "__doc__": f"torchvision's ResNet fused by rf.fuse: rf.models.ResNet's code.\n\n{ResNet.__doc__}"}))
    return _FUSED_TORCHVISION_RESNET[0]


def __getattr__(name: str):
    # pickle looks the class up by name (PEP 562); the lookup makes it in a fresh process.
    if name == "FusedTorchvisionResNet":
        return fused_torchvision_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
