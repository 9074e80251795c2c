"""One call per block in inference (FusedModule._eval_chain): on the cpu backend, a block whose input signature ran
through its steps one by one before runs its main path as one conv_bn_act_chain_into_residual call (conv_bn_act_chain
where the shortcut is not the block's to overwrite), and a module's single conv + BN step (ConvBNAct, a downsample
branch, the stem) as one conv_bn_act_chain call. The chain must give what the steps give (bit for bit: the same
kernels), see every weight change the fold cache sees, never write into an input the block does not own, and stay
out where it does not apply."""
import copy

import pytest
import torch
import torchvision
from samples import OpRecorder, backends_for
from test_nn import randomize_bn
from torch import nn

import resnet_fused as rf

CHAIN = torch.ops.resnet_fused.conv_bn_act_chain.default
INTO_RESIDUAL = torch.ops.resnet_fused.conv_bn_act_chain_into_residual.default
CHAINS = (CHAIN, INTO_RESIDUAL)
STEP_OPS = (torch.ops.resnet_fused.conv_bn_act.default, torch.ops.resnet_fused.conv_bn_act_into_residual.default)


def chained(ops) -> int:
    return sum(op in CHAINS for op in ops)


@pytest.fixture(autouse=True)
def needs_the_cpu_backend():
    if "cpu" not in backends_for("conv_bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")


def block_pair(kind: str, downsample: bool):
    """(fused block, torchvision's) in eval mode, channels_last, with the same weights."""
    torch.manual_seed(0)
    cls = torchvision.models.resnet.Bottleneck if kind == "bottleneck" else torchvision.models.resnet.BasicBlock
    planes, inplanes = 8, 8 * cls.expansion
    down = nn.Sequential(nn.Conv2d(inplanes, planes * cls.expansion, 1, 2, bias=False),
                         nn.BatchNorm2d(planes * cls.expansion)) if downsample else None
    reference = randomize_bn(cls(inplanes, planes, 2 if downsample else 1, down)).eval()
    reference = reference.to(memory_format=torch.channels_last)
    fused = rf.fuse(nn.Sequential(copy.deepcopy(reference)), backend="cpu")[0]
    assert isinstance(fused, rf.nn.FusedModule)
    return fused, reference


def run(block, x, **kwargs):
    with torch.no_grad(), OpRecorder() as ops:
        out = block(x, **kwargs)
    return out, ops.seen


# (dtype, memory format): oneDNN's float32 and bf16 paths in channels_last, ATen's convolution in float64 NCHW
CONFIGS = [(torch.float32, torch.channels_last), (torch.bfloat16, torch.channels_last),
           (torch.float64, torch.contiguous_format)]


@pytest.mark.parametrize("config", CONFIGS, ids=["float32-nhwc", "bf16-autocast-nhwc", "float64-nchw"])
@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_second_call_is_one_chain_call_equal_to_the_steps(kind, downsample, config):
    dtype, memory_format = config
    fused, reference = block_pair(kind, downsample)
    if dtype == torch.float64:
        fused, reference = fused.double(), reference.double()
    # 64x64: every conv output holds at least the 16K values above which oneDNN runs it (with prepacked weights)
    x = torch.randn(2, fused.conv1.in_channels, 64, 64, dtype=torch.float64 if dtype == torch.float64 else None)
    x = x.contiguous(memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        first, first_ops = run(fused, x)
        second, second_ops = run(fused, x)
        with torch.no_grad():
            expected = reference(x)
    # The steps are gone from the second call: the main path is one call, a downsample branch another. The main
    # path adds into a shortcut that is the block's own (a downsample branch's output, autocast's copy of x); the
    # identity shortcut x itself it leaves alone.
    assert chained(first_ops) == 0 and not any(op in STEP_OPS for op in second_ops)
    into = downsample or dtype == torch.bfloat16
    assert second_ops.count(INTO_RESIDUAL) == int(into) and second_ops.count(CHAIN) == int(downsample) + int(not into)
    assert torch.equal(first, second) and second.is_contiguous(memory_format=memory_format)
    # oneDNN with every weight prepacked in float32 and bf16; float64 runs ATen's convolution on plain weights
    packed = [len(entry) == 3 and entry[2][1] is not None for entry in fused._fold_cache.values()]
    assert len(packed) == (3 if kind == "bottleneck" else 2) + int(downsample)
    assert all(packed) if dtype != torch.float64 else not any(packed)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(second.double(), expected.double(), rtol=tolerance, atol=tolerance)


def test_the_chain_sees_every_weight_change():
    """In-place writes to a conv weight and to BN statistics, and load_state_dict, between chain calls."""
    fused, reference = block_pair("bottleneck", downsample=False)
    x = torch.randn(2, 32, 40, 40).to(memory_format=torch.channels_last)  # large enough for prepacked weights
    run(fused, x)
    changes = [
        lambda m: m.conv2.weight.mul_(1.5),
        lambda m: m.bn3.running_mean.add_(0.3),
        lambda m: m.bn1.weight.mul_(-1.0),
    ]
    for change in changes:
        for model in (fused, reference):
            with torch.no_grad():
                change(model)
        out, ops = run(fused, x)
        with torch.no_grad():
            torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    other = randomize_bn(copy.deepcopy(reference))
    with torch.no_grad():
        other.conv1.weight.normal_()
    for model in (fused, reference):
        model.load_state_dict(other.state_dict())
    for _ in range(2):  # the first call after the load refolds, the second chains again
        out, ops = run(fused, x)
        with torch.no_grad():
            torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    assert chained(ops) == 1


def test_alternating_input_shapes():
    """Two input signatures in turn: each chains with the weights prepacked for it, or runs the steps again."""
    fused, reference = block_pair("bottleneck", downsample=False)
    inputs = [torch.randn(n, 32, size, size).to(memory_format=torch.channels_last) for n, size in ((2, 9), (3, 40))]
    for _ in range(3):
        for x in inputs:
            out, _ = run(fused, x)
            with torch.no_grad():
                torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)


def test_an_input_the_block_does_not_own_is_left_alone():
    """Called on its own, a block must not write into x (its identity shortcut); with reuse_input=True it may."""
    fused, _ = block_pair("bottleneck", downsample=False)
    x = torch.randn(2, 32, 9, 9).to(memory_format=torch.channels_last)
    kept = x.clone()
    for _ in range(3):
        out, ops = run(fused, x)
        assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
    assert CHAIN in ops
    given = x.clone()
    run(fused, given, reuse_input=True)
    out, ops = run(fused, given, reuse_input=True)
    assert INTO_RESIDUAL in ops and out.data_ptr() == given.data_ptr()


@pytest.mark.parametrize("case", ["grad", "train", "compile"])
def test_not_used_where_it_does_not_apply(case):
    fused, _ = block_pair("bottleneck", downsample=False)
    x = torch.randn(2, 32, 9, 9).to(memory_format=torch.channels_last)
    if case == "grad":  # autograd records each step's op
        for _ in range(2):
            with OpRecorder() as recorder:
                fused(x.requires_grad_())
        ops = recorder.seen
    elif case == "train":
        fused.train()
        for _ in range(2):
            out, ops = run(fused, x)
    else:
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
        for _ in range(2):
            with torch.no_grad():
                compiled(x)
        ops = run(fused, x)[1]  # eager after compiling: the compiled calls recorded no chain signature
        assert chained(ops) == 0
        return
    assert chained(ops) == 0


def chain_arguments():
    x = torch.randn(1, 8, 6, 6).to(memory_format=torch.channels_last)
    weights = [torch.randn(8, 8, 3, 3), torch.randn(8, 8, 1, 1)]
    biases = [torch.randn(8), None]
    geometry = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    residual = torch.randn(1, 8, 6, 6).to(memory_format=torch.channels_last)
    return x, weights, biases, geometry, residual


def chain_expected(x, weights, biases, residual, relu):
    y = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(x, weights[0], biases[0], 1, 1)), weights[1])
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("op", [CHAIN, INTO_RESIDUAL], ids=["returning", "into_residual"])
def test_op_checks_and_opcheck(op):
    x, weights, biases, geometry, residual = chain_arguments()

    def call(*args):
        if op is CHAIN:
            return op(*args)
        out = args[4].clone()
        op(*args[:4], out, args[5])
        return out

    out = call(x, weights, biases, geometry, residual, True)
    torch.testing.assert_close(out, chain_expected(x, weights, biases, residual, True), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, (x, weights, biases, geometry, residual.clone(), True))
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        call(x, weights, biases[:1], geometry, residual, True)
    with pytest.raises(ValueError, match="7 ints per convolution"):
        call(x, weights, biases, geometry[:-1], residual, True)
    with pytest.raises(ValueError, match="at least one weight"):
        call(x, [], [], [], residual, True)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        call(x, weights, biases, geometry, torch.randn(1, 8, 5, 5), True)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_returning_chain_without_a_residual_or_relu(with_residual, relu):
    x, weights, biases, geometry, residual = chain_arguments()
    residual = residual if with_residual else None
    kept = None if residual is None else residual.clone()
    out = CHAIN(x, weights, biases, geometry, residual, relu)
    torch.testing.assert_close(out, chain_expected(x, weights, biases, residual, relu), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert residual is None or (torch.equal(residual, kept) and out.data_ptr() != residual.data_ptr())
    torch.library.opcheck(CHAIN, (x, weights, biases, geometry, residual, relu))


def conv_bn_act_pair(relu: bool):
    """(ConvBNAct, the conv and BN it shares) in eval mode, channels_last."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(16, 24, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(24))
    module = rf.nn.ConvBNAct.from_modules(conv, bn, relu=relu, backend="cpu").eval()
    return module.to(memory_format=torch.channels_last), conv, bn


@pytest.mark.parametrize("config", CONFIGS, ids=["float32-nhwc", "bf16-autocast-nhwc", "float64-nchw"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_a_single_step_module_chains_after_its_first_call(with_residual, relu, config):
    """ConvBNAct in inference: the second call with a signature is one chained call, giving the first call's output
    bit for bit; the residual, the caller's, is left alone."""
    dtype, memory_format = config
    module, conv, bn = conv_bn_act_pair(relu)
    if dtype == torch.float64:
        module, conv, bn = module.double(), conv.double(), bn.double()
    def make(*shape):
        t = torch.randn(*shape, dtype=torch.float64 if dtype == torch.float64 else None)
        return t.contiguous(memory_format=memory_format)

    x = make(2, 16, 40, 40)  # 2x24x40x40 outputs: above the size where oneDNN runs with a prepacked weight
    residual = make(2, 24, 40, 40) if with_residual else None
    kept = None if residual is None else residual.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        first, first_ops = run(module, x, residual=residual)
        second, second_ops = run(module, x, residual=residual)
        with torch.no_grad():
            y = bn(conv(x)) + (0 if residual is None else residual)
            expected = torch.relu(y) if relu else y
    # under autocast the residual's bf16 copy is the module's own to write the output into
    one_call = INTO_RESIDUAL if residual is not None and dtype == torch.bfloat16 else CHAIN
    assert chained(first_ops) == 0 and chained(second_ops) == second_ops.count(one_call) == 1
    assert not any(op in STEP_OPS for op in second_ops)
    assert torch.equal(first, second) and second.is_contiguous(memory_format=memory_format)
    assert residual is None or torch.equal(residual, kept)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(second.double(), expected.double(), rtol=tolerance, atol=tolerance)


def test_a_single_step_module_sees_weight_changes_and_checks_new_inputs():
    module, conv, bn = conv_bn_act_pair(relu=True)
    x = torch.randn(2, 16, 40, 40).to(memory_format=torch.channels_last)
    for change in (lambda: conv.weight.mul_(-2.0), lambda: bn.running_var.mul_(3.0), lambda: None):
        with torch.no_grad():
            change()
            expected = torch.relu(bn(conv(x)))
        for _ in range(2):
            out, ops = run(module, x)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert CHAIN in ops
    # A new signature runs through the checked op again, whose errors it keeps.
    with pytest.raises(ValueError, match="smaller than the kernel"):
        run(rf.nn.ConvBNAct.from_modules(nn.Conv2d(16, 8, 5, bias=False), nn.BatchNorm2d(8)).eval(), x[:, :, :3, :3])
    with pytest.raises(ValueError, match="expects 16 input channels"):
        run(module, x[:, :8])
    with pytest.raises(ValueError, match="residual"):
        run(module, x, residual=torch.randn(2, 24, 39, 39).to(memory_format=torch.channels_last))
