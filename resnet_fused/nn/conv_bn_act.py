"""rf.nn.ConvBNAct: conv2d + BatchNorm2d (+ residual) (+ ReLU) as one module."""
import torch
from torch import nn

from .fused import FusedModule, check_input, check_norms, init_fused_state


class ConvBNAct(FusedModule):
    """relu(bn(conv(x)) + residual), with the parameters of an ordinary nn.Conv2d (`conv`) and
    nn.BatchNorm2d (`bn`), so state_dicts carry `conv.weight`, `bn.running_mean`, ...

    eval: one `conv_bn_act` with the BN folded in (cached, see `resnet_fused.nn.fused`); training: the
    conv, then `bn_act(training=True)`. `padding=None` keeps the spatial size at stride 1, as
    torchvision's Conv2dNormActivation does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 relu: bool = True, norm_layer=None, *, backend: str | None = None):
        super().__init__(backend)
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.bn = (norm_layer or nn.BatchNorm2d)(out_channels)
        self.relu = relu
        check_norms(self, ["bn"])

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module, relu: bool = True, *,
                     backend: str | None = None) -> "ConvBNAct":
        """A ConvBNAct that uses these very modules (their parameters, device, dtype and mode)."""
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            raise TypeError(f"ConvBNAct.from_modules: conv must be an nn.Conv2d with zero padding, got {conv}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        init_fused_state(module, backend)
        module.conv, module.bn, module.relu = conv, bn, relu
        check_norms(module, ["bn"])
        module.training = bn.training
        return module

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # The submodules from _modules directly: nn.Module.__getattr__ costs about a microsecond a call here.
        conv, bn = self._modules["conv"], self._modules["bn"]
        check_input(x, conv.in_channels, "ConvBNAct")
        return self._conv_bn("conv", x, conv, bn, residual, self.relu)

    def _fused_norms(self):
        return [self.bn]

    def extra_repr(self) -> str:
        return ", ".join(p for p in (f"relu={self.relu}", super().extra_repr()) if p)
