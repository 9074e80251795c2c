import contextlib

import pytest
import torch
from samples import (BNCase, BN_CASES, BN_DTYPES, BN_DTYPE_IDS, MEMORY_FORMATS, assert_parity, backends_for,
                     bn_sample, skip_unless_runs, to_float64)

import resnet_fused as rf
from resnet_fused import reference

BACKENDS = ["reference", "cpu", "cuda", "triton"]
CASE_IDS = [c.name for c in BN_CASES]
DTYPES, DTYPE_IDS = BN_DTYPES, BN_DTYPE_IDS


def call(fn, sample, case, training, **kwargs):
    x, weight, bias, running_mean, running_var, residual = sample
    return fn(x, weight, bias, running_mean, running_var, residual, training=training, relu=case.relu, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_CASES, ids=CASE_IDS)
def test_forward_parity(case, backend, dtypes, memory_format, training, device):
    dtype, param_dtype = dtypes
    skip_unless_runs("bn_act", backend, device, dtype)
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    sample = bn_sample(case, dtype, device, memory_format, param_dtype=param_dtype)
    same_dtype, oracle = [t.clone() if t is not None else None for t in sample], to_float64(sample)

    out = call(rf.bn_act, sample, case, training, backend=backend)
    assert out.dtype == dtype and out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])
    assert_parity(out, call(reference.bn_act, same_dtype, case, training), call(reference.bn_act, oracle, case, training))
    for i, name in ((3, "running_mean"), (4, "running_var")):
        assert sample[i].dtype == param_dtype
        assert_parity(sample[i], same_dtype[i], oracle[i], what=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BN_CASES, ids=CASE_IDS)
def test_gradient_parity(case, backend, memory_format, training, device):
    check_gradient_parity(case, backend, memory_format, training, device)


@pytest.mark.parametrize("shape", [(2, 1031, 2, 2), (4, 1031, 10, 10)], ids=["one-piece", "pieces-of-64-rows"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_cpu_gradient_parity_wide_rows(dtypes, training, shape):
    """1031 NHWC channels: the backward's reduction that also writes (the ReLU-masked gradient) sweeps rows whose
    sums pass 4 KB a block of channels at a time; narrower ones (wide_131ch above) row by row. Over 400 rows the
    reductions split them into pieces of at least 64 rows (ReductionPlan in csrc/cpu/loops.h), each of two chunks."""
    check_gradient_parity(BNCase("wide_1031ch", shape), "cpu", "nhwc", training, "cpu", dtypes)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["float32", "bfloat16-float32"])
def test_cpu_parity_on_tensors_read_from_memory(dtypes):
    """4x256x56x56 (12.8 MB in float32, 6.4 in bf16): at kStreamedBytes and more (csrc/cpu/loops.h) the forward's
    statistics and the backward's sums without ReLU sweep the rows in storage order, not a block of channels at a
    time; in bf16 the sums only."""
    case = BNCase("streamed_256ch", (4, 256, 56, 56), residual=False, relu=False)
    sample = bn_sample(case, dtypes[0], "cpu", "nhwc", param_dtype=dtypes[1])
    copies = [[None if t is None else t.clone() for t in sample], to_float64(sample)]  # each updates its own stats
    actual = call(lambda *a, **k: rf.bn_act(*a, **k, backend="cpu"), sample, case, True)
    assert_parity(actual, *[call(reference.bn_act, s, case, True) for s in copies])
    check_gradient_parity(case, "cpu", "nhwc", True, "cpu", dtypes)


def check_gradient_parity(case, backend, memory_format, training, device, dtypes=(torch.float32, torch.float32)):
    """The gradients of x, weight, bias and residual against float64, within PyTorch's own error in the dtype."""
    skip_unless_runs("bn_act", backend, device, dtypes[0])
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    sample = bn_sample(case, dtypes[0], device, memory_format, requires_grad=True, param_dtype=dtypes[1])
    oracle_sample = to_float64(sample)
    inputs = [t for t in sample if t is not None and t.requires_grad]
    oracle_inputs = [t for t in oracle_sample if t is not None and t.requires_grad]
    grad_out = torch.randn(case.shape, dtype=torch.float64, device=device)

    def grads(fn, s, ins, g):
        return torch.autograd.grad(call(fn, s, case, training), ins, g)

    actual = grads(lambda *a, **k: rf.bn_act(*a, **k, backend=backend), sample, inputs, grad_out.to(dtypes[0]))
    same_dtype = grads(reference.bn_act, sample, inputs, grad_out.to(dtypes[0]))
    oracle = grads(reference.bn_act, oracle_sample, oracle_inputs, grad_out)
    for name, a, t, o in zip(["x", "weight", "bias", "residual"], actual, same_dtype, oracle):
        assert_parity(a, t, o, what=f"grad of {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", [c for c in BN_CASES if c.shape[0] > 0], ids=lambda c: c.name)
def test_gradcheck_float64(case, backend, training):
    skip_unless_runs("bn_act", backend, "cpu", torch.float64)
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    x, weight, bias, running_mean, running_var, residual = bn_sample(case, torch.float64, requires_grad=True)

    def fn(x, weight, bias, residual):
        return rf.bn_act(x, weight, bias, running_mean.clone(), running_var.clone(), residual, training=training,
                         relu=case.relu, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # float64: .to() may alias
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("case", BN_CASES, ids=CASE_IDS)
def test_opcheck(case, memory_format, training, requires_grad, dtype, device):
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the C++ library is not loaded")
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    x, weight, bias, running_mean, running_var, residual = bn_sample(case, dtype, device, memory_format, requires_grad)
    args = (x, weight, bias, residual, running_mean, running_var, training, 0.1, 1e-5, case.relu)
    torch.library.opcheck(torch.ops.resnet_fused.bn_act.default, args)
    out, save_mean, save_invstd, _, _ = (t.detach() for t in torch.ops.resnet_fused.bn_act(*args))
    torch.library.opcheck(
        torch.ops.resnet_fused.bn_act_backward.default,
        (torch.randn_like(out), out, x.detach(), weight.detach(), save_mean, save_invstd, training, case.relu),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("case", BN_CASES[:3] + [c for c in BN_CASES if not c.relu], ids=lambda c: c.name)
def test_backward_without_grad_pre(case, memory_format, training, device):
    """need_grad_pre=False: grad_pre comes back empty, and grad_x (computed in place over the masked gradient on
    the CPU) is bit for bit the one computed beside a grad_pre; without ReLU, grad_pre is grad_out."""
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the C++ library is not loaded")
    x, weight, bias, running_mean, running_var, residual = bn_sample(case, torch.float32, device, memory_format)
    args = (x, weight, bias, residual, running_mean, running_var, training, 0.1, 1e-5, case.relu)
    out, save_mean, save_invstd, _, _ = torch.ops.resnet_fused.bn_act(*args)
    grad_out = torch.randn_like(out)
    backward_args = (grad_out, out, x, weight, save_mean, save_invstd, training, case.relu)
    with_pre = torch.ops.resnet_fused.bn_act_backward(*backward_args)
    without_pre = torch.ops.resnet_fused.bn_act_backward(*backward_args, need_grad_pre=False)
    assert without_pre[3].shape == (0,)
    if not case.relu:
        assert torch.equal(with_pre[3], grad_out) and with_pre[3].data_ptr() != grad_out.data_ptr()
    for got, want in zip(without_pre[:3], with_pre[:3]):
        assert torch.equal(got, want) and got.stride() == want.stride()
    torch.library.opcheck(torch.ops.resnet_fused.bn_act_backward.default, (*backward_args, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend, device):
    """The backward treats the batch statistics' gradient terms as done: a second derivative would be wrong, so it
    raises, through rf.bn_act's eager autograd as through the op's registered one."""
    skip_unless_runs("bn_act", backend, device, torch.float32)
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, twice differentiable")
    case = BN_CASES[0]
    sample = bn_sample(case, torch.float32, device, requires_grad=True)
    x = sample[0]
    for fn in (lambda: call(rf.bn_act, sample, case, True, backend=backend),
               lambda: torch.compile(lambda: call(rf.bn_act, sample, case, True, backend=backend), backend="eager")()):
        grad_x, = torch.autograd.grad(fn().square().sum(), x, create_graph=True)
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(grad_x.sum(), x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("trainable", [["x"], ["weight", "bias"], ["residual"], ["x", "residual"], ["bias"]], ids=str)
def test_gradients_of_some_inputs_only(trainable, training):
    """A frozen BN, or an input without a gradient: the gradients asked for match the float64 reference's, on
    the cpu backend's C++ autograd node (whose inputs autograd numbers without the absent ones)."""
    skip_unless_runs("bn_act", "cpu", "cpu", torch.float32)
    case = BN_CASES[0]
    names = ["x", "weight", "bias", "running_mean", "running_var", "residual"]
    sample = bn_sample(case, torch.float32, "cpu", "nhwc")
    for name, t in zip(names, sample):
        t.requires_grad_(name in trainable)
    oracle = [t.detach().double().requires_grad_(t.requires_grad) for t in sample]
    same_dtype = [t.detach().clone().requires_grad_(t.requires_grad) for t in sample]
    grad_out = torch.randn(case.shape, dtype=torch.float64)
    results = []
    for fn, args in ((lambda *a, **k: rf.bn_act(*a, **k, backend="cpu"), sample), (reference.bn_act, same_dtype),
                     (reference.bn_act, oracle)):
        out = call(fn, args, case, training)
        results.append(torch.autograd.grad(out, [t for t in args if t.requires_grad], grad_out.to(out.dtype)))
    for name, got, same, want in zip(trainable, *results):
        assert_parity(got, same, want, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided_nchw", "channel_slice_nhwc"])
def test_non_contiguous_inputs(layout, backend, device):
    """x and residual that are views (every other row of an NCHW tensor; a slice of a channels_last tensor's
    channels): the output and every gradient as for contiguous copies, against float64."""
    skip_unless_runs("bn_act", backend, device, torch.float32)
    torch.manual_seed(0)
    if layout == "strided_nchw":
        def view(t):
            return t[:, :, ::2]
        shape = (3, 5, 14, 6)
    else:
        def view(t):
            return t.contiguous(memory_format=torch.channels_last)[:, 2:7]
        shape = (3, 9, 7, 6)
    bases = [torch.randn(shape, dtype=torch.float64, device=device) for _ in range(2)]
    weight, bias = torch.rand(5, dtype=torch.float64, device=device) + 0.5, torch.randn(5, dtype=torch.float64,
                                                                                       device=device)
    grad_out = torch.randn(view(bases[0]).shape, dtype=torch.float64, device=device)
    results = []
    for dtype in (torch.float32, torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_() for t in (*bases, weight, bias)]
        x, residual = view(leaves[0]), view(leaves[1])
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        fn = rf.bn_act if not results else reference.bn_act
        kwargs = {"backend": backend} if not results else {}
        out = fn(x, leaves[2], leaves[3], None, None, residual, training=True, **kwargs)
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        results.append([out, *grads])
    for label, got, same, want in zip(["output", "grad x", "grad residual", "grad weight", "grad bias"], *results):
        assert_parity(got.detach(), same.detach(), want.detach(), what=label)


def test_cpu_backend_records_a_cpp_autograd_node():
    """On the cpu backend rf.bn_act records the op's C++ autograd node (csrc/bn_act_autograd.cpp), not the Python
    autograd.Function the Triton backend records: tens of microseconds less a call."""
    skip_unless_runs("bn_act", "cpu", "cpu", torch.float32)
    case = BN_CASES[0]
    out = call(rf.bn_act, bn_sample(case, requires_grad=True), case, True, backend="cpu")
    assert "CppNode" in out.grad_fn.name() and "BNAct" in out.grad_fn.name()


@pytest.mark.parametrize("how", ["no_grad", "no_input_requires_grad"])
def test_cpu_backend_without_a_gradient_to_record_matches_the_recording_path(how):
    """Without a gradient to record, bn_act_autograd runs the op without its C++ Function (whose context costs
    microseconds a call): no autograd node, and the recording path's output and running statistics."""
    skip_unless_runs("bn_act", "cpu", "cpu", torch.float32)
    case = BN_CASES[0]
    recorded = bn_sample(case, requires_grad=True)
    plain = [None if t is None else t.detach().clone().requires_grad_(how == "no_grad" and t.requires_grad)
             for t in recorded]
    out_recorded = call(rf.bn_act, recorded, case, True, backend="cpu")
    with torch.no_grad() if how == "no_grad" else contextlib.nullcontext():
        out_plain = call(rf.bn_act, plain, case, True, backend="cpu")
    assert out_recorded.grad_fn is not None and out_plain.grad_fn is None and not out_plain.requires_grad
    assert torch.equal(out_plain, out_recorded.detach())
    for i in (3, 4):  # the running statistics, updated in place by both
        assert torch.equal(plain[i], recorded[i]) and not torch.equal(plain[i], bn_sample(case)[i])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_gradient_without_relu_is_grad_out(backend, training, device):
    """Without ReLU the residual's gradient is the incoming gradient itself, as PyTorch's add hands it on: no copy
    (the C++ node and the Python formula alike); with ReLU it is the masked gradient, a tensor of its own."""
    skip_unless_runs("bn_act", backend, device, torch.float32)
    for case in (BN_CASES[4], BN_CASES[0]):  # no_relu, basic
        x, weight, bias, running_mean, running_var, residual = bn_sample(case, torch.float32, device, "nhwc",
                                                                         requires_grad=True)
        out = call(rf.bn_act, (x, weight, bias, running_mean, running_var, residual), case, training,
                   backend=backend)
        grad_out = torch.randn_like(out)
        grad_residual, grad_x = torch.autograd.grad(out, (residual, x), grad_out)
        expected = grad_out if not case.relu else grad_out * (out > 0)
        torch.testing.assert_close(grad_residual, expected, rtol=0, atol=0)
        assert (grad_residual.data_ptr() == grad_out.data_ptr()) == (not case.relu), case.name


@pytest.mark.parametrize("shape, memory_format",
                         [((4, 131, 33, 33), "nhwc"), ((4, 1031, 10, 10), "nhwc"), ((2, 3, 70, 70), "nchw")],
                         ids=["nhwc-pieces-and-chunks", "nhwc-wide-rows-pieces-of-64-rows", "nchw-chunks"])
def test_cpu_statistics_accurate_far_from_zero(shape, memory_format):
    """A mean 1e4 times the spread, over several chunks and pieces of the CPU reduction: fp32
    E[x^2] - E[x]^2 loses everything, the per-chunk centred sums merged with Chan's formula do not."""
    if not rf.build_info()["cpu_compiled"]:
        pytest.skip("the CPU kernels are not built")
    torch.manual_seed(0)
    exact = 1e4 + torch.randn(shape, dtype=torch.float64)
    x = exact.float().contiguous(memory_format=MEMORY_FORMATS[memory_format])
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    c = shape[1]
    ones, zeros = torch.ones(c), torch.zeros(c)
    _, mean, invstd, _, _ = torch.ops.resnet_fused.bn_act(x, ones, zeros, None, zeros, ones, True, 0.1, 0.0, False)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd.double(), exact_var.rsqrt(), rtol=1e-4, atol=0)
    naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
    assert (naive.double() - exact_var).abs().max() > 0.1 * exact_var.max(), "the test lost its teeth"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_updates_running_stats(backend, device):
    skip_unless_runs("bn_act", backend, device, torch.float32)
    case = BN_CASES[0]
    x, weight, bias, running_mean, running_var, residual = bn_sample(case, torch.float32, device, "nhwc", requires_grad=True)
    eager_mean, eager_var = running_mean.clone(), running_var.clone()

    def block(x, weight, bias, mean, var, residual):
        return rf.bn_act(x, weight, bias, mean, var, residual, training=True, backend=backend)

    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, weight, bias, running_mean, running_var, residual)
    expected = block(x, weight, bias, eager_mean, eager_var, residual)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(running_mean, eager_mean)
    torch.testing.assert_close(running_var, eager_var)
    inputs = (x, weight, bias, residual)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_affine_and_running_stats(backend, device):
    skip_unless_runs("bn_act", backend, device, torch.float32)
    x = torch.randn(3, 4, 5, 5, device=device)
    out = rf.bn_act(x, None, None, None, None, training=True, relu=False, backend=backend)
    torch.testing.assert_close(out, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_training_with_one_value_per_channel_raises_like_pytorch():
    x, weight, bias, running_mean, running_var, _ = bn_sample(BNCase("one", (1, 3, 1, 1)))
    for backend in backends_for("bn_act", "cpu"):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            rf.bn_act(x, weight, bias, running_mean, running_var, training=True, backend=backend)


BAD_INPUTS = [
    ("3-d x", lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
    ("weight channels", lambda a: a.update(weight=a["weight"][:3]), ValueError, r"weight must have shape \(8,\)"),
    ("running_var channels", lambda a: a.update(running_var=torch.ones(9)), ValueError, r"running_var must have shape \(8,\)"),
    ("residual shape", lambda a: a.update(residual=a["residual"][:, :4]), ValueError, "residual must have shape"),
    ("residual dtype", lambda a: a.update(residual=a["residual"].double()), TypeError, "residual has dtype torch.float64"),
    ("parameter dtypes differ", lambda a: a.update(bias=a["bias"].double()), TypeError, "must share one dtype"),
    ("float64 parameters, float32 x", lambda a: a.update(**{k: a[k].double() for k in ("weight", "bias", "running_mean", "running_var")}),
     TypeError, "the BN parameters have dtype torch.float64 but x has torch.float32"),
    ("mixed devices", lambda a: a.update(weight=a["weight"].to("meta")), RuntimeError, "weight is on meta"),
    ("momentum None", lambda a: a.update(momentum=None), ValueError, "momentum=None"),
    ("eval without running stats", lambda a: a.update(training=False, running_mean=None, running_var=None), ValueError, "eval mode"),
    ("one running stat", lambda a: a.update(running_var=None), ValueError, "must be given together"),
    ("training not a bool", lambda a: a.update(training=1), TypeError, "training must be a bool"),
    ("unknown backend", lambda a: a.update(backend="fast"), ValueError, "unknown backend 'fast'"),
]


# What a module's tensors can get wrong, through the C++ op the modules' training steps call below rf.bn_act's
# Python checks (nn/fused.py, FusedModule._batch_norm): the cpu backend's op checks it again.
CPU_OP_BAD_INPUTS = [
    ("weight channels", lambda a: a.update(weight=a["weight"][:3]), RuntimeError, r"weight must have shape \[8\]"),
    ("residual shape", lambda a: a.update(residual=a["residual"][:, :4]), RuntimeError, "residual must have x's shape"),
    ("residual dtype", lambda a: a.update(residual=a["residual"].double()), TypeError, "residual has dtype Double"),
    ("parameter dtypes differ", lambda a: a.update(bias=a["bias"].double()), TypeError, "must share one dtype"),
    ("float64 parameters, float32 x", lambda a: a.update(**{k: a[k].double() for k in ("weight", "bias", "running_mean", "running_var")}),
     TypeError, "the BN parameters have dtype Double but x has Float"),
    ("one value per channel", lambda a: a.update(x=a["x"][:1, :, :1, :1], residual=None), ValueError,
     "Expected more than 1 value per channel when training"),
]


@pytest.mark.parametrize("change,error,message", [b[1:] for b in CPU_OP_BAD_INPUTS], ids=[b[0] for b in CPU_OP_BAD_INPUTS])
def test_cpu_op_checks_what_the_modules_do_not(change, error, message):
    if "cpu" not in backends_for("bn_act", "cpu"):
        pytest.skip("the C++ library is not loaded")
    x, weight, bias, running_mean, running_var, residual = bn_sample(BNCase("bad", (2, 8, 3, 3)))
    call_args = dict(x=x, weight=weight, bias=bias, residual=residual, running_mean=running_mean,
                     running_var=running_var)
    change(call_args)
    with pytest.raises(error, match=message):
        torch.ops.resnet_fused.bn_act_autograd.default(*call_args.values(), True, 0.1, 1e-5, True)


@pytest.mark.parametrize("change,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(change, error, message):
    x, weight, bias, running_mean, running_var, residual = bn_sample(BNCase("bad", (2, 8, 3, 3)))
    call_args = dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                     residual=residual, training=True)
    rf.bn_act(**call_args)  # the good call first: its checks are then cached (CheckCache), the bad call's must not be
    change(call_args)
    for _ in range(2):  # and a failed check is not cached either
        with pytest.raises(error, match=message):
            rf.bn_act(**call_args)
