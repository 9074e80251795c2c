"""bn_relu_conv: conv2d(relu(batch_norm(x))) in training, which keeps x rather than the ReLU output for the
backward (resnet_fused/ops/bn_relu_conv.py), and the blocks that use it: parity against the unfused ops in
float64, gradcheck, and the activation memory it saves, measured with saved-tensor hooks."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from samples import assert_parity, backends_for, to_float64

import resnet_fused as rf
from resnet_fused.ops.bn_relu_conv import bn_relu_conv

TV = torchvision.models.resnet
CASES = [  # (N, C, H, W), output channels, kernel, stride, padding
    ((4, 8, 7, 7), 6, 3, 1, 1),
    ((2, 7, 9, 11), 5, 1, 2, 0),
    ((3, 4, 5, 5), 4, 3, 2, 1),
]


def sample(shape, c_out, kernel, dtype, memory_format, requires_grad=True):
    torch.manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(channels, dtype=torch.float64).to(dtype)
    conv_weight = (torch.randn(c_out, channels, kernel, kernel, dtype=torch.float64) * 0.3).to(dtype)
    running_mean = torch.randn(channels, dtype=torch.float64).to(dtype) * 0.1
    running_var = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype)
    for t in (x, weight, bias, conv_weight):
        t.requires_grad_(requires_grad)
    return [x, weight, bias, conv_weight, running_mean, running_var]


def unfused(x, weight, bias, conv_weight, running_mean, running_var, stride, padding):
    y = F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))
    return F.conv2d(y, conv_weight, None, stride, padding)


def fused(backend):
    def run(x, weight, bias, conv_weight, running_mean, running_var, stride, padding):
        return bn_relu_conv(x, weight, bias, running_mean, running_var, conv_weight, momentum=0.1, eps=1e-5,
                            stride=(stride, stride), padding=(padding, padding), dilation=(1, 1), groups=1,
                            backend=backend)
    return run


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity_with_the_unfused_ops(case, backend, memory_format):
    """Output, the gradients of x, the BN parameters and the conv weight, and the running statistics, in
    float32 against float64, within twice PyTorch's own float32 error."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    shape, c_out, kernel, stride, padding = case
    inputs = sample(shape, c_out, kernel, torch.float32, memory_format)
    same_dtype = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    oracle = to_float64(inputs)
    grad_out = None
    results = []
    for fn, args in ((fused(backend), inputs), (unfused, same_dtype), (unfused, oracle)):
        out = fn(*args, stride, padding)
        grad_out = torch.randn(out.shape, dtype=torch.float64) if grad_out is None else grad_out
        grads = torch.autograd.grad(out, args[:4], grad_out.to(out.dtype))
        results.append((out, *grads, args[4], args[5]))
    assert results[0][0].is_contiguous(memory_format=memory_format)
    names = ["output", "grad x", "grad bn weight", "grad bn bias", "grad conv weight", "running_mean", "running_var"]
    for name, actual, torch_same, oracle_value in zip(names, *results):
        assert_parity(actual.detach(), torch_same.detach(), oracle_value.detach(), what=name)


def test_gradcheck_float64():
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    x, weight, bias, conv_weight, running_mean, running_var = sample((3, 4, 5, 5), 3, 3, torch.float64,
                                                                    torch.contiguous_format)
    fn = lambda *a: fused("cpu")(*a, running_mean.clone(), running_var.clone(), 1, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, conv_weight))


def test_double_backward_raises():
    """The statistics are saved as constants, so a second derivative would miss terms: it must raise."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the cpu backend is not available here")
    x, weight, bias, conv_weight, running_mean, running_var = sample((2, 4, 5, 5), 3, 3, torch.float64,
                                                                    torch.contiguous_format)
    out = fused("cpu")(x, weight, bias, conv_weight, running_mean, running_var, 1, 1)
    grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(grad_x.square().sum(), conv_weight)


def test_reference_backend_is_refused():
    x, weight, bias, conv_weight, running_mean, running_var = sample((2, 4, 5, 5), 3, 3, torch.float64,
                                                                    torch.contiguous_format)
    with pytest.raises(ValueError, match="reference backend is plain PyTorch"):
        fused("reference")(x, weight, bias, conv_weight, running_mean, running_var, 1, 1)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_block_keeps_less_than_torchvision(kind, backend):
    """On a fused backend the block in training keeps one activation of each inner BN + ReLU less than
    torchvision's: BasicBlock one (conv1's width), Bottleneck two (conv1's and conv2's width). On the
    reference backend (plain PyTorch) it keeps what torchvision keeps."""
    if backend not in backends_for("bn_act", "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(0)
    if kind == "basic":
        reference, planes, inner = TV.BasicBlock(16, 16), 16, 1
        block = rf.nn.BasicBlock(16, 16, backend=backend)
    else:
        reference, planes, inner = TV.Bottleneck(64, 16), 16, 2
        block = rf.nn.Bottleneck(64, 16, backend=backend)
    block.load_state_dict(reference.state_dict())
    x = torch.randn(4, reference.conv1.in_channels, 12, 12, requires_grad=True)
    eager, mine = saved_bytes(lambda: reference(x)), saved_bytes(lambda: block(x))
    inner_activation = 4 * planes * 12 * 12 * 4  # bytes of one float32 tensor of the inner width
    saved = inner if backend != "reference" else 0
    # Exactly those activations, give or take per-channel statistics (a few hundred bytes).
    assert abs((eager - mine) - saved * inner_activation) < 0.02 * inner_activation, (eager, mine)


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
