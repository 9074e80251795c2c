"""rf.nn.BasicBlock and rf.nn.Bottleneck: torchvision's ResNet blocks (same constructor, attribute
names and state_dict keys), running on the fused ops.

Each conv + BN pair is one step of `FusedModule._conv_bn_steps`; the block's last step adds the shortcut
and applies ReLU in the same op. `plain=True` builds the block without its skip connection (no shortcut
is added, and a downsample branch is refused): the "plain" network of the ResNet paper.
"""
import torch
from torch import nn

from .fused import FusedModule, check_input, check_norms, downsample_norms


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _check_plain(plain: bool, downsample) -> None:
    if plain and downsample is not None:
        raise ValueError("a plain block has no skip connection, so it takes no downsample branch (downsample=None)")


class _ResidualBlock(FusedModule):
    """What BasicBlock and Bottleneck share: the main path is the conv + BN steps conv1/bn1, conv2/bn2, ...
    (`_depth` of them), the last one adding the shortcut."""

    _depth: int
    low_memory = False  # Bottleneck's option; see there

    def _steps(self):
        return [(f"conv{i}", getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self._depth + 1)]

    def _check_norms(self) -> None:
        check_norms(self, [f"bn{i}" for i in range(1, self._depth + 1)])

    def forward(self, x: torch.Tensor, *, reuse_input: bool = False) -> torch.Tensor:
        """`reuse_input=True` promises that the caller never reads x again (a ResNet passes it between its own
        blocks): in inference on the cpu backend, the block then adds the convolution into x's memory instead
        of into a copy of it, and returns that memory."""
        check_input(x, self.conv1.in_channels, type(self).__name__)
        steps = self._steps()
        down = None if self.plain else self.downsample
        ds_tail = list(down)[-2:] if down is not None and downsample_norms(down) else []
        if down is None or ds_tail:
            convs = [conv for _, conv, _ in steps] + ds_tail[:1]
            backend = self._conv_stats_backend(x, convs, [bn for _, _, bn in steps] + ds_tail[1:])
            if backend is not None:
                if self.plain:
                    return self._conv_stats_block(backend, x, steps, None)
                if down is None:
                    return self._conv_stats_block(backend, x, steps, x)
                source = x
                for module in list(down)[:-2]:  # e.g. timm's average-pool shortcut
                    source = module(source)
                return self._conv_stats_block(backend, x, steps, (source, *ds_tail))
        shortcut = None if self.plain else self._downsample(x, self.downsample)
        # The shortcut is ours to overwrite when it is x given away, or a fused downsample's fresh output.
        owned = reuse_input if down is None else len(ds_tail) > 0
        return self._conv_bn_steps(x, steps, shortcut, self.low_memory, owns_residual=owned)

    def _fused_norms(self):
        return [bn for _, _, bn in self._steps()] + downsample_norms(self.downsample)


class BasicBlock(_ResidualBlock):
    """torchvision.models.resnet.BasicBlock on the fused ops: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)."""

    expansion: int = 1
    _depth = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None, *,
                 plain: bool = False, backend: str | None = None):
        super().__init__(backend)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        _check_plain(plain, downsample)
        # Same modules in the same order as torchvision: same state_dict keys, same initialization.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.plain = plain
        self._check_norms()


class Bottleneck(_ResidualBlock):
    """torchvision.models.resnet.Bottleneck (ResNet v1.5: the stride on the 3x3 conv) on the fused ops.

    `low_memory=True`: in training on a fused backend, conv3's output is recomputed in the backward instead of
    kept (one activation of the block's output size less, for one more 1x1 conv, about 8% of the block's
    training FLOPs). Same results; no effect in eval, under torch.compile or on the reference backend."""

    expansion: int = 4
    _depth = 3

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None, *,
                 plain: bool = False, backend: str | None = None, low_memory: bool = False):
        super().__init__(backend)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        _check_plain(plain, downsample)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.plain = plain
        self.low_memory = low_memory
        self._check_norms()
