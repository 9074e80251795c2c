"""The recomputed BN + ReLU ops, conv2d(relu(batch_norm(x))) and max_pool2d(relu(batch_norm(x))) in training,
which keep x rather than the ReLU output for the backward (resnet_fused/ops/recomputed_bn_relu.py), and the
blocks and stem that use them: parity against the unfused ops in float64, gradcheck, and the activation memory
they save, measured with saved-tensor hooks."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from samples import OpRecorder, assert_parity, backends_for, to_float64
from torch import nn

import resnet_fused as rf
from resnet_fused.nn import fused as fused_modules
from resnet_fused.ops.recomputed_bn_relu import (ConvNext, MaxPoolNext, bn_relu_conv, bn_relu_conv_bn_act,
                                                  bn_relu_max_pool)

TV = torchvision.models.resnet
# (N, C, H, W), the op after the ReLU, its weight's shape (None: no weight)
CASES = [
    ((4, 8, 7, 7), ConvNext((1, 1), (1, 1), (1, 1), 1), (6, 8, 3, 3)),
    ((2, 7, 9, 11), ConvNext((2, 2), (0, 0), (1, 1), 1), (5, 7, 1, 1)),
    ((3, 4, 5, 5), ConvNext((2, 2), (1, 1), (1, 1), 1), (4, 4, 3, 3)),
    ((2, 5, 17, 17), MaxPoolNext((3, 3), (2, 2), (1, 1), (1, 1), False), None),  # the ResNet stem's pool
    ((3, 4, 8, 9), MaxPoolNext((2, 2), (2, 2), (0, 0), (1, 1), True), None),
    ((2, 3, 9, 9), MaxPoolNext((3, 3), (1, 1), (1, 1), (2, 2), False), None),
]


def case_id(case) -> str:
    shape, then, _ = case
    return f"{type(then).__name__}-{'x'.join(map(str, shape))}-s{then.stride[0]}"


def sample(shape, weight_shape, dtype, memory_format, requires_grad=True):
    """[x, bn weight, bn bias, next op's weight or None, running_mean, running_var]"""
    torch.manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(channels, dtype=torch.float64).to(dtype)
    next_weight = None if weight_shape is None else (torch.randn(weight_shape, dtype=torch.float64) * 0.3).to(dtype)
    running_mean = torch.randn(channels, dtype=torch.float64).to(dtype) * 0.1
    running_var = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype)
    for t in (x, weight, bias, next_weight):
        if t is not None:
            t.requires_grad_(requires_grad)
    return [x, weight, bias, next_weight, running_mean, running_var]


def unfused(x, weight, bias, next_weight, running_mean, running_var, then):
    y = F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))
    if isinstance(then, ConvNext):
        return F.conv2d(y, next_weight, None, then.stride, then.padding, then.dilation, then.groups)
    return F.max_pool2d(y, then.kernel_size, then.stride, then.padding, then.dilation, then.ceil_mode)


def fused(backend):
    """bn_relu_conv or bn_relu_max_pool (the C++ op on the cpu backend, the Python autograd function on the others)."""
    def run(x, weight, bias, next_weight, running_mean, running_var, then):
        args = dict(momentum=0.1, eps=1e-5, stride=then.stride, padding=then.padding, dilation=then.dilation,
                    backend=backend)
        if isinstance(then, ConvNext):
            return bn_relu_conv(x, weight, bias, running_mean, running_var, next_weight, groups=then.groups, **args)
        return bn_relu_max_pool(x, weight, bias, running_mean, running_var, kernel_size=then.kernel_size,
                                ceil_mode=then.ceil_mode, **args)
    return run


def assert_matches_unfused(fused_fn, unfused_fn, inputs, names):
    """fused_fn(*inputs) in float32 against unfused_fn in float32 and float64: the output, the gradient of every
    input that requires one, and the inputs that do not (running statistics, updated in place) afterwards, within
    twice PyTorch's own float32 error. `names` names the inputs."""
    same_dtype = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    grad_out = None
    results = []
    for fn, args in ((fused_fn, inputs), (unfused_fn, same_dtype), (unfused_fn, to_float64(inputs))):
        out = fn(*args)
        grad_out = torch.randn(out.shape, dtype=torch.float64) if grad_out is None else grad_out
        differentiable = [t for t in args if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, differentiable, grad_out.to(out.dtype)))
        results.append([out] + [next(grads) if t.requires_grad else t for t in args if t is not None])
    labels = ["output"] + [(f"grad {name}" if t.requires_grad else name) for name, t in zip(names, inputs)
                           if t is not None]
    for label, actual, torch_same, oracle_value in zip(labels, *results):
        assert_parity(actual.detach(), torch_same.detach(), oracle_value.detach(), what=label)
    return results[0][0]


@pytest.fixture(params=["cpu", "triton"])
def fused_backend(request):
    """The fused backends that run on CPU tensors here (triton: in the interpreter)."""
    if request.param not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {request.param!r} cannot run on CPU tensors here")
    return request.param


@pytest.fixture(params=[torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def memory_format(request):
    return request.param


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_the_unfused_ops(case, fused_backend, memory_format):
    """Output, the gradients of x, the BN parameters and the conv weight, and the running statistics."""
    shape, then, weight_shape = case
    inputs = sample(shape, weight_shape, torch.float32, memory_format)
    out = assert_matches_unfused(lambda *a: fused(fused_backend)(*a, then), lambda *a: unfused(*a, then), inputs,
                                 ["x", "bn weight", "bn bias", "conv weight", "running_mean", "running_var"])
    assert out.is_contiguous(memory_format=memory_format)


# A Bottleneck's tail, BN2 + ReLU + conv3 + BN3 (+ shortcut) (+ ReLU): (N, C, H, W), (conv output channels,
# kernel, stride, padding), shortcut, ReLU
TAIL_CASES = [
    ((4, 8, 7, 7), (12, 1, 1, 0), True, True),
    ((2, 7, 9, 11), (5, 3, 2, 1), False, True),  # a plain block's
    ((3, 4, 5, 5), (6, 1, 1, 0), True, False),
]


def tail_sample(case, dtype, memory_format):
    """[x, bn weight, bn bias, running_mean, running_var, conv weight, bn2 weight, bn2 bias, bn2 running_mean,
    bn2 running_var, residual or None]"""
    shape, (c_out, kernel, stride, padding), residual, _ = case
    x, weight, bias, conv_weight, running_mean, running_var = sample(shape, (c_out, shape[1], kernel, kernel),
                                                                     dtype, memory_format)
    out_hw = [(size + 2 * padding - kernel) // stride + 1 for size in shape[2:]]
    second = sample((shape[0], c_out, *out_hw), None, dtype, memory_format)  # its x is the residual
    return [x, weight, bias, running_mean, running_var, conv_weight, second[1], second[2], second[4], second[5],
            second[0] if residual else None]


def tail_unfused(case):
    _, (_, _, stride, padding), _, relu = case

    def run(x, weight, bias, running_mean, running_var, conv_weight, weight2, bias2, running_mean2, running_var2,
            residual):
        y = F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))
        z = F.conv2d(y, conv_weight, None, stride, padding)
        z = F.batch_norm(z, running_mean2, running_var2, weight2, bias2, True, 0.2, 1e-3)  # other momentum, eps
        z = z if residual is None else z + residual
        return F.relu(z) if relu else z
    return run


def tail_fused(case, backend, recompute=True):
    _, (_, _, stride, padding), _, relu = case

    def run(x, weight, bias, running_mean, running_var, conv_weight, weight2, bias2, running_mean2, running_var2,
            residual):
        return bn_relu_conv_bn_act(x, weight, bias, running_mean, running_var, conv_weight, weight2, bias2,
                                   running_mean2, running_var2, residual, momentum=0.1, eps=1e-5, momentum2=0.2,
                                   eps2=1e-3, stride=(stride, stride), padding=(padding, padding), dilation=(1, 1),
                                   groups=1, relu=relu, recompute=recompute, backend=backend)
    return run


TAIL_NAMES = ["x", "bn weight", "bn bias", "running_mean", "running_var", "conv weight", "bn2 weight", "bn2 bias",
              "bn2 running_mean", "bn2 running_var", "residual"]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_tail_parity_with_the_unfused_ops(case, recompute, fused_backend, memory_format):
    """bn_relu_conv_bn_act (a block's last steps; recomputing the conv output with low_memory): output, every
    gradient, both BNs' running statistics."""
    inputs = tail_sample(case, torch.float32, memory_format)
    out = assert_matches_unfused(tail_fused(case, fused_backend, recompute), tail_unfused(case), inputs, TAIL_NAMES)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("trainable", [["x"], ["bn weight", "bn bias"], ["conv weight"], ["bn2 weight", "bn2 bias"],
                                       ["residual"]], ids=str)
def test_tail_gradients_of_some_inputs_only(trainable, recompute):
    """Frozen parameters, or an input without a gradient: the gradients asked for are still right."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    case = TAIL_CASES[0]
    inputs = tail_sample(case, torch.float32, torch.contiguous_format)
    for name, t in zip(TAIL_NAMES, inputs):
        t.requires_grad_(name in trainable)
    assert_matches_unfused(tail_fused(case, "cpu", recompute), tail_unfused(case), inputs, TAIL_NAMES)


def test_tail_hands_grad_out_on_to_the_residual_without_relu(fused_backend):
    """Without ReLU the residual's gradient is the incoming gradient itself, as PyTorch's add hands it on: no copy;
    with ReLU, the masked gradient."""
    for case in (TAIL_CASES[2], TAIL_CASES[0]):  # without ReLU, with it
        inputs = tail_sample(case, torch.float32, torch.channels_last)
        inputs[-1].requires_grad_()
        out = tail_fused(case, fused_backend)(*inputs)
        grad_out = torch.randn_like(out)
        (grad_residual,) = torch.autograd.grad(out, inputs[-1], grad_out)
        assert (grad_residual.data_ptr() == grad_out.data_ptr()) == (not case[3]), case


def test_tail_keeps_the_conv_output_unless_it_recomputes_it():
    """Without recompute the op keeps the conv output (one activation of the output's size more than with it) and
    its backward runs no convolution forward; with recompute the backward runs the conv again."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    case = TAIL_CASES[0]  # with a residual, which has the conv output's shape
    kept, backward_convs = {}, {}
    for recompute in (True, False):
        inputs = tail_sample(case, torch.float32, torch.channels_last)
        parameters = [inputs[i] for i in (1, 2, 5, 6, 7)]
        kept[recompute] = saved_bytes(lambda: tail_fused(case, "cpu", recompute)(*inputs), parameters)
        out = tail_fused(case, "cpu", recompute)(*inputs)
        with OpRecorder() as ops:  # sees the aten ops the C++ autograd node calls too
            out.sum().backward()
        backward_convs[recompute] = ops.seen.count(torch.ops.aten.conv2d.default) + ops.seen.count(
            torch.ops.aten.convolution.default)
    output_bytes = inputs[-1].numel() * inputs[-1].element_size()
    assert backward_convs == {True: 1, False: 0}
    assert abs((kept[False] - kept[True]) - output_bytes) < 500, (kept, output_bytes)


def test_without_affine_parameters_or_running_statistics(fused_backend):
    """BN layers built with affine=False and track_running_stats=False: ones and zeros stand in for the
    parameters, and no running statistics are updated."""
    shape, then, weight_shape = CASES[0]
    x, _, _, conv_weight, _, _ = sample(shape, weight_shape, torch.float32, torch.channels_last)
    assert_matches_unfused(lambda *a: fused(fused_backend)(*a, then), lambda *a: unfused(*a, then),
                           [x, None, None, conv_weight, None, None], ["x", "", "", "conv weight", "", ""])
    case = TAIL_CASES[0]
    inputs = tail_sample(case, torch.float32, torch.channels_last)
    for i in (1, 2, 3, 4, 6, 7, 8, 9):  # both BNs' parameters and running statistics
        inputs[i] = None
    assert_matches_unfused(tail_fused(case, fused_backend), tail_unfused(case), inputs, TAIL_NAMES)


@pytest.mark.parametrize("case", TAIL_CASES[:2], ids=str)
def test_tail_gradcheck_float64(case):
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    inputs = tail_sample(case, torch.float64, torch.contiguous_format)
    stats = {i: t for i, t in enumerate(inputs) if t is not None and not t.requires_grad}
    differentiable = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]

    def fn(*tensors):
        args = list(inputs)
        for i, t in zip(differentiable, tensors):
            args[i] = t
        for i, t in stats.items():
            args[i] = t.clone()  # each evaluation from the same running statistics
        return tail_fused(case, "cpu")(*args)
    assert torch.autograd.gradcheck(fn, [inputs[i] for i in differentiable])


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=case_id)
def test_gradcheck_float64(case):
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    shape, then, weight_shape = case
    x, weight, bias, next_weight, running_mean, running_var = sample(shape, weight_shape, torch.float64,
                                                                     torch.contiguous_format)
    differentiable = [t for t in (x, weight, bias, next_weight) if t is not None]

    def fn(x, weight, bias, *next_weight):
        return fused("cpu")(x, weight, bias, *(next_weight or [None]), running_mean.clone(), running_var.clone(),
                            then)
    assert torch.autograd.gradcheck(fn, differentiable)


def test_double_backward_raises():
    """The statistics are saved as constants, so a second derivative would miss terms: it must raise."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    shape, then, weight_shape = CASES[2]
    x, weight, bias, conv_weight, running_mean, running_var = sample(shape, weight_shape, torch.float64,
                                                                    torch.contiguous_format)
    out = fused("cpu")(x, weight, bias, conv_weight, running_mean, running_var, then)
    grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(grad_x.square().sum(), conv_weight)


def test_one_value_per_channel_is_refused():
    """As nn.BatchNorm2d in training: no batch statistics from one value, for either BN of the tail op."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    shape, then, weight_shape = CASES[0]
    x, weight, bias, conv_weight, running_mean, running_var = sample((1, 8, 1, 1), weight_shape, torch.float32,
                                                                    torch.contiguous_format)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused("cpu")(x, weight, bias, conv_weight, running_mean, running_var, then)
    case = ((2, 4, 3, 3), (6, 3, 2, 0), True, True)  # a 3x3 stride-2 conv leaves the second BN one value
    inputs = tail_sample(case, torch.float32, torch.contiguous_format)
    inputs[0], inputs[-1] = inputs[0][:1], inputs[-1][:1]  # batch 1: x 1x4x3x3, the conv output 1x6x1x1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tail_fused(case, "cpu")(*inputs)


@pytest.mark.parametrize("backend, node", [("cpu", "CppNode"), ("triton", "BNReLUThenBackward")])
def test_autograd_node_per_backend(backend, node):
    """The cpu backend's ops record their C++ autograd node (csrc/recomputed_bn_relu.cpp); the others the Python
    BNReLUThen, which computes the same."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    for case in (CASES[0], CASES[3]):
        shape, then, weight_shape = case
        out = fused(backend)(*sample(shape, weight_shape, torch.float32, torch.channels_last), then)
        assert node in out.grad_fn.name()
    out = tail_fused(TAIL_CASES[0], backend)(*tail_sample(TAIL_CASES[0], torch.float32, torch.channels_last))
    assert node in out.grad_fn.name()


def test_reference_backend_is_refused():
    shape, then, weight_shape = CASES[0]
    x, weight, bias, conv_weight, running_mean, running_var = sample(shape, weight_shape, torch.float64,
                                                                    torch.contiguous_format)
    with pytest.raises(ValueError, match="reference backend is plain PyTorch"):
        fused("reference")(x, weight, bias, conv_weight, running_mean, running_var, then)


def saved_storages(fn, exclude=()) -> dict:
    """{data_ptr: (bytes, dtype)} of the distinct storages autograd keeps for the backward while fn() runs,
    less those of the tensors in `exclude` (parameters, which the model holds anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = (storage.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def saved_bytes(fn, exclude=()) -> int:
    return sum(nbytes for nbytes, _ in saved_storages(fn, exclude).values())


def _downsample(inplanes, planes, stride):
    return nn.Sequential(TV.conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))


# (torchvision block, rf block, the channels and spatial size of each inner ReLU output the fused block does
# not keep), for a 4 x C x 12 x 12 input
BLOCKS = {
    "basic": (lambda: TV.BasicBlock(16, 16), lambda b: rf.nn.BasicBlock(16, 16, backend=b), [(16, 12)]),
    "bottleneck": (lambda: TV.Bottleneck(64, 16), lambda b: rf.nn.Bottleneck(64, 16, backend=b),
                   [(16, 12), (16, 12)]),
    # a downsample branch (conv + BN, no ReLU): its BN output is not kept either, as in eager
    "bottleneck_downsample": (lambda: TV.Bottleneck(32, 16, 2, _downsample(32, 64, 2)),
                              lambda b: rf.nn.Bottleneck(32, 16, 2, _downsample(32, 64, 2), backend=b),
                              [(16, 12), (16, 6)]),
    # low_memory: conv3's output (the block's output width) is not kept either
    "bottleneck_low_memory": (lambda: TV.Bottleneck(64, 16),
                              lambda b: rf.nn.Bottleneck(64, 16, backend=b, low_memory=True),
                              [(16, 12), (16, 12), (64, 12)]),
}


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_block_keeps_less_than_torchvision(kind, backend):
    """On a fused backend the block in training keeps one activation of each inner BN + ReLU less than
    torchvision's: BasicBlock one (conv1's width), Bottleneck two (conv1's and conv2's width), and nothing more
    where it has a downsample branch. On the reference backend (plain PyTorch) it keeps what torchvision keeps."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(0)
    make_reference, make_fused, inner = BLOCKS[kind]
    reference, block = make_reference(), make_fused(backend)
    block.load_state_dict(reference.state_dict())
    x = torch.randn(4, reference.conv1.in_channels, 12, 12, requires_grad=True)
    eager, mine = saved_bytes(lambda: reference(x)), saved_bytes(lambda: block(x))
    expected = sum(4 * channels * size * size * 4 for channels, size in inner) if backend != "reference" else 0
    # Exactly those activations, give or take per-channel statistics (a few hundred bytes).
    assert abs((eager - mine) - expected) < 2000, (eager, mine, expected)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bn_act_without_relu_keeps_only_its_input(backend):
    """Without ReLU (a downsample branch) the output is not needed for the backward and is not kept."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    kept = saved_storages(lambda: rf.bn_act(x, weight, bias, torch.zeros(8), torch.ones(8), training=True, relu=False,
                                            backend=backend), exclude=[weight, bias])
    activation_sized = [nbytes for nbytes, _ in kept.values() if nbytes >= x.numel() * x.element_size()]
    assert activation_sized == [x.numel() * x.element_size()], kept


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_stem_keeps_only_the_conv_output(backend):
    """The stem (conv, BN, ReLU, max pool): eager keeps the conv output, the ReLU output and the pool's int64
    indices; on a fused backend the model keeps the conv output only."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(0)
    eager = torchvision.models.resnet18()
    model = rf.models.resnet18(backend=backend)
    model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    stem_output = 2 * 64 * 16 * 16 * 4  # bytes of the conv (and ReLU) output, 64 x 16 x 16 float32

    def stem_tensors(fn, params):
        kept = saved_storages(fn, exclude=list(params))
        return sorted((nbytes, dtype) for nbytes, dtype in kept.values() if nbytes >= stem_output // 2)

    expected = [(stem_output, torch.float32)] * 2 + [(stem_output // 2, torch.int64)]  # conv out, ReLU out, indices
    assert stem_tensors(lambda: eager(x), eager.parameters()) == sorted(expected)
    mine = stem_tensors(lambda: model(x), model.parameters())
    assert mine == (sorted(expected) if backend == "reference" else [(stem_output, torch.float32)])


@pytest.mark.parametrize("low_memory, bound", [(False, 0.8), (True, 0.55)])
def test_resnet50_training_keeps_less_than_torchvision(low_memory, bound):
    """The whole ResNet-50 in training (cpu backend, float32): the activations kept for the backward (parameters
    excluded) are at most 0.8x what torchvision's model keeps (the issue's memory target), 0.55x with
    low_memory."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    torch.manual_seed(0)
    eager = torchvision.models.resnet50()
    model = rf.models.resnet50(backend="cpu", low_memory=low_memory)
    model.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    ratio = (saved_bytes(lambda: model(x), model.parameters())
             / saved_bytes(lambda: eager(x), eager.parameters()))
    assert ratio <= bound, ratio


@pytest.mark.parametrize("kind, low_memory", [("basic", False), ("bottleneck", False), ("bottleneck", True)])
def test_training_block_runs_its_last_steps_as_one_op(kind, low_memory, monkeypatch):
    """In training, a block's last BN + ReLU, conv and BN (+ shortcut, ReLU) are one bn_relu_conv_bn_act call (one
    autograd node, not bn_relu_conv and then bn_act), keeping the conv output unless low_memory; no BN of the
    block runs on its own."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    tails, alone = [], []
    tail_op, bn_act = fused_modules.bn_relu_conv_bn_act, fused_modules.bn_act
    monkeypatch.setattr(fused_modules, "bn_relu_conv_bn_act",
                        lambda *a, **k: tails.append(k["recompute"]) or tail_op(*a, **k))
    monkeypatch.setattr(fused_modules, "bn_act", lambda *a, **k: alone.append(1) or bn_act(*a, **k))
    block = (rf.nn.BasicBlock(8, 8, backend="cpu") if kind == "basic"
             else rf.nn.Bottleneck(32, 8, backend="cpu", low_memory=low_memory))
    block(torch.randn(2, block.conv1.in_channels, 6, 6, requires_grad=True)).sum().backward()
    assert tails == [low_memory] and not alone


def test_block_without_autograd_and_in_eval_skips_the_recompute(monkeypatch):
    """No autograd (no_grad) or eval mode: nothing is saved, so the plain ops run."""
    calls = []
    monkeypatch.setattr("resnet_fused.nn.fused.bn_relu_conv", lambda *a, **k: calls.append(1))
    block = rf.nn.BasicBlock(8, 8, backend="cpu" if "cpu" in rf.available_backends() else None)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        block(x)
    block.eval()(x)
    assert not calls
