"""rf.models.ResNet and resnet18/34/50/101/152: torchvision's ResNets (same modules, state_dict keys and
initialization) on the fused blocks, plus `plain=True`, the same networks without skip connections."""
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..nn.blocks import BasicBlock, Bottleneck, conv1x1
from ..nn.fused import FusedModule, check_input, check_norms, hooked
from ..ops.recomputed_bn_relu import bn_relu_max_pool


class ResNet(FusedModule):
    """torchvision.models.ResNet with fused blocks and a fused stem (conv1 + bn1 + ReLU in one op; in training
    on a fused backend, the conv, then BN + ReLU + max pool in one op that keeps only the conv output for the
    backward).

    Same constructor as torchvision's, plus `plain` (no skip connections: no shortcut is added and no
    downsample branch is built), `backend` (given to every fused module; None = the ops' default) and
    `low_memory` (Bottleneck networks only: each block recomputes conv3's output in the backward, see
    rf.nn.Bottleneck).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None, norm_layer=None, *,
                 plain: bool = False, backend: str | None = None, low_memory: bool = False):
        super().__init__(backend)
        if not (isinstance(block, type) and issubclass(block, FusedModule)):
            raise TypeError(f"block must be a fused block class (rf.nn.BasicBlock, rf.nn.Bottleneck), got {block!r}")
        if low_memory and not issubclass(block, Bottleneck):
            raise ValueError("low_memory recomputes a Bottleneck's conv3 (ResNet-50/101/152); "
                             f"{block.__name__} has no such conv")
        self._low_memory = low_memory  # for _make_layer, which has torchvision's signature
        if plain and zero_init_residual:
            raise ValueError("zero_init_residual zeroes each block's last BN, which cuts a plain network's signal")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.plain = plain

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        check_norms(self, ["bn1"])

        # torchvision's initialization, in the same order: the same seed gives the same weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if not self.plain and (stride != 1 or self.inplanes != planes * block.expansion):
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        fused = dict(plain=self.plain, backend=self.backend, **({"low_memory": True} if self._low_memory else {}))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer, **fused)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, **fused))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:  # torchvision's name, which some code calls
        check_input(x, self.conv1.in_channels, "ResNet")
        x = self._stages(self._stem(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        """layer1 to layer4. Without autograd, in eager mode, each block's input is the output of the stem's max
        pool or of the block before it, which nothing else reads unless a hook sees it: the block gets it with
        `reuse_input=True` and, in inference on the cpu backend, adds its last convolution into that memory
        instead of into a copy (one read and one write of the block's output less). A hook on the max pool, a
        stage or a block, or a stage that is not an nn.Sequential of fused blocks, ends that: those run as
        nn.Module calls them. Traced, compiled or with autograd, the stages run as nn.Module calls them."""
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or torch.fx._symbolic_trace.is_fx_symbolic_tracing()):
            for layer in layers:
                x = layer(x)
            return x
        owned = type(self.maxpool) is nn.MaxPool2d and not hooked(self.maxpool)
        for layer in layers:
            if type(layer) is not nn.Sequential or hooked(layer):
                x, owned = layer(x), False
                continue
            for block in layer:
                if isinstance(block, (BasicBlock, Bottleneck)) and not hooked(block):
                    x, owned = block(x, reuse_input=owned), True
                else:
                    x, owned = block(x), False
        return x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """maxpool(relu(bn1(conv1(x)))). In training on a fused backend, BN + ReLU run inside the max pool's
        op, which keeps the conv output for the backward and recomputes the ReLU output and the pool's argmax
        from it: eager keeps the conv output, the ReLU output and the pool's int64 indices."""
        pool = self.maxpool
        if type(pool) is nn.MaxPool2d and not pool.return_indices and self._recomputes(x, [self.bn1]):
            y = self._conv(x, self.conv1)
            return bn_relu_max_pool(y, **self._training_bn_args(self.bn1), kernel_size=_pair(pool.kernel_size),
                                    stride=_pair(pool.stride), padding=_pair(pool.padding),
                                    dilation=_pair(pool.dilation), ceil_mode=pool.ceil_mode)
        return self._max_pool(self._conv_bn("stem", x, self.conv1, self.bn1), pool)

    def _fused_norms(self):
        return [self.bn1]


def _resnet(block, layers: list[int], weights, progress: bool, num_classes: int, plain: bool,
            backend: str | None, kwargs: dict[str, Any]) -> ResNet:
    if weights is not None:
        # A torchvision WeightsEnum (e.g. torchvision.models.ResNet50_Weights.DEFAULT): its state_dict
        # loads unchanged, because the keys are torchvision's.
        if plain:
            raise ValueError("pretrained weights are for the residual network: plain=True takes weights=None")
        categories = len(weights.meta["categories"])
        if num_classes != categories:
            raise ValueError(f"num_classes={num_classes}, but the weights have {categories} classes")
    model = ResNet(block, layers, num_classes=num_classes, plain=plain, backend=backend, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def resnet18(num_classes: int = 1000, plain: bool = False, *, backend: str | None = None, weights=None,
             progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision's layout); `plain=True` without skip connections."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, num_classes, plain, backend, kwargs)


def resnet34(num_classes: int = 1000, plain: bool = False, *, backend: str | None = None, weights=None,
             progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision's layout); `plain=True` without skip connections."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, num_classes, plain, backend, kwargs)


def resnet50(num_classes: int = 1000, plain: bool = False, *, backend: str | None = None, weights=None,
             progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (torchvision's layout); `plain=True` without skip connections."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, num_classes, plain, backend, kwargs)


def resnet101(num_classes: int = 1000, plain: bool = False, *, backend: str | None = None, weights=None,
              progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (torchvision's layout); `plain=True` without skip connections."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, num_classes, plain, backend, kwargs)


def resnet152(num_classes: int = 1000, plain: bool = False, *, backend: str | None = None, weights=None,
              progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 (torchvision's layout); `plain=True` without skip connections."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, num_classes, plain, backend, kwargs)
