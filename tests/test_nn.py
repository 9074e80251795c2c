"""rf.nn: the fused blocks and ConvBNAct against torchvision's blocks (and the unfused modules) in
float64, train and eval, on every backend that runs conv_bn_act and bn_act here; the folded-weight
cache; autocast; bad input; convert_sync_batchnorm."""
import copy
import functools

import pytest
import torch
import torchvision
from samples import backends_for
from torch import nn

import resnet_fused as rf

TV = torchvision.models.resnet
# Backends that run both ops of the blocks on float64 CPU tensors here (the float64 comparisons with
# torchvision; triton has no float64 and is checked in float32 by test_triton_block_eval).
BLOCK_BACKENDS = [b for b in backends_for("conv_bn_act", "cpu") if b in backends_for("bn_act", "cpu")
                  and all(rf.backends.supports_dtype(op, b, torch.float64) for op in ("conv_bn_act", "bn_act"))]
# (name, torchvision class, fused class, constructor args): each with a stride-2 downsample shortcut
BLOCKS = {
    "basic": (TV.BasicBlock, rf.nn.BasicBlock, dict(inplanes=4, planes=8, stride=2)),
    "bottleneck": (TV.Bottleneck, rf.nn.Bottleneck, dict(inplanes=8, planes=4, stride=2)),
}


# ---------------------------------------------------------------------------------------------------
# helpers, also used by test_models.py and test_fuse.py

def randomize_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from (0, 1, 1, 0), so using the wrong ones shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def run_step(model: nn.Module, x: torch.Tensor, seed: int = 1):
    """One forward and backward (a fixed random weighting of the output); returns the output, the
    gradients of the input and of every parameter, and every buffer after the step."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * weights.to(out)).sum().backward()
    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd module's names without the prefix
    grads = {"input": x.grad, **{name: p.grad for name, p in inner.named_parameters()}}
    buffers = {name: b.detach().clone() for name, b in inner.named_buffers()}
    return out.detach(), grads, buffers


def assert_close64(actual, expected, what: str, rel: float = 1e-9):
    """float64 closeness scaled to the magnitude: the fused and unfused float64 results differ by
    rounding only (about 1e-14 relative measured), so 1e-9 leaves room and still catches any error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def assert_same_step(fused: nn.Module, reference: nn.Module, x: torch.Tensor, steps: int = 1):
    """Runs `steps` forward+backward passes on both models and checks outputs, gradients (input and all
    parameters), and buffers (running statistics, num_batches_tracked) after each."""
    assert list(getattr(fused, "_orig_mod", fused).state_dict()) == list(reference.state_dict())
    for step in range(steps):
        out, grads, buffers = run_step(fused, x, seed=step)
        ref_out, ref_grads, ref_buffers = run_step(reference, x, seed=step)
        assert_close64(out, ref_out, f"step {step} output")
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            if ref_grads[name] is None:
                assert grads[name] is None, f"step {step}: {name} has a gradient, the reference none"
            else:
                assert_close64(grads[name], ref_grads[name], f"step {step} grad of {name}")
        for name in ref_buffers:
            if name.endswith("num_batches_tracked"):
                assert torch.equal(buffers[name], ref_buffers[name]), f"step {step} {name}"
            else:
                assert_close64(buffers[name], ref_buffers[name], f"step {step} {name}")
        for model in (fused, reference):
            model.zero_grad(set_to_none=True)


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    return model.train(mode == "train")


def plain_reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision block's layers, unfused, without the skip connection."""
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.relu(block.bn3(block.conv3(out)))
    return block.relu(block.bn2(block.conv2(out)))


def make_plain(block: nn.Module) -> nn.Module:
    """Turns a torchvision block into its plain reference: forward = plain_reference, state_dict kept."""
    block.downsample = None
    block.forward = functools.partial(plain_reference, block)
    return block


def make_block_pair(kind: str, plain: bool, backend, dtype=torch.float64, **overrides):
    """(fused block, reference) with the same weights; the reference is torchvision's block. `overrides`
    replace BLOCKS' constructor arguments (inplanes=16, ...)."""
    tv_cls, rf_cls, kwargs = BLOCKS[kind]
    kwargs = {**kwargs, **overrides}
    expansion = tv_cls.expansion
    downsample = None if plain else nn.Sequential(
        nn.Conv2d(kwargs["inplanes"], kwargs["planes"] * expansion, 1, kwargs["stride"], bias=False),
        nn.BatchNorm2d(kwargs["planes"] * expansion))
    fused = rf_cls(**kwargs, downsample=downsample, plain=plain, backend=backend)
    randomize_bn(fused)
    reference = tv_cls(**kwargs, downsample=copy.deepcopy(downsample))
    reference.load_state_dict(fused.state_dict())
    fused, reference = fused.to(dtype), reference.to(dtype)
    return fused, (make_plain(reference) if plain else reference)


# ---------------------------------------------------------------------------------------------------
# blocks against torchvision

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("plain", [False, True], ids=["residual", "plain"])
@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_matches_torchvision(kind, backend, plain, mode):
    fused, reference = make_block_pair(kind, plain, backend)
    set_mode(fused, mode), set_mode(reference, mode)
    x = torch.randn(2, BLOCKS[kind][2]["inplanes"], 9, 9, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=2)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_momentum_none_and_untracked_stats(kind, backend):
    # momentum=None: a cumulative average (momentum = 1/num_batches_tracked), as nn.BatchNorm2d does.
    fused, reference = make_block_pair(kind, False, backend)
    for model in (fused, reference):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    x = torch.randn(2, BLOCKS[kind][2]["inplanes"], 8, 8, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=3)

    # track_running_stats=False: batch statistics in train and in eval, no buffers to update.
    tv_cls, rf_cls, kwargs = BLOCKS[kind]
    norm = lambda c: nn.BatchNorm2d(c, track_running_stats=False)  # noqa: E731
    kwargs = dict(kwargs, stride=1, inplanes=kwargs["planes"] * tv_cls.expansion)  # no downsample needed
    fused = rf_cls(**kwargs, norm_layer=norm, backend=backend).double()
    reference = tv_cls(**kwargs, norm_layer=norm).double()
    reference.load_state_dict(fused.state_dict())
    y = torch.randn(2, kwargs["inplanes"], 8, 8, dtype=torch.float64)
    for mode in ("train", "eval"):
        set_mode(fused, mode), set_mode(reference, mode)
        assert_same_step(fused, reference, y)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_frozen_bn_in_training_block(backend):
    # A common fine-tuning setup: the block trains, but some BN layers are kept in eval mode. Each BN
    # decides for itself, as in torchvision.
    fused, reference = make_block_pair("bottleneck", False, backend)
    for model in (fused, reference):
        model.train()
        model.bn1.eval()
        model.downsample[1].eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=2)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_channels_last(kind, backend):
    fused, reference = make_block_pair(kind, False, backend, dtype=torch.float32)
    fused, reference = fused.eval(), reference.eval()
    fused.to(memory_format=torch.channels_last)
    x = torch.randn(2, BLOCKS[kind][2]["inplanes"], 9, 9).to(memory_format=torch.channels_last)
    for mode in ("eval", "train"):
        set_mode(fused, mode), set_mode(reference, mode)
        out = fused(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, reference(x.contiguous()), rtol=1e-4, atol=1e-4)


def test_triton_block_eval():
    # The Triton conv (in the interpreter without a GPU) as the eval path of a block; training needs
    # bn_act, which Triton does not implement.
    if "triton" not in backends_for("conv_bn_act", "cpu"):
        pytest.skip("the triton backend cannot run conv_bn_act on CPU tensors here (no GPU, no interpreter)")
    fused, reference = make_block_pair("basic", False, "triton", dtype=torch.float32)
    fused.eval(), reference.eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# ConvBNAct

class _WithResidual(nn.Module):
    def __init__(self, module, residual):
        super().__init__()
        self.m, self.residual = module, residual

    def forward(self, x):
        return self.m(x, self.residual)


class _Unfused(nn.Module):
    """relu(bn(conv(x)) + residual) with the plain modules; the same state_dict keys as _WithResidual."""

    def __init__(self, conv, bn, residual):
        super().__init__()
        self.m, self.residual = nn.ModuleDict({"conv": conv, "bn": bn}), residual

    def forward(self, x):
        return torch.relu(self.m["bn"](self.m["conv"](x)) + self.residual)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_conv_bn_act_module(backend, mode):
    module = randomize_bn(rf.nn.ConvBNAct(5, 6, kernel_size=3, stride=2, backend=backend).double())
    conv, bn = copy.deepcopy(module.conv), copy.deepcopy(module.bn)
    residual = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    fused, unfused = _WithResidual(module, residual), _Unfused(conv, bn, residual)
    set_mode(fused, mode), set_mode(unfused, mode)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    assert_same_step(fused, unfused, x, steps=2)

    no_relu = rf.nn.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=False, backend=backend)
    assert no_relu.training == bn.training
    with torch.no_grad():
        assert_close64(no_relu(x), bn(conv(x)), "no ReLU, no residual")
    assert "relu=False" in repr(no_relu)


class _Scaled(nn.Module):
    def forward(self, t):
        return t * 0.5


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_bn_act_module_with_parametrized_bn(mode):
    # Parametrized tensors leave the module's _parameters and _buffers for computed attributes; the module reads
    # those dicts directly where it can (per-call cost) and must fall back to the attributes.
    module = randomize_bn(rf.nn.ConvBNAct(4, 4).double())
    conv, bn = copy.deepcopy(module.conv), copy.deepcopy(module.bn)
    for name in ("running_mean", "weight"):
        torch.nn.utils.parametrize.register_parametrization(module.bn, name, _Scaled())
    with torch.no_grad():
        bn.running_mean.mul_(0.5)
        bn.weight.mul_(0.5)
    set_mode(module, mode), set_mode(bn, mode), set_mode(conv, mode)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close64(module(x), torch.relu(bn(conv(x))), f"parametrized BN, {mode}")


# ---------------------------------------------------------------------------------------------------
# the folded-weight cache

def _eval_block(backend="cpu" if "cpu" in BLOCK_BACKENDS else "reference"):
    fused, reference = make_block_pair("bottleneck", False, backend)
    return fused.eval(), reference.eval(), torch.randn(2, 8, 9, 9, dtype=torch.float64)


def _check_eval(fused, reference, x, what):
    with torch.no_grad():
        assert_close64(fused(x), reference(x), what)


def test_cache_is_used_and_survives_unchanged_weights():
    fused, reference, x = _eval_block()
    with torch.no_grad():
        fused(x)
        entries = {key: value[1][0] for key, value in fused._fold_cache.items()}
        fused(x)
    # one entry per conv + BN pair (conv1..3 and the downsample), reused by the second call
    assert sorted(k for k, _ in entries) == ["conv1", "conv2", "conv3", "downsample"]
    assert all(fused._fold_cache[key][1][0] is weight for key, weight in entries.items())


def test_stale_cache_would_fail():
    # Writes through .data bypass the version counters: the cache cannot see them, and the test sees
    # the stale result. This shows that the checks below would catch a cache that failed to refresh.
    fused, reference, x = _eval_block()
    _check_eval(fused, reference, x, "before")
    for model in (fused, reference):
        model.conv2.weight.data.mul_(1.5)
    with pytest.raises(AssertionError):
        _check_eval(fused, reference, x, "stale")
    fused.clear_fold_cache()
    _check_eval(fused, reference, x, "after clear_fold_cache")


def test_cache_refreshes_after_optimizer_step():
    fused, reference, x = _eval_block()
    _check_eval(fused, reference, x, "before")
    for model in (fused, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        for _ in range(2):  # the second step moves the weights by a different amount than the first
            model.zero_grad()
            model(x).square().sum().backward()  # eval-mode gradients, through the fold
            optimizer.step()
    _check_eval(fused, reference, x, "after two optimizer steps")


def test_cache_refreshes_after_load_state_dict():
    fused, reference, x = _eval_block()
    _check_eval(fused, reference, x, "before")
    other = randomize_bn(rf.nn.Bottleneck(8, 4, stride=2, downsample=copy.deepcopy(fused.downsample))).double()
    for model in (fused, reference):
        model.load_state_dict(other.state_dict())
    _check_eval(fused, reference, x, "after load_state_dict")
    state = randomize_bn(other).state_dict()
    for model in (fused, reference):
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    _check_eval(fused, reference, x, "after load_state_dict(assign=True)")


def test_cache_refreshes_after_training_steps():
    # The reference backend's F.batch_norm updates the running statistics without bumping their version;
    # num_batches_tracked's version covers it.
    for backend in BLOCK_BACKENDS:
        fused, reference, x = _eval_block(backend)
        _check_eval(fused, reference, x, "before")
        for model in (fused, reference):
            model.train()
            with torch.no_grad():
                model(x * 2 + 1)
            model.eval()
        _check_eval(fused, reference, x, f"{backend}: after a training step")


def test_cache_refreshes_after_in_place_writes_and_conversions():
    fused, reference, x = _eval_block()
    _check_eval(fused, reference, x, "before")
    with torch.no_grad():
        for model in (fused, reference):
            model.bn3.running_var.mul_(2.0)
            model.downsample[1].bias.add_(0.5)
    _check_eval(fused, reference, x, "after in-place writes")
    for model in (fused, reference):
        model.bn2.eps = 0.3
    _check_eval(fused, reference, x, "after changing eps")
    fused.float().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fused(x.float().contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32 and all(v[1][0].dtype == torch.float32 for v in fused._fold_cache.values())
    torch.testing.assert_close(out.double(), reference(x), rtol=1e-4, atol=1e-4)


def test_eval_gradients_reach_the_parameters():
    # With grad enabled and parameters that require grad, the fold is differentiable (not cached).
    for backend in BLOCK_BACKENDS:
        fused, reference, x = _eval_block(backend)
        assert_same_step(fused, reference, x)
        assert not fused._fold_cache


def test_fold_cached_in_inference_mode_is_usable_with_grad():
    fused, reference, x = _eval_block()
    with torch.inference_mode():
        fused(x)
    for p in fused.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()  # the cached folded weights are saved for backward: normal tensors
    xr = x.clone().requires_grad_()
    reference(xr).sum().backward()
    assert_close64(xg.grad, xr.grad, "input gradient")


# The CPU backend keeps the folded weights prepacked for oneDNN beside them (channels_last float32 here).
needs_onednn = pytest.mark.skipif("cpu" not in BLOCK_BACKENDS or not torch.backends.mkldnn.is_available(),
                                  reason="needs the CPU backend and oneDNN")


def _packed_eval_block():
    # 16 input channels, not BLOCKS' 8: the training step below runs the downsample's 1x1 stride-2 weight gradient
    # in oneDNN, which in NHWC with fewer input channels than its register block (16 floats with AVX-512) writes
    # past its workspace (oneDNN issue 6035; in plain PyTorch it crashed this test on an AVX-512 EPYC).
    fused, reference = make_block_pair("bottleneck", False, "cpu", dtype=torch.float32, inplanes=16)
    fused, reference = (m.eval().to(memory_format=torch.channels_last) for m in (fused, reference))
    # large enough that every conv's output reaches the size above which oneDNN (and packing) is used
    return fused, reference, torch.randn(8, 16, 48, 48).to(memory_format=torch.channels_last)


def _packed_weights(fused):
    """key -> (input shape, packed weight) of the entries holding a packed weight."""
    return {key: (entry[2][0][0], entry[2][1]) for key, entry in fused._fold_cache.items()
            if len(entry) == 3 and entry[2][1] is not None}


def _check_packed(fused, reference, x, what):
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")
    packed = _packed_weights(fused)
    assert len(packed) == 4, what  # conv1..3 and the downsample
    assert all(weight.layout == torch._mkldnn for _, weight in packed.values()), what
    # packed for the shape of each conv's input: the block's own for conv1 and the downsample
    assert packed[("conv1", x.dtype)][0] == packed[("downsample", x.dtype)][0] == tuple(x.shape), what


@needs_onednn
def test_prepacked_weights_follow_the_weights_and_the_input_shape():
    fused, reference, x = _packed_eval_block()
    _check_packed(fused, reference, x, "first call")
    first = {key: weight for key, (_, weight) in _packed_weights(fused).items()}
    _check_packed(fused, reference, x, "second call")
    assert all(_packed_weights(fused)[key][1] is weight for key, weight in first.items())  # reused
    _check_packed(fused, reference, torch.randn(9, 16, 50, 50).to(memory_format=torch.channels_last), "new shape")

    for model in (fused, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()(x).mean().backward()
        optimizer.step()  # and the BN running statistics moved in training
        model.eval()
    _check_packed(fused, reference, x, "after an optimizer step")

    other = randomize_bn(copy.deepcopy(reference))
    for model in (fused, reference):
        model.load_state_dict(other.state_dict())
    _check_packed(fused, reference, x, "after load_state_dict")

    fused.float()  # .to() and friends clear the cache
    assert not fused._fold_cache
    _check_packed(fused, reference, x, "after .float()")


@needs_onednn
def test_prepacked_weights_not_used_where_onednn_does_not_run():
    fused, reference, x = _packed_eval_block()
    fused.requires_grad_(False)  # the fold is cached, and x asks for a gradient: plain weights for the backward
    x_grad = x.clone().requires_grad_()
    fused(x_grad).sum().backward()
    assert x_grad.grad is not None and not _packed_weights(fused)
    with torch.no_grad():
        fused(x.contiguous())  # NCHW
        fused(x.double())  # float64: oneDNN does not take it
        fused(x[:1, :, :8, :8])  # outputs too small to be worth oneDNN's per-call cost
    assert not _packed_weights(fused)


def test_pickle_and_deepcopy_drop_the_cache(tmp_path):
    fused, reference, x = _eval_block()
    with torch.no_grad():
        fused(x)
    assert fused._fold_cache
    assert not copy.deepcopy(fused)._fold_cache
    torch.save(fused, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    assert isinstance(loaded, rf.nn.Bottleneck) and not loaded._fold_cache and loaded.backend == fused.backend
    _check_eval(loaded, reference, x, "loaded")


# ---------------------------------------------------------------------------------------------------
# autocast, compile, bad input, constructor checks, synchronized BN

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_autocast_bfloat16(mode):
    fused, reference = make_block_pair("bottleneck", False, None, dtype=torch.float32)
    set_mode(fused, mode), set_mode(reference, mode)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        expected = reference(x)
    assert out.dtype == torch.bfloat16 == expected.dtype
    exact = copy.deepcopy(reference).train(mode == "train")(x)
    scale = exact.abs().max().item()
    # bfloat16 keeps 8 bits: both results are a few bf16 ulps of the magnitude from the fp32 one
    assert (out.float() - exact).abs().max().item() <= 4 * (expected.float() - exact).abs().max().item() + 0.02 * scale
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_compile_fullgraph(mode):
    fused, reference = make_block_pair("basic", False, None, dtype=torch.float32)
    set_mode(fused, mode), set_mode(reference, mode)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 9, 9)
    for step in range(2):  # the second call reuses the compiled graph with updated running stats
        out = compiled(x)
        torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.bn1.running_mean, reference.bn1.running_mean)
    assert torch.equal(fused.bn1.num_batches_tracked, reference.bn1.num_batches_tracked)


BAD_INPUTS = [
    ("3-d input", lambda: torch.randn(4, 9, 9), ValueError, "expects a 4-D input"),
    ("wrong channels", lambda: torch.randn(2, 5, 9, 9), ValueError, "expects 4 input channels"),
    ("not a tensor", lambda: [[1.0]], TypeError, "must be a torch.Tensor"),
    ("integer input", lambda: torch.ones(2, 4, 9, 9, dtype=torch.long), TypeError, "floating-point"),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("what,make,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, make, error, message, mode):
    block = set_mode(rf.nn.BasicBlock(4, 4), mode)
    with pytest.raises(error, match=message):
        block(make())
    conv = set_mode(rf.nn.ConvBNAct(4, 4), mode)
    with pytest.raises(error, match=message.replace("BasicBlock", "ConvBNAct")):
        conv(make())


def test_constructor_checks():
    with pytest.raises(ValueError, match="plain block"):
        rf.nn.BasicBlock(4, 8, stride=2, downsample=nn.Conv2d(4, 8, 1, 2), plain=True)
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        rf.nn.BasicBlock(4, 4, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation"):
        rf.nn.BasicBlock(4, 4, dilation=2)
    with pytest.raises(TypeError, match="need a BatchNorm"):
        rf.nn.Bottleneck(8, 2, norm_layer=lambda c: nn.GroupNorm(1, c))
    with pytest.raises(TypeError, match="nn.Conv2d with zero padding"):
        rf.nn.ConvBNAct.from_modules(nn.Conv2d(3, 3, 3, padding_mode="reflect"), nn.BatchNorm2d(3))
    # torchvision's own arguments are accepted: groups, base_width and dilation in a Bottleneck
    block = rf.nn.Bottleneck(64, 16, groups=4, base_width=32, dilation=2)
    reference = TV.Bottleneck(64, 16, groups=4, base_width=32, dilation=2)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(block) == shapes(reference)


def test_convert_sync_batchnorm_sets_every_fused_module():
    group = object()  # a stand-in: only the attribute is checked here; the distributed run is tested elsewhere
    model = nn.Sequential(rf.nn.ConvBNAct(3, 4), nn.BatchNorm2d(4), rf.nn.BasicBlock(4, 4),
                          rf.nn.Bottleneck(4, 1, downsample=nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))))
    model = rf.nn.convert_sync_batchnorm(model, process_group=group)
    fused = [m for m in model.modules() if isinstance(m, rf.nn.FusedModule)]
    assert len(fused) == 3 and all(m.process_group is group for m in fused)
    assert type(model[1]) is nn.SyncBatchNorm and model[1].process_group is group  # not fused: converted
    assert type(model[3].downsample[1]) is nn.BatchNorm2d  # fused by its block: left as it is
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            rf.nn.convert_sync_batchnorm(model)
