"""The step every fused module runs: act(BN(conv(x)) + residual), and the cache of folded weights.

eval (the BN uses its running statistics): BN is folded into the conv (`fold_bn`) and the whole step is
one `conv_bn_act` call; a block's steps (or a module's single step) in inference become one `conv_bn_act_chain`
call once their input signature has run through them one by one (`_eval_chain`). The folded weights are cached per
(conv, BN) pair and compute dtype; an entry is used only while every tensor it was computed from is the same
storage at the same version:

    stamp = (bn.eps, (data_ptr, _version) of conv.weight, conv.bias, bn.weight, bn.bias,
             bn.running_mean, bn.running_var, bn.num_batches_tracked)

In-place writes (optimizer steps, load_state_dict, `.copy_`, `.zero_()`) bump `_version`; `.to()`,
`.half()`, `.cuda()`, channels_last and `load_state_dict(assign=True)` give new storage, and `_apply`
clears the cache as well. F.batch_norm updates running statistics *without* bumping their version (it
saves them for backward), but every training step that updates them increments num_batches_tracked,
whose version is in the stamp. The cache is bypassed (the fold recomputed) inside torch.compile /
torch.export (so compiled code recomputes it from the current weights and never reads Python state),
during CUDA-graph capture (each replay refolds), and when autograd needs the fold's gradient (grad
mode on and a parameter that requires grad), so eval-mode gradients reach the conv and BN parameters.

training (or a BN without running statistics): the conv (`conv_bn_act` with no bias, residual or ReLU),
then `bn_act(training=True)`, which adds the residual, applies ReLU and updates the running statistics
as nn.BatchNorm2d does (num_batches_tracked, momentum=None as a cumulative average); on the cpu backend, in eager,
the C++ op rf.bn_act calls there (bn_act_autograd), called directly: the op checks the module's tensors itself,
and rf.bn_act's Python costs microseconds per BN of a training step. Inside a block, a
BN + ReLU that feeds the next conv runs in that conv's op instead (`bn_relu_conv`), which saves the BN
input rather than the ReLU output for the backward (one activation less per inner step); the ResNet stem's
BN + ReLU runs in its max pool's op (`bn_relu_max_pool`) the same way. A block's last BN + ReLU, conv and BN
run as one such op (`bn_relu_conv_bn_act`: one autograd node instead of two), which with `low_memory` (a
Bottleneck's) recomputes the conv output instead of keeping it.

training on a backend in CONV_STATS_BACKENDS (`_conv_stats_block`): every conv of a block runs as
`conv_stats`, which returns its output's batch statistics; each BN's running statistics are updated from
them as F.batch_norm does, and its scale and shift feed the next conv's prologue, so no BN pass runs on
its own. The block's exit applies the last BN (and the downsample branch's) with the shortcut and ReLU.
"""
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backends import has_kernel, resolve_backend, supports_dtype
from ..ops import bn_act, conv_bn_act, conv_stats, fold_bn, max_pool2d
from ..ops._eager_autograd import cpu_node_runs
from ..ops._layout import output_memory_format
from ..ops.conv_bn_act import conv_bn_act_into_residual, conv_output_shape, plain_conv
from ..ops.conv_stats import bn_add_relu
from ..ops.recomputed_bn_relu import bn_relu_conv, bn_relu_conv_bn_act


# Backends whose blocks train on conv_stats. triton: its conv_stats removes the BN passes. The cpu backend
# keeps conv + bn_act, which measured faster on this CPU (README, "How a block computes").
CONV_STATS_BACKENDS = ("triton",)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a conv runs in: the autocast dtype when autocast is on for x's device (and x is
    eligible: floating point, not float64, as autocast decides), else x's own."""
    device = x.device.type
    if x.dtype != torch.float64 and x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def check_input(x, channels: int, who: str) -> None:
    """A clear error for an input that no block can take, before any op sees it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{who} expects {channels} input channels, got x of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input, got {x.dtype}")


def is_fusable_conv(module) -> bool:
    return type(module) is nn.Conv2d and module.padding_mode == "zeros"


def is_fusable_norm(module) -> bool:
    """BatchNorm2d and SyncBatchNorm (the classes themselves: a subclass may change forward)."""
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm)


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _fold(conv: nn.Conv2d, bn, dtype: torch.dtype):
    if isinstance(bn, nn.Identity):  # a BN already folded into the conv by someone else
        return _cast(conv.weight, dtype), _cast(conv.bias, dtype)
    weight, bias = fold_bn(conv.weight, conv.bias, bn)
    return _cast(weight, dtype), _cast(bias, dtype)


# Outputs below this many values run ATen's convolution on plain weights: kOneDnnMinOutput in
# csrc/cpu/conv_bn_act.cpp, which says why.
_ONEDNN_MIN_OUTPUT = 16384


def _onednn_runs(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the CPU backend's conv_bn_act runs this conv of x through oneDNN (csrc/cpu/conv_bn_act.cpp), so
    that a weight prepacked for it pays off: channels_last, float32 or bfloat16 (where oneDNN has it), an output of
    at least _ONEDNN_MIN_OUTPUT values, numeric padding."""
    if isinstance(conv.padding, str) or x.device.type != "cpu" or x.shape[0] == 0:
        return False
    output_shape = conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    return (math.prod(output_shape) >= _ONEDNN_MIN_OUTPUT
            and output_memory_format(x) == torch.channels_last
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _buffer(module: nn.Module, name: str):
    """module.name for a buffer, from _buffers (nn.Module.__getattr__ costs a microsecond a call; a parametrized
    module's attribute is a property instead, so not there)."""
    buffers = module._buffers
    return buffers[name] if name in buffers else getattr(module, name)


def _parameter(module: nn.Module, name: str):
    """module.name for a parameter, as _buffer."""
    parameters = module._parameters
    return parameters[name] if name in parameters else getattr(module, name)


def _trains(bn: nn.Module) -> bool:
    """Whether bn normalizes with batch statistics: training, or no running statistics to use (a _BatchNorm
    registers running_mean as None then)."""
    return isinstance(bn, _BatchNorm) and (bn.training or _buffer(bn, "running_mean") is None)


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _clear_after_load(module, incompatible_keys) -> None:
    # A load_state_dict post hook (module-level so that the module stays picklable). Versions already
    # change on load; this makes the rule independent of how the values were written.
    module.clear_fold_cache()


class FusedModule(nn.Module):
    """Base of every fused module: `backend` (forwarded to the ops; None = their default),
    `process_group` (training BN statistics are synchronized across it when not None), and the
    folded-weight cache. Subclasses call `self._conv_bn(key, x, conv, bn, residual, relu)`."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        init_fused_state(self, backend)

    def clear_fold_cache(self) -> None:
        """Drops the cached folded weights. Never needed after writes that go through PyTorch's
        in-place ops; needed after writes that bypass version counters (`p.data.copy_(...)`, or a
        torch.distributed collective writing into a parameter or BN buffer of an eval-mode model)."""
        self._fold_cache.clear()
        self._chains.clear()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(), channels_last, ...: the folded copies would be on the old device/dtype.
        self._fold_cache.clear()
        self._chains.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # torch.save and copy.deepcopy carry the weights, not folded copies of them.
        state = self.__dict__.copy()
        state["_fold_cache"], state["_chains"] = {}, {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_fold_cache", {})
        self.__dict__.setdefault("_chains", {})
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("process_group", None)

    def _fused_norms(self) -> list[nn.Module]:
        """The BN modules whose forward this module replaces (convert_sync_batchnorm leaves them)."""
        return []

    def _conv_bn(self, key: str, x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                 residual: torch.Tensor | None = None, relu: bool = True, owns_residual: bool = False) -> torch.Tensor:
        """act(bn(conv(x)) + residual), with bn in the state it is in (its own .training). `owns_residual`: the
        caller never reads `residual` again, so inference on the cpu backend may write the output into it. A step of
        its own (_conv_bn_steps): in inference, one conv_bn_act_chain call once its input signature has run."""
        return self._conv_bn_steps(x, [(key, conv, bn)], residual, owns_residual=owns_residual, relu=relu)

    def _conv_bn_step(self, key: str, x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                      residual: torch.Tensor | None = None, relu: bool = True,
                      owns_residual: bool = False) -> torch.Tensor:
        """_conv_bn through the public ops, which check their arguments: one step of _conv_bn_steps."""
        if _trains(bn):
            return self._batch_norm(self._conv(x, conv), bn, _cast(residual, compute_dtype(x)), relu)
        dtype = compute_dtype(x)
        x = _cast(x, dtype)
        weight, bias = self._folded(key, conv, bn, dtype)
        weight = self._prepacked(key, x, conv, weight)
        cast = _cast(residual, dtype)
        if (owns_residual or cast is not residual) and self._writes_residual(x, weight, bias, cast):
            return conv_bn_act_into_residual(x, weight, bias, cast, **_conv_args(conv), relu=relu)
        return conv_bn_act(x, weight, bias, cast, **_conv_args(conv), relu=relu, backend=self.backend)

    def _writes_residual(self, x, weight, bias, residual) -> bool:
        """Whether conv_bn_act may write its output into `residual`, a tensor the caller owns: on the cpu backend,
        with no gradient to record and outside torch.compile/export (which plan their own buffers), when the
        residual already is the buffer the op would write (x's dtype, contiguous in its memory format)."""
        if residual is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
            return False
        return (residual.dtype == x.dtype and residual.is_contiguous(memory_format=output_memory_format(x))
                and resolve_backend("conv_bn_act", self.backend, x.device, x.dtype) == "cpu")

    def _conv_bn_steps(self, x: torch.Tensor, steps, residual: torch.Tensor | None,
                       low_memory: bool = False, owns_residual: bool = False, relu: bool = True) -> torch.Tensor:
        """A block's main path: relu(bn(conv(x))) through `steps`, [(key, conv, bn), ...], the last step adding
        `residual` before its ReLU (`relu`: whether it has one), into `residual` itself in inference when the caller
        `owns_residual`. In inference, once an input signature has run through the steps one by one, one C++ call
        (_eval_chain). In training, each BN + ReLU that feeds another conv runs inside that conv's op
        (bn_relu_conv), which keeps the BN input rather than the ReLU output for the backward; the last conv and BN
        run in the op of the BN + ReLU before them as well (bn_relu_conv_bn_act), which with `low_memory`
        recomputes the last conv's output in the backward instead of keeping it."""
        norms = next_convs = None  # built only where there are two steps or more: a single step is common
        if len(steps) >= 2:
            norms, next_convs = [bn for _, _, bn in steps], [conv for _, conv, _ in steps[1:]]
        if norms is None or not self._recomputes(x, norms, next_convs):
            chain = self._chain_signature(x, steps, residual, owns_residual, relu)
            if chain is not None and chain in self._chains:
                dtype = chain[3]  # the compute dtype, part of the key
                out = self._eval_chain(x, dtype, steps, residual, owns_residual, relu, *self._chains[chain])
                if out is not None:
                    return out
            inputs = []  # each step's input signature, for _eval_chain
            for key, conv, bn in steps[:-1]:
                inputs.append((x.shape, x.stride()))
                x = self._conv_bn_step(key, x, conv, bn)
            key, conv, bn = steps[-1]
            inputs.append((x.shape, x.stride()))
            out = self._conv_bn_step(key, x, conv, bn, residual, relu, owns_residual=owns_residual)
            if chain is not None:
                if len(self._chains) >= 16:  # inputs whose shapes never repeat cannot grow it
                    self._chains.clear()
                # The op's geometry argument, flattened once from the key's per-conv tuples.
                geometry = [n for stride, padding, dilation, groups in chain[-1]
                            for n in (*stride, *padding, *dilation, groups)]
                self._chains[chain] = (inputs, geometry)
            return out
        y = self._conv(x, steps[0][1])  # a conv output whose BN + ReLU is still to run
        # The last BN + ReLU, conv and BN run as one op (one autograd node less: each costs tens of microseconds of
        # Python, several times that once a convolution has swept the caches; README, "The training step"), which
        # with low_memory also recomputes the conv output. One synchronization group per op: its two BNs must
        # agree on it.
        tail = norms[-2].training == norms[-1].training
        pairs = list(zip(norms, next_convs))
        for bn, conv in pairs[:-1] if tail else pairs:
            y = bn_relu_conv(y, **self._training_bn_args(bn), conv_weight=_cast(conv.weight, y.dtype),
                             **_conv_args(conv))
        if not tail:
            return self._batch_norm(y, norms[-1], _cast(residual, y.dtype), relu=relu)
        return self._recomputed_tail(y, norms[-2], next_convs[-1], norms[-1], residual, relu=relu,
                                     recompute=low_memory)

    def _chain_signature(self, x: torch.Tensor, steps, residual: torch.Tensor | None, owns_residual: bool,
                         relu: bool):
        """The key under which conv + BN steps in inference may run as one C++ call (_eval_chain), or None where they
        may not: eager (not compiling or exporting, no torch.func transform), no autograd (grad mode off), every BN
        in eval mode, x on the CPU with the cpu backend, convolutions with numeric padding. The key holds what the
        ops' checks and the prepacked weights depend on: the steps, x's and the residual's shape, strides and dtype,
        the compute dtype, whether the residual is ours to overwrite, the last ReLU and each convolution's
        geometry."""
        # One loop rather than generator expressions: each of those costs about a microsecond, paid on every call.
        if (torch.is_grad_enabled() or not x.is_cpu or torch.compiler.is_compiling()
                or torch.compiler.is_exporting() or torch._C._are_functorch_transforms_active()):
            return None
        keys, geometry = [], []
        for key, conv, bn in steps:
            if _trains(bn) or isinstance(conv.padding, str):
                return None
            keys.append(key)
            geometry.append((conv.stride, conv.padding, conv.dilation, conv.groups))
        dtype = compute_dtype(x)
        if resolve_backend("conv_bn_act", self.backend, x.device, dtype) != "cpu":
            return None
        shortcut = None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device)
        return (x.shape, x.stride(), x.dtype, dtype, shortcut, owns_residual, relu, tuple(keys), tuple(geometry))

    def _eval_chain(self, x: torch.Tensor, dtype: torch.dtype, steps, residual: torch.Tensor | None,
                    owns_residual: bool, relu: bool, inputs, geometry):
        """act(bn(conv(...)) + residual) of conv + BN steps in inference, in compute dtype `dtype`, as one
        conv_bn_act_chain call (conv_bn_act_chain_into_residual where the residual is ours to overwrite), for an input
        signature (_chain_signature) whose steps ran one by one before: their ops checked it, and each step's weights
        are cached (folded, and prepacked where oneDNN runs the conv) for the input that step had then, `inputs[i]`
        (shape, strides); `geometry` is the op's argument (7 ints a conv), recorded then too. Each step's Python
        around its op call costs more in a model than its checks (README, "One call per block in inference"). None
        when a cache entry is not that one any more (a weight changed, or another input signature was prepacked for
        since): the caller runs the steps again."""
        weights, biases = [], []
        for (key, conv, bn), signature in zip(steps, inputs):
            weight, bias = self._folded(key, conv, bn, dtype)
            entry, recorded = self._prepack_entry(key, weight, signature)
            if not recorded or weight.device != x.device:
                return None
            weights.append(weight if entry[2][1] is None else entry[2][1])
            biases.append(bias)
        x, cast = _cast(x, dtype), _cast(residual, dtype)
        if (cast is not None and (owns_residual or cast is not residual)
                and cast.is_contiguous(memory_format=output_memory_format(x))):
            torch.ops.resnet_fused.conv_bn_act_chain_into_residual.default(x, weights, biases, geometry, cast, relu)
            return cast
        return torch.ops.resnet_fused.conv_bn_act_chain.default(x, weights, biases, geometry, cast, relu)

    def _recomputed_tail(self, y: torch.Tensor, bn: _BatchNorm, conv: nn.Conv2d, bn2: _BatchNorm,
                         residual: torch.Tensor | None, relu: bool, recompute: bool = True) -> torch.Tensor:
        """act(bn2(conv(relu(bn(y)))) + residual) in training as one bn_relu_conv_bn_act op (recomputing the ReLU
        output, and with `recompute` the conv output, in the backward), after both BNs' bookkeeping, bn's first."""
        inner = self._training_bn_args(bn)
        momentum, running_mean, running_var = self._bn_bookkeeping(bn2)
        return bn_relu_conv_bn_act(y, **inner, conv_weight=_cast(conv.weight, y.dtype), bn2_weight=bn2.weight,
                                   bn2_bias=bn2.bias, bn2_running_mean=running_mean, bn2_running_var=running_var,
                                   residual=_cast(residual, y.dtype), momentum2=momentum, eps2=bn2.eps, relu=relu,
                                   recompute=recompute, **_conv_args(conv))

    def _conv_stats_backend(self, x: torch.Tensor, convs, norms) -> str | None:
        """The backend a block trains on with conv_stats, or None for the other paths: every BN in `norms`
        training-mode (no synchronized statistics), a backend in CONV_STATS_BACKENDS that runs conv_stats in
        the compute dtype, every conv in `convs` with numeric padding and no bias, a non-empty batch, no
        torch.func transform."""
        if x.numel() == 0 or self.process_group is not None or torch._C._are_functorch_transforms_active():
            return None
        if not all(_trains(bn) for bn in norms):
            return None
        if not all(not isinstance(conv.padding, str) and conv.bias is None for conv in convs):
            return None
        dtype = compute_dtype(x)
        name = resolve_backend("conv_bn_act", self.backend, x.device, dtype)
        usable = name in CONV_STATS_BACKENDS and has_kernel("conv_stats", name) and supports_dtype(
            "conv_stats", name, dtype)
        return name if usable else None

    def _conv_stats_block(self, backend: str, x: torch.Tensor, steps, shortcut) -> torch.Tensor:
        """A block's training forward on conv_stats: `steps` [(key, conv, bn), ...] run as conv_stats, each
        conv applying the previous BN + ReLU to its input; `shortcut` is None (plain), a tensor, or
        (input, conv, bn) of a downsample branch, whose BN is applied at the exit. Returns
        relu(y_last * scale + shift + shortcut) (bn_add_relu: one pass on the triton backend)."""
        dtype = compute_dtype(x)
        z, scale, shift = _cast(x, dtype), None, None
        for _, conv, bn in steps:
            z, mean, var = conv_stats(z, _cast(conv.weight, dtype), scale, shift, relu=True, **_conv_args(conv),
                                      backend=backend)
            scale, shift = self._batch_scale_shift(bn, z, mean, var)
        if isinstance(shortcut, tuple):
            source, conv, bn = shortcut
            yd, mean, var = conv_stats(_cast(source, dtype), _cast(conv.weight, dtype), **_conv_args(conv),
                                       backend=backend)
            return bn_add_relu(z, scale, shift, yd, *self._batch_scale_shift(bn, yd, mean, var), backend=backend)
        return bn_add_relu(z, scale, shift, _cast(shortcut, dtype), backend=backend)

    def _batch_scale_shift(self, bn: _BatchNorm, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        """(scale, shift) of training-mode `bn` normalizing y, whose batch mean and biased variance are given:
        bn(y) = y * scale + shift. Updates the running statistics from (mean, unbiased var) as F.batch_norm
        does, after nn.BatchNorm2d's bookkeeping."""
        count = y.numel() // y.shape[1]
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
        momentum, running_mean, running_var = self._bn_bookkeeping(bn)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * count / (count - 1))
        invstd = torch.rsqrt(var + bn.eps)
        scale = invstd if bn.weight is None else bn.weight * invstd
        shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
        return scale, shift

    def _recomputes(self, x: torch.Tensor, norms, next_convs=()) -> bool:
        """Whether a BN + ReLU can run inside the op that follows it (recomputed in the backward): in eager
        training with autograd on (not under torch.compile or a torch.func transform), on a fused backend (the
        reference backend stays plain PyTorch), every BN in `norms` training-mode, every conv in `next_convs`
        with numeric padding and no bias, a non-empty batch."""
        if not (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active() and x.numel() > 0
                and resolve_backend("bn_act", self.backend, x.device, compute_dtype(x)) != "reference"):
            return False
        for bn in norms:  # loops, not all(...) over generators: those cost a microsecond each, every call
            if not _trains(bn):
                return False
        for conv in next_convs:
            if isinstance(conv.padding, str) or _parameter(conv, "bias") is not None:
                return False
        return True

    def _training_bn_args(self, bn: _BatchNorm) -> dict:
        """The BN arguments of a recomputed BN + ReLU op (bn_relu_conv, bn_relu_max_pool, bn_relu_conv_bn_act),
        after nn.BatchNorm2d's bookkeeping."""
        momentum, running_mean, running_var = self._bn_bookkeeping(bn)
        return dict(bn_weight=_parameter(bn, "weight"), bn_bias=_parameter(bn, "bias"), running_mean=running_mean,
                    running_var=running_var, momentum=momentum, eps=bn.eps, backend=self.backend,
                    process_group=self.process_group if bn.training else None)  # as _batch_norm decides

    def _conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """conv(x) alone, on the module's backend (see plain_conv), in the compute dtype."""
        dtype = compute_dtype(x)
        weight, bias = _parameter(conv, "weight"), _parameter(conv, "bias")
        return plain_conv(_cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), **_conv_args(conv),
                          backend=self.backend)

    def _bn_bookkeeping(self, bn: _BatchNorm):
        """nn.BatchNorm2d.forward's bookkeeping, line for line: (momentum, running_mean, running_var)."""
        momentum = 0.0 if bn.momentum is None else bn.momentum
        num_batches_tracked = _buffer(bn, "num_batches_tracked")
        if bn.training and bn.track_running_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            # momentum=None: a cumulative average; float() syncs with the device, as in nn.BatchNorm2d.
            momentum = 1.0 / float(num_batches_tracked) if bn.momentum is None else bn.momentum
        if bn.training and not bn.track_running_stats:
            return momentum, None, None
        return momentum, _buffer(bn, "running_mean"), _buffer(bn, "running_var")

    def _batch_norm(self, y, bn: _BatchNorm, residual, relu: bool) -> torch.Tensor:
        """act(bn(y) + residual) with batch statistics (bn_act, training=True), after bn's bookkeeping."""
        momentum, running_mean, running_var = self._bn_bookkeeping(bn)
        weight, bias = _parameter(bn, "weight"), _parameter(bn, "bias")
        if (weight is not None and bias is not None and (self.process_group is None or not bn.training)
                and cpu_node_runs(y, self.backend, "bn_act")):
            # What rf.bn_act calls on the cpu backend, without its Python checks (microseconds a call, one call per
            # BN of a training step): the C++ op checks what a module's tensors can get wrong (their shapes, dtypes
            # and devices against y's) and raises as rf.bn_act would.
            return torch.ops.resnet_fused.bn_act_autograd.default(y, weight, bias, residual, running_mean, running_var,
                                                                  True, float(momentum), float(bn.eps), relu)
        extra = {"process_group": self.process_group} if self.process_group is not None and bn.training else {}
        return bn_act(y, weight, bias, running_mean, running_var, residual, training=True, momentum=momentum,
                      eps=bn.eps, relu=relu, backend=self.backend, **extra)

    def _folded(self, key: str, conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype):
        """(weight, bias) of conv with eval-mode bn folded in, in `dtype`: cached in eager when valid."""
        if torch.compiler.is_compiling():
            return _fold(conv, bn, dtype)
        if isinstance(bn, nn.Identity):
            return _fold(conv, bn, dtype)
        try:  # the dicts directly: nn.Module.__getattr__ would be most of the cost of a cache hit
            cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
            tensors = (cp["weight"], cp["bias"], bp["weight"], bp["bias"], bb["running_mean"], bb["running_var"],
                       bb["num_batches_tracked"])
        except KeyError:  # e.g. a parametrized weight (computed on access): nothing stable to cache
            return _fold(conv, bn, dtype)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _fold(conv, bn, dtype)  # differentiable, recomputed every call
        if _capturing(tensors[0]):
            return _fold(conv, bn, dtype)  # recorded in the CUDA graph: every replay refolds
        try:
            stamp = (bn.eps, *[None if t is None else (t.data_ptr(), t._version) for t in tensors])
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return _fold(conv, bn, dtype)
        entry = self._fold_cache.get((key, dtype))
        if entry is not None and entry[0] == stamp:
            return entry[1]
        # Normal tensors even inside inference_mode, so a later grad-mode call may save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            folded = _fold(conv, bn, dtype)
        self._fold_cache[(key, dtype)] = (stamp, folded)
        return folded

    def _prepack_entry(self, key: str, weight: torch.Tensor, signature):
        """(entry, recorded): the fold cache's entry for `key` whose folded weight is `weight` (None when `weight` is
        not the cached fold), and whether that entry holds the prepack decision (see _prepacked) for an input of
        `signature` (shape, strides)."""
        entry = self._fold_cache.get((key, weight.dtype))
        if entry is None or entry[1][0] is not weight:
            return None, False
        return entry, len(entry) == 3 and entry[2][0] == signature

    def _prepacked(self, key: str, x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
        """The cached folded `weight`, prepacked into oneDNN's blocked layout for x's shape when the CPU backend's
        conv_bn_act will run it through oneDNN (see _onednn_runs): a plain weight costs a reorder per call, and a
        layout chosen without the input's shape can be several times slower (measured: ResNet-50's layer4 1x1
        conv). Kept in the folded weights' cache entry, so the same stamp invalidates both, with the decision for
        the last input signature (shape and layout; None: plain weights); another signature decides again. Any
        other case gets `weight` back."""
        signature = (x.shape, x.stride())
        entry, recorded = self._prepack_entry(key, weight, signature)
        if entry is None:  # not from the cache (compiling, differentiable fold, ...)
            return weight
        if torch.is_grad_enabled() and x.requires_grad:  # the backward's convolution_backward takes plain weights
            return weight
        if recorded:
            packed = entry[2][1]
        else:
            packed = None
            if _onednn_runs(x, conv):
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))
            self._fold_cache[(key, weight.dtype)] = (*entry[:2], (signature, packed))
        # The backend is resolved on every call: use_backend may pick another one for the same module.
        if packed is None or resolve_backend("conv_bn_act", self.backend, x.device, x.dtype) != "cpu":
            return weight
        return packed

    def _max_pool(self, y: torch.Tensor, pool: nn.Module) -> torch.Tensor:
        """pool(y), for the pool after a fused step (a stem's). An nn.MaxPool2d without indices or hooks runs as
        rf.max_pool2d where no gradient is recorded, in eager (not under torch.compile, which generates its own
        pool, or a torch.func transform), on the cpu backend: ATen's CPU pool writes an int64 argmax per output
        that nothing reads there (csrc/cpu/max_pool.cpp)."""
        if (type(pool) is nn.MaxPool2d and not pool.return_indices and not hooked(pool)
                and not (y.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()
                and resolve_backend("conv_bn_act", self.backend, y.device, y.dtype) == "cpu"):
            return max_pool2d(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                              backend="cpu")
        return pool(y)

    def _downsample(self, x: torch.Tensor, downsample: nn.Module | None) -> torch.Tensor:
        """The shortcut: x, or the downsample branch with a trailing conv + BN fused (no ReLU)."""
        if downsample is None:
            return x
        if _fusable_tail(downsample):
            modules = list(downsample)
            for module in modules[:-2]:  # e.g. timm's average-pool shortcut
                x = module(x)
            return self._conv_bn("downsample", x, modules[-2], modules[-1], relu=False)
        return downsample(x)

    def extra_repr(self) -> str:
        parts = []
        if getattr(self, "plain", False):
            parts.append("plain=True")
        if getattr(self, "low_memory", False):
            parts.append("low_memory=True")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) may see the module's input or output."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _fusable_tail(module) -> bool:
    return (type(module) is nn.Sequential and len(module) >= 2 and is_fusable_conv(module[-2])
            and is_fusable_norm(module[-1]))


def downsample_norms(downsample) -> list[nn.Module]:
    return [downsample[-1]] if downsample is not None and _fusable_tail(downsample) else []


def init_fused_state(module: nn.Module, backend: str | None) -> None:
    """The attributes every FusedModule has; also used by fuse() on modules built without __init__."""
    module.backend = backend
    module.process_group = None
    module._fold_cache = {}
    module._chains = {}  # see FusedModule._eval_chain
    module.register_load_state_dict_post_hook(_clear_after_load)


def check_norms(module: nn.Module, names) -> None:
    for name in names:
        norm = getattr(module, name)
        if not isinstance(norm, _BatchNorm):
            raise TypeError(
                f"{type(module).__name__}.{name}: fused blocks need a BatchNorm layer (norm_layer such as "
                f"nn.BatchNorm2d), got {type(norm).__name__}"
            )
