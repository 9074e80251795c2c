"""conv_training, the cpu backend's convolution for the training paths (csrc/conv_training.cpp): ATen's
convolution with a C++ autograd node whose backward computes the weight gradient over a small output plane as
one matmul of grad_out and x's patches (csrc/conv_weight_grad.h). Against F.conv2d in float32 and float64, on
both sides of that rule, and twice differentiable as F.conv2d is."""
import pytest
import torch
import torch.nn.functional as F
from samples import OpRecorder, assert_parity, backends_for

# (x shape, weight shape, stride, padding, dilation, groups, memory format, takes the matmul)
CASES = [
    ((3, 16, 4, 4), (24, 16, 1, 1), 1, 0, 1, 1, torch.channels_last, True),  # a plane of 16: the matmul
    ((2, 12, 7, 7), (20, 12, 1, 1), 2, 0, 1, 1, torch.channels_last, True),  # stride 2 onto 4x4
    ((2, 7, 3, 5), (5, 7, 1, 1), 1, 0, 1, 1, torch.channels_last, True),  # odd channels, 3x5
    ((1, 8, 1, 1), (6, 8, 1, 1), 1, 0, 1, 1, torch.channels_last, True),  # batch 1, one pixel
    ((2, 8, 4, 4), (8, 8, 3, 3), 1, 1, 1, 1, torch.channels_last, True),  # 3x3, padding: patches of a padded copy
    ((2, 12, 7, 7), (10, 12, 3, 3), 2, 1, 1, 1, torch.channels_last, True),  # 3x3, stride 2 onto 4x4
    ((1, 7, 3, 5), (9, 7, 3, 3), 1, 2, 2, 1, torch.channels_last, True),  # dilation 2, odd channels, 3x5
    ((2, 3, 8, 8), (8, 3, 7, 7), 2, 3, 1, 1, torch.channels_last, True),  # a 7x7 stem-like kernel onto 4x4
    ((2, 8, 2, 2), (8, 8, 1, 1), 1, 1, 1, 1, torch.channels_last, True),  # 1x1 with padding onto 4x4
    ((0, 8, 4, 4), (8, 8, 3, 3), 1, 1, 1, 1, torch.channels_last, True),  # batch 0
    ((2, 16, 5, 5), (24, 16, 1, 1), 1, 0, 1, 1, torch.channels_last, False),  # a plane of 25: ATen's
    ((2, 8, 5, 5), (8, 8, 3, 3), 1, 1, 1, 1, torch.channels_last, False),  # 3x3 on a plane of 25: ATen's
    ((3700, 8, 4, 4), (4, 8, 3, 3), 1, 1, 1, 1, torch.channels_last, False),  # patches over the cap: ATen's
    ((3, 16, 4, 4), (24, 16, 1, 1), 1, 0, 1, 1, torch.contiguous_format, False),  # NCHW: ATen's
    ((2, 8, 4, 4), (8, 4, 1, 1), 1, 0, 1, 2, torch.channels_last, False),  # groups
    ((2, 8, 6, 6), (8, 8, 1, 1), 1, 1, 1, 1, torch.channels_last, False),  # padding onto 8x8
]


def case_id(case):
    x_shape, w_shape, stride, padding, dilation, groups, fmt, matmul = case
    layout = "nhwc" if fmt == torch.channels_last else "nchw"
    return f"{'x'.join(map(str, x_shape))}-k{w_shape[2]}-s{stride}-p{padding}-d{dilation}-g{groups}-{layout}"


def conv_training(x, weight, stride, padding, dilation, groups):
    pairs = [(v, v) for v in (stride, padding, dilation)]
    return torch.ops.resnet_fused.conv_training.default(x, weight, *pairs, groups)


@pytest.fixture(autouse=True)
def needs_the_library():
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the C++ libraries are not available here")


def sample(case, dtype):
    x_shape, w_shape, *_, fmt, _ = case
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(w_shape, dtype=torch.float64) * 0.3).to(dtype).contiguous(memory_format=fmt)
    return x, weight


@pytest.mark.parametrize("trainable", [["x", "weight"], ["weight"], ["x"]], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_conv2d(case, trainable):
    """Output and the gradients asked for, float32 against F.conv2d in float32 and float64; the output in x's
    memory format."""
    _, _, stride, padding, dilation, groups, fmt, matmul = case
    grad_out = None
    results = []
    for fn, dtype in ((conv_training, torch.float32), (F.conv2d, torch.float32), (F.conv2d, torch.float64)):
        x, weight = sample(case, dtype)
        x.requires_grad_("x" in trainable)
        weight.requires_grad_("weight" in trainable)
        if fn is F.conv2d:
            out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        else:
            out = conv_training(x, weight, stride, padding, dilation, groups)
            assert out.is_contiguous(memory_format=fmt)
            assert "CppNode" in out.grad_fn.name()
        grad_out = torch.randn(out.shape, dtype=torch.float64) if grad_out is None else grad_out
        inputs = [t for t in (x, weight) if t.requires_grad]
        with OpRecorder() as ops:
            results.append([out, *torch.autograd.grad(out, inputs, grad_out.to(dtype))])
        if fn is conv_training:  # the weight gradient takes the matmul exactly where the rule says
            assert (torch.ops.aten.mm.default in ops.seen) == (matmul and "weight" in trainable)
    for label, got, same, want in zip(["output", *[f"grad {name}" for name in trainable]], *results):
        assert_parity(got.detach(), same.detach(), want.detach(), what=label)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6], CASES[10]], ids=case_id)
def test_twice_differentiable(case):
    """gradcheck and gradgradcheck in float64: the backward is ATen ops, recorded under create_graph."""
    _, _, stride, padding, dilation, groups, _, _ = case
    x, weight = sample(case, torch.float64)
    x.requires_grad_()
    weight.requires_grad_()

    def fn(x, weight):
        return conv_training(x, weight, stride, padding, dilation, groups)
    assert torch.autograd.gradcheck(fn, (x, weight))
    assert torch.autograd.gradgradcheck(fn, (x, weight))


def test_training_blocks_use_it():
    """A Bottleneck training on the cpu backend runs its first conv and its downsample branch's conv as
    conv_training: two of its autograd nodes in the block's graph."""
    import resnet_fused as rf

    downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    block = rf.nn.Bottleneck(16, 8, 2, downsample, backend="cpu").to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    names, stack, seen = [], [block(x).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert sum("conv_training" in name for name in names) == 2, names
