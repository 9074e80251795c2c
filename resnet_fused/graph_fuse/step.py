"""The fused modules that replace one conv -> BN [-> + residual] [-> ReLU] (or BN [-> + residual] -> ReLU)
pattern found in a module's graph, one [conv ->] BN -> ReLU -> conv or max pool of a training graph (run as
one recomputing op; with low_memory, also the BN [-> + residual] [-> ReLU] after that conv), and one
[multiply ->] add -> ReLU of values no BN step could take (the tail of an SE/ECA block: conv3 -> BN3, times the
gate, then + shortcut -> ReLU).

A step holds references to the model's own conv and BN modules (and the next conv or pool) without
registering them (they stay where they are, under their own names), so parameters, buffers and state_dict
keys do not change; it has no state of its own besides FusedModule's fold cache.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.utils import _pair

from ..backends import has_kernel, resolve_backend

from ..ops import add_act, bn_act, scale_add_act
from ..ops.conv_bn_act import conv_output_shape
from ..ops.recomputed_bn_relu import bn_relu_conv, bn_relu_max_pool
from ..nn.fused import FusedModule, _cast, _conv_args, _trains, compute_dtype


def _conv_output_shape(x_shape, conv: nn.Conv2d) -> tuple:
    """conv_output_shape for a module's conv, string paddings included ('same' keeps the input's size)."""
    if conv.padding == "same":
        return (x_shape[0], conv.out_channels, *x_shape[2:])
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    return tuple(conv_output_shape(x_shape, conv.weight.shape, conv.stride, padding, conv.dilation))


def _add_outside(y: torch.Tensor, residual: torch.Tensor, relu: bool) -> torch.Tensor:
    """act(y + residual) as PyTorch computes it, for a residual the fused op cannot take (a broadcasting one)."""
    y = y + residual
    return torch.relu(y) if relu else y


def sync_group(norms):
    """The group a SyncBatchNorm among `norms` synchronizes across (its own, else the default one), or None."""
    for norm in norms:
        if isinstance(norm, nn.SyncBatchNorm):
            if norm.process_group is not None:
                return norm.process_group
            if dist.is_available() and dist.is_initialized():
                return dist.group.WORLD
    return None


class GraphFusedStep(FusedModule):
    """act(bn(conv(x)) + residual) for one conv + BN pair of a graph (conv may be None: act(bn(x) + residual)).

    `relu` and whether there is a residual are arguments of the call, fixed by the graph that calls it.
    A residual of another shape than the BN output (a broadcasting add) is added outside the op."""

    def __init__(self, conv: nn.Conv2d | None, bn: nn.Module, backend: str | None = None):
        super().__init__(backend)
        self._targets = (conv, bn)  # a tuple: not registered, so no new state_dict keys
        self.process_group = sync_group([bn])  # a SyncBatchNorm keeps synchronizing

    @property
    def conv(self) -> nn.Conv2d | None:
        return self._targets[0]

    @property
    def bn(self) -> nn.Module:
        return self._targets[1]

    def _fused_norms(self):
        return [self.bn]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
        conv, bn = self._targets[:2]
        if conv is None:
            return self._norm(x, bn, residual, relu)
        if _trains(bn):
            # What _conv_bn runs for a training BN (the conv, then bn_act), without its inference-only steps: each
            # costs microseconds of Python a call, and a training step makes one call per BN.
            y = self._conv(x, conv)
            if residual is not None and residual.shape != y.shape:
                return _add_outside(self._batch_norm(y, bn, None, relu=False), residual, relu)
            return self._batch_norm(y, bn, _cast(residual, y.dtype), relu)
        if residual is not None and tuple(residual.shape) != _conv_output_shape(x.shape, conv):
            return _add_outside(self._conv_bn("conv", x, conv, bn, None, relu=False), residual, relu)
        return self._conv_bn("conv", x, conv, bn, residual, relu)

    def _norm(self, x: torch.Tensor, bn: nn.Module, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
        """act(bn(x) + residual), with bn in the state it is in; a residual of another shape added outside the op,
        one of another dtype cast to x's: a BN runs in its input's dtype (under autocast too), as the conv steps
        cast theirs to the conv output's."""
        if residual is not None and residual.shape != x.shape:
            return _add_outside(self._norm(x, bn, None, relu=False), residual, relu)
        residual = _cast(residual, x.dtype)
        if _trains(bn):
            return self._batch_norm(x, bn, residual, relu)
        return bn_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, residual, training=False,
                      eps=bn.eps, relu=relu, backend=self.backend)

    def extra_repr(self) -> str:
        kind = "bn" if self.conv is None else "conv, bn"
        return ", ".join(p for p in (kind, super().extra_repr()) if p)


class GraphRecomputingStep(GraphFusedStep):
    """then(relu(bn(conv(x)))) for a [conv ->] BN -> ReLU -> `then` of a training graph, `then` a conv (no bias,
    numeric padding) or an nn.MaxPool2d (no indices), or of an eval graph, `then` such a max pool; conv may be None.

    Where the blocks would (FusedModule._recomputes: eager, autograd on, a fused backend, bn in training mode)
    the conv runs alone and BN + ReLU + `then` as one op, bn_relu_conv or bn_relu_max_pool, which keeps the
    BN input for the backward instead of the ReLU output (and, for the pool, its indices). Otherwise the
    steps run one after the other: conv + BN + ReLU as GraphFusedStep runs them, then `then` (a max pool as
    FusedModule._max_pool runs it: without indices where no gradient is recorded)."""

    def __init__(self, conv: nn.Conv2d | None, bn: nn.Module, then: nn.Module, backend: str | None = None):
        super().__init__(conv, bn, backend)
        self._targets = (conv, bn, then)

    @property
    def then(self) -> nn.Module:
        return self._targets[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn, then = self._targets[:3]
        is_conv = isinstance(then, nn.Conv2d)
        # A BN on x itself runs in x's dtype; autocast would run the next conv in another one: not one op.
        if (self._recomputes(x, [bn], [then] if is_conv else []) and (is_conv or not then.return_indices)
                and (conv is not None or x.dtype == compute_dtype(x))):
            y = x if conv is None else self._conv(x, conv)
            if is_conv:
                return bn_relu_conv(y, **self._training_bn_args(bn), conv_weight=_cast(then.weight, y.dtype),
                                    **_conv_args(then))
            return bn_relu_max_pool(y, **self._training_bn_args(bn), kernel_size=_pair(then.kernel_size),
                                    stride=_pair(then.stride), padding=_pair(then.padding),
                                    dilation=_pair(then.dilation), ceil_mode=then.ceil_mode)
        y = super().forward(x, None, relu=True)
        return self._conv(y, then) if is_conv else self._max_pool(y, then)

    def extra_repr(self) -> str:
        kind = ("bn" if self.conv is None else "conv, bn") + ", relu, " + type(self.then).__name__
        return ", ".join(p for p in (kind, FusedModule.extra_repr(self)) if p)


class GraphRecomputingTailStep(GraphRecomputingStep):
    """act(bn2(then(relu(bn(conv(x))))) + residual) for a [conv ->] BN -> ReLU -> conv -> BN2 [-> + residual]
    [-> ReLU] of a training graph fused with low_memory (conv may be None; `then` a conv with no bias and numeric
    padding).

    Where the blocks' low_memory tail would run (GraphRecomputingStep's conditions, both BNs in training mode, a
    residual of the output's shape), the conv runs alone and the rest as one bn_relu_conv_bn_act op, which keeps
    the BN input and the output for the backward, neither the ReLU output nor `then`'s output (it recomputes
    both). Otherwise GraphRecomputingStep runs the first part and BN2 runs as GraphFusedStep runs a BN."""

    def __init__(self, conv: nn.Conv2d | None, bn: nn.Module, then: nn.Conv2d, bn2: nn.Module,
                 backend: str | None = None):
        super().__init__(conv, bn, then, backend)
        self._targets = (conv, bn, then, bn2)
        self.process_group = sync_group([bn, bn2])  # the matcher pairs BNs that synchronize alike

    @property
    def bn2(self) -> nn.Module:
        return self._targets[3]

    def _fused_norms(self):
        return [self.bn, self.bn2]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
        conv, bn, then, bn2 = self._targets
        y_shape = x.shape if conv is None else _conv_output_shape(x.shape, conv)
        fits = residual is None or tuple(residual.shape) == _conv_output_shape(y_shape, then)
        if (fits and self._recomputes(x, [bn, bn2], [then]) and bn.training == bn2.training
                and (conv is not None or x.dtype == compute_dtype(x))):
            y = x if conv is None else self._conv(x, conv)
            return self._recomputed_tail(y, bn, then, bn2, residual, relu)
        return self._norm(super().forward(x), bn2, residual, relu)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(type(self.then).__name__, f"{type(self.then).__name__}, bn2", 1)


class GraphFusedAddReLU(FusedModule):
    """relu(a + b) as one add_act op when a and b are floating-point 4-D tensors of one shape and dtype; with a third
    argument, relu(a * gate + b) (an SE or ECA block's gate applied, then its shortcut added: either factor may be
    the gate) as one scale_add_act op when the gate is one value per sample and channel of the other factor,
    (N, C, 1, 1) or expanded to its shape, and the backend has the op; otherwise the product as PyTorch computes
    it, then the add and ReLU as without a gate."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None:
            gated = _gated(a, gate) or _gated(gate, a)
            if gated is not None and _same_kind(gated[0], b) and _same_kind(*gated, dim=2):
                # The backend add_act would take; one without a scale_add_act kernel (cuda, triton) multiplies first.
                name = resolve_backend("add_act", self.backend, b.device, b.dtype)
                if has_kernel("scale_add_act", name):
                    return scale_add_act(*gated, b, relu=True, backend=name)
            a = a * gate
        if _same_kind(a, b):
            return add_act(a, b, relu=True, backend=self.backend)
        return torch.relu(a + b)


def _same_kind(x: torch.Tensor, other: torch.Tensor, dim: int = 4) -> bool:
    """Whether x is a floating-point 4-D tensor and other a `dim`-D one of its dtype and device, of x's shape
    (dim 4) or its leading dims."""
    return (x.dim() == 4 and x.is_floating_point() and other.dim() == dim and other.shape == x.shape[:dim]
            and other.dtype == x.dtype and other.device == x.device)


def _gated(x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, the gate as an (N, C) view) when gate holds one value per sample and channel of a 4-D x: of shape
    (N, C, 1, 1), or of x's shape with zero strides over H and W (ECA's `gate.expand_as(x)`)."""
    if x.dim() != 4 or gate.dim() != 4 or gate.shape[:2] != x.shape[:2]:
        return None
    if gate.shape[2:] == (1, 1) or (gate.shape == x.shape and gate.stride(2) == 0 and gate.stride(3) == 0):
        return x, gate[:, :, 0, 0]
    return None
