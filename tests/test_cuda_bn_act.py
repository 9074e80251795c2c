"""The CUDA C++ bn_act kernels (csrc/cuda/bn_act.cu).

Without a GPU: the library holds every kernel for sm_80 and sm_90a, vectorized and without spills, the
ops have CUDA kernels, and the kernels' partition and statistics math (csrc/cuda/bn_act_plan.h) is run
on the CPU through the test-only op resnet_fused::_cuda_bn_host_check. With a GPU: parity against the
float64 reference, forward and backward, on odd shapes and every ResNet-50 BN shape, poisoned outputs,
layouts the kernels must normalize, determinism, and indexing past 2^31 elements.
"""
import pytest
import torch
from cuda_binary import resource_usage, sass_functions
from samples import (BNCase, BN_CASES, BN_DTYPES, BN_DTYPE_IDS, MEMORY_FORMATS, assert_parity, bn_sample,
                     to_float64)

import resnet_fused as rf
from resnet_fused import reference
from resnet_fused.ops._layout import empty_output
from resnet_fused.shapes import RESNET50_CONVS

CUDA_BUILT = rf.build_info()["cuda_compiled"]
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILT, reason="CUDA extension not built or not loaded")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in rf.available_backends(),
    reason="no CUDA device (or the CUDA library is not loaded): runs in a GPU session",
)

KERNELS = [
    "bn_stats_nhwc_kernel", "bn_stats_nchw_kernel", "bn_forward_finalize_kernel", "bn_forward_nhwc_kernel",
    "bn_forward_nchw_kernel", "bn_backward_reduce_nhwc_kernel", "bn_backward_reduce_nchw_kernel",
    "bn_backward_finalize_kernel", "bn_backward_nhwc_kernel", "bn_backward_nchw_kernel",
]
# The kernels that stream the tensors (not the finalize ones, which touch C values).
STREAMING = [k for k in KERNELS if "finalize" not in k]


# ------------------------------------------------------------------------------------------------------
# Build: what the library holds (CPU-runnable)


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_library_holds_every_bn_kernel(arch):
    functions = sass_functions(arch)
    for kernel in KERNELS:
        instances = [name for name in functions if kernel + "I" in name]
        # float32, float16, bfloat16 with a vector and a scalar width, float64 scalar; the finalize
        # kernels instead per (accumulation, parameter) type pair.
        assert len(instances) == (7 if kernel in STREAMING else 4), (kernel, instances)


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_vector_kernels_use_16_byte_accesses(arch):
    functions = sass_functions(arch)
    for kernel in STREAMING:
        for dtype_code, vec in (("f", 4), ("N3c104HalfE", 8), ("N3c108BFloat16E", 8)):
            [sass] = [s for name, s in functions.items() if f"{kernel}I{dtype_code}Li{vec}E" in name]
            assert "LDG.E.128" in sass, f"{kernel}<{dtype_code}, {vec}> has no 16-byte loads"
            if "forward_n" in kernel or "backward_n" in kernel:
                assert "STG.E.128" in sass, f"{kernel}<{dtype_code}, {vec}> has no 16-byte stores"


@needs_cuda_build
def test_streaming_kernels_do_not_spill():
    usage = resource_usage()
    checked = 0
    for (arch, name), res in usage.items():
        if not any(kernel + "I" in name for kernel in STREAMING) or "IdLi1E" in name:
            continue  # float64 runs the simple path; its division subroutine may use the stack
        assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {name}: {res}"
        checked += 1
    assert checked == 2 * len(STREAMING) * 6


@needs_cuda_build
def test_bn_ops_have_cuda_kernels():
    for op in ("bn_act", "bn_act_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "CUDA")
    assert rf.backends.has_kernel("bn_act", "cuda")


# ------------------------------------------------------------------------------------------------------
# The kernels' partition and statistics math, on the CPU (csrc/cuda/bn_act_host_check.cpp)

PLAN_FIELDS = ["channels_last", "vec", "block_x", "block_y", "bands", "rows_per_tile", "row_tiles",
               "inner_per_chunk", "inner_chunks", "tiles"]
H200_WAVE = 132 * 8  # SMs x resident 256-thread blocks: the target the host code computes on an H200
A100_WAVE = 108 * 8


def host_check(x, channels_last, vec, target_blocks=H200_WAVE):
    plan, tile_counts, visits, mean, var = torch.ops.resnet_fused._cuda_bn_host_check(x, channels_last, vec,
                                                                                     target_blocks)
    return dict(zip(PLAN_FIELDS, plan.tolist())), tile_counts, visits, mean, var


def plan_cases():
    """(shape, vec) pairs: odd shapes, ResNet-50's BN shapes at batch 2, and vector widths that fit."""
    shapes = [c.shape for c in BN_CASES] + [(3, 1, 5, 5), (2, 3, 1, 7), (1, 16, 64, 64), (40, 8, 2, 2)]
    shapes += sorted({(2, s.c_out, s.output_size(), s.output_size()) for s in RESNET50_CONVS})
    return shapes


@needs_cuda_build
@pytest.mark.parametrize("target_blocks", [1, 5, A100_WAVE, H200_WAVE, 10**6])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_tiles_cover_every_element_once(channels_last, target_blocks):
    for shape in plan_cases():
        n, c, h, w = shape
        inner = c if channels_last else h * w
        for vec in [v for v in (1, 4, 8) if inner % v == 0]:
            x = torch.randn(shape)
            plan, tile_counts, visits, _, _ = host_check(x, channels_last, vec, target_blocks)
            what = f"{shape} vec={vec} {plan}"
            assert bool((visits == 1).all()), what
            assert int(tile_counts.sum()) == n * h * w and bool((tile_counts > 0).all()), what
            assert plan["tiles"] == len(tile_counts) <= 65535, what  # grid.y
            assert plan["block_x"] * plan["block_y"] == 256, what
            if channels_last:
                assert plan["block_x"] in (1, 2, 4, 8, 16, 32) and plan["rows_per_tile"] % plan["block_y"] == 0, what
                assert plan["bands"] * plan["block_x"] * vec >= c, what
            else:
                assert plan["inner_per_chunk"] % vec == 0, what
            if x.numel() > 0 and target_blocks == H200_WAVE:
                # About a wave of blocks, and never more than two.
                assert plan["bands"] * plan["tiles"] <= 2 * H200_WAVE, what


@needs_cuda_build
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_are_accurate_far_from_zero(channels_last):
    """A mean 1e4 times the spread: fp32 E[x^2] - E[x]^2 loses everything, the kernels' Welford/Chan does not."""
    torch.manual_seed(0)
    x = (1e4 + torch.randn(4, 16, 24, 24, dtype=torch.float64)).float()
    exact = x.double()
    exact_var, exact_mean = torch.var_mean(exact, dim=(0, 2, 3), unbiased=False)
    for vec in (1, 4, 8):
        _, _, _, mean, var = host_check(x, channels_last, vec)
        assert torch.allclose(mean.double(), exact_mean, rtol=1e-6, atol=0)
        assert torch.allclose(var.double(), exact_var, rtol=1e-3, atol=0), (var, exact_var)
    naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
    assert (naive.double() - exact_var).abs().max() > 100 * 1e-3 * exact_var.max(), "the test lost its teeth"


@needs_cuda_build
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 7, 17, 17), (2, 64, 56, 56), (1, 3, 4, 6), (2, 256, 7, 7)])
def test_statistics_match_the_cpu_kernel(shape, channels_last):
    """Against the CPU backend's two-pass float64 statistics (save_mean, save_invstd of resnet_fused::bn_act)."""
    x = torch.randn(shape) * 3 + 1
    c = shape[1]
    ones, zeros = torch.ones(c), torch.zeros(c)
    _, save_mean, save_invstd, _, _ = torch.ops.resnet_fused.bn_act(x, ones, zeros, None, zeros, ones, True, 0.1,
                                                                    1e-5, False)
    inner = c if channels_last else shape[2] * shape[3]
    for vec in [v for v in (1, 4, 8) if inner % v == 0]:
        _, _, _, mean, var = host_check(x, channels_last, vec)
        torch.testing.assert_close(mean, save_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((var.double() + 1e-5).rsqrt().float(), save_invstd, rtol=1e-5, atol=0)


@needs_cuda_build
def test_empty_batch_has_no_tiles():
    plan, tile_counts, visits, mean, var = host_check(torch.randn(0, 3, 4, 4), True, 1)
    assert plan["tiles"] == 0 and tile_counts.numel() == 0 and visits.numel() == 0
    assert bool((mean == 0).all()) and bool((var == 0).all())


# ------------------------------------------------------------------------------------------------------
# On the GPU

DTYPES, DTYPE_IDS = BN_DTYPES, BN_DTYPE_IDS


def call(fn, sample, training, relu, **kwargs):
    x, weight, bias, running_mean, running_var, residual = sample
    return fn(x, weight, bias, running_mean, running_var, residual, training=training, relu=relu, **kwargs)


def check_parity(actual, same_dtype_torch, oracle, what):
    """The parity bound (2 x PyTorch's own error in the same dtype, against float64). For float64 PyTorch's
    result is the oracle itself and the bound collapses to a few ulps, which a reduction in another order
    cannot meet (seen: grad_bias 7e-14 vs a 4e-14 bound): there, 1e-12 of the largest value."""
    if actual.dtype == torch.float64:
        scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
        torch.testing.assert_close(actual, oracle, rtol=0, atol=1e-12 * scale, msg=what)
    else:
        assert_parity(actual, same_dtype_torch, oracle, what=what)


def check_forward_and_backward(case: BNCase, dtype, param_dtype, memory_format, training):
    """rf.bn_act(backend="cuda"): output, running statistics and every gradient against float64."""
    sample = bn_sample(case, dtype, "cuda", memory_format, requires_grad=True, param_dtype=param_dtype)
    same_dtype = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in sample]
    oracle = to_float64(sample)

    out = call(rf.bn_act, sample, training, case.relu, backend="cuda")
    expected = call(reference.bn_act, same_dtype, training, case.relu)
    exact = call(reference.bn_act, oracle, training, case.relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])
    check_parity(out, expected, exact, "output")
    for i, name in ((3, "running_mean"), (4, "running_var")):
        assert sample[i].dtype == param_dtype
        check_parity(sample[i], same_dtype[i], oracle[i], name)
    if out.numel() == 0:
        return

    grad = torch.randn(case.shape, dtype=torch.float64, device="cuda")
    names = ["x", "weight", "bias", "residual"]
    picked = [i for i in (0, 1, 2, 5) if sample[i] is not None]
    grads = torch.autograd.grad(out, [sample[i] for i in picked], grad.to(dtype))
    expected_grads = torch.autograd.grad(expected, [same_dtype[i] for i in picked], grad.to(dtype))
    exact_grads = torch.autograd.grad(exact, [oracle[i] for i in picked], grad)
    for i, a, t, o in zip(picked, grads, expected_grads, exact_grads):
        check_parity(a, t, o, f"grad of {names[(0, 1, 2, 5).index(i)]}")


@needs_gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", BN_CASES + [BNCase("one_channel", (3, 1, 5, 5)), BNCase("wide_odd", (2, 12, 7, 9))],
                         ids=lambda c: c.name)
def test_parity(case, dtypes, memory_format, training):
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    check_forward_and_backward(case, *dtypes, memory_format, training)


RESNET50_BN = sorted({(s.c_out, s.output_size(), s.epilogue) for s in RESNET50_CONVS})


@needs_gpu
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[3]], ids=[DTYPE_IDS[0], DTYPE_IDS[3]])
@pytest.mark.parametrize("shape", RESNET50_BN, ids=[f"{c}x{hw}x{hw}-{e}" for c, hw, e in RESNET50_BN])
def test_resnet50_bn_shapes_batch2(shape, dtypes, memory_format):
    channels, size, epilogue = shape
    case = BNCase(f"{channels}x{size}", (2, channels, size, size), residual=epilogue == "add_relu",
                  relu=epilogue != "none")
    check_forward_and_backward(case, *dtypes, memory_format, training=True)


def poison_allocator(*nbytes):
    """Fills freed blocks of the CUDA caching allocator with 0xFF (NaN in every float dtype) in the sizes
    the next allocations will take, so an element a kernel leaves unwritten reads as NaN."""
    blocks = [torch.full((max(int(n), 1),), 255, dtype=torch.uint8, device="cuda") for n in nbytes for _ in range(4)]
    blocks += [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(8)]  # the small pool
    torch.cuda.synchronize()
    del blocks


POISON_CASES = BN_CASES + [BNCase("one_channel", (3, 1, 5, 5)), BNCase("1x1", (6, 16, 1, 1)),
                           BNCase("resnet_l1", (2, 64, 56, 56)), BNCase("resnet_l4", (2, 2048, 7, 7))]


@needs_gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", POISON_CASES, ids=lambda c: c.name)
def test_raw_ops_write_every_output(case, dtype, memory_format, training):
    """torch.ops.resnet_fused.bn_act / bn_act_backward called directly on a poisoned allocator: no NaN
    where none belongs, layouts and dtypes as the fake kernels give, inputs untouched, statistics as the
    CPU kernel's."""
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x, weight, bias, running_mean, running_var, residual = bn_sample(case, dtype, "cuda", memory_format,
                                                                     param_dtype=param_dtype)
    inputs = [t.clone() if t is not None else None for t in (x, weight, bias, residual, running_mean, running_var)]
    nbytes = x.numel() * x.element_size()
    poison_allocator(nbytes, nbytes * 2, x.shape[1] * 8)
    args = (x, weight, bias, residual, running_mean, running_var, training, 0.1, 1e-5, case.relu)
    out, save_mean, save_invstd, new_mean, new_var = torch.ops.resnet_fused.bn_act(*args)
    torch.cuda.synchronize()

    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.stride() == empty_output(x, x.shape).stride()
    assert save_mean.dtype == save_invstd.dtype == stats_dtype and save_mean.shape == (x.shape[1],)
    assert new_mean.dtype == new_var.dtype == param_dtype and new_mean.stride() == running_mean.stride()
    for name, t in (("out", out), ("save_mean", save_mean), ("save_invstd", save_invstd),
                    ("new_running_mean", new_mean), ("new_running_var", new_var)):
        assert not t.isnan().any(), f"{name} has NaN: an element was left unwritten"
    for before, after in zip(inputs, (x, weight, bias, residual, running_mean, running_var)):
        if before is not None:
            assert torch.equal(before, after), "an input was modified"

    cpu = torch.ops.resnet_fused.bn_act(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    if dtype in (torch.float32, torch.float64):
        for name, actual, wanted in zip(["save_mean", "save_invstd", "new_running_mean", "new_running_var"],
                                        (save_mean, save_invstd, new_mean, new_var), cpu[1:]):
            torch.testing.assert_close(actual.cpu(), wanted, rtol=2e-5, atol=1e-6, msg=name)
    if training and x.shape[0] * x.shape[2] * x.shape[3] == 0:
        assert bool((save_mean == 0).all()) and bool((save_invstd == 0).all())
        assert torch.equal(new_mean, running_mean) and torch.equal(new_var, running_var)
    if not training:
        assert torch.equal(new_mean, running_mean) and torch.equal(new_var, running_var)

    grad_out = torch.randn_like(out)
    poison_allocator(nbytes, nbytes * 2, x.shape[1] * 8)
    grad_x, grad_weight, grad_bias, grad_pre = torch.ops.resnet_fused.bn_act_backward(
        grad_out, out, x, weight, save_mean, save_invstd, training, case.relu)
    torch.cuda.synchronize()
    for name, t in (("grad_x", grad_x), ("grad_pre", grad_pre)):
        assert t.dtype == dtype and t.stride() == empty_output(x, x.shape).stride(), name
        assert not t.isnan().any(), f"{name} has NaN: an element was left unwritten"
    for name, t in (("grad_weight", grad_weight), ("grad_bias", grad_bias)):
        assert t.dtype == weight.dtype and t.stride() == weight.stride(), name
        assert not t.isnan().any(), f"{name} has NaN: an element was left unwritten"
    masked = torch.where(out > 0, grad_out, 0) if case.relu else grad_out
    assert torch.equal(grad_pre, masked)


@needs_gpu
def test_nan_passes_through_relu_like_torch():
    x, weight, bias, running_mean, running_var, residual = bn_sample(BN_CASES[0], torch.float32, "cuda")
    x[0, 0, 0, 0] = float("nan")
    out, *_ = torch.ops.resnet_fused.bn_act(x, weight, bias, residual, running_mean, running_var, False, 0.1,
                                            1e-5, True)
    assert out[0, 0, 0, 0].isnan() and int(out.isnan().sum()) == 1


@needs_gpu
@pytest.mark.parametrize("layout", ["sliced_nchw", "sliced_nhwc", "permuted", "misaligned_nchw", "misaligned_nhwc"])
def test_layouts_the_kernels_normalize(layout):
    """Non-contiguous inputs go through x.contiguous(format); views at an odd offset take the scalar path."""
    torch.manual_seed(0)
    shape = (3, 16, 8, 8)
    if layout == "sliced_nchw":
        x = torch.randn(3, 16, 8, 16, device="cuda")[..., ::2]
    elif layout == "sliced_nhwc":
        x = torch.randn(3, 32, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)[:, ::2]
    elif layout == "permuted":
        x = torch.randn(3, 8, 8, 16, device="cuda").permute(0, 3, 2, 1)
    else:
        flat = torch.randn(1 + 3 * 16 * 8 * 8, device="cuda")[1:]  # 4 bytes past a 16-byte boundary
        x = flat.view(3, 8, 8, 16).permute(0, 3, 1, 2) if layout == "misaligned_nhwc" else flat.view(shape)
    assert x.shape == shape
    weight, bias = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    mean, var = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    residual = torch.randn(shape, device="cuda")
    args = (weight, bias, residual, mean, var, True, 0.1, 1e-5, True)
    out, save_mean, save_invstd, _, _ = torch.ops.resnet_fused.bn_act(x, *args)
    assert out.stride() == empty_output(x, x.shape).stride()
    expected = torch.ops.resnet_fused.bn_act(x.cpu(), *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    torch.testing.assert_close(out.cpu(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(save_invstd.cpu(), expected[2], rtol=1e-5, atol=0)
    grad_out = torch.randn_like(out)[..., :]
    got = torch.ops.resnet_fused.bn_act_backward(grad_out, out, x, weight, save_mean, save_invstd, True, True)
    want = torch.ops.resnet_fused.bn_act_backward(grad_out.cpu(), out.cpu(), x.cpu(), weight.cpu(), save_mean.cpu(),
                                                  save_invstd.cpu(), True, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_deterministic(memory_format):
    """No atomics: two runs are bitwise equal."""
    case = BNCase("l2", (8, 128, 28, 28))
    sample = bn_sample(case, torch.bfloat16, "cuda", memory_format, param_dtype=torch.float32)
    x, weight, bias, running_mean, running_var, residual = sample
    args = (x, weight, bias, residual, running_mean, running_var, True, 0.1, 1e-5, True)
    first, second = torch.ops.resnet_fused.bn_act(*args), torch.ops.resnet_fused.bn_act(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    grad_out = torch.randn_like(x)
    back = [torch.ops.resnet_fused.bn_act_backward(grad_out, first[0], x, weight, first[1], first[2], True, True)
            for _ in range(2)]
    for a, b in zip(*back):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_statistics_far_from_zero_on_gpu(memory_format):
    x = (1000 + torch.randn(4, 64, 56, 56, dtype=torch.float64)).float()
    exact_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    c = x.shape[1]
    ones, zeros = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    xc = x.cuda().contiguous(memory_format=MEMORY_FORMATS[memory_format])
    _, _, save_invstd, _, new_var = torch.ops.resnet_fused.bn_act(xc, ones, zeros, None, zeros, ones, True, 1.0,
                                                                  0.0, False)
    torch.testing.assert_close(save_invstd.cpu().double(), exact_var.rsqrt(), rtol=1e-4, atol=0)
    count = x.numel() // c
    torch.testing.assert_close(new_var.cpu().double(), exact_var * count / (count - 1), rtol=1e-4, atol=0)


@needs_gpu
def test_bad_arguments_raise_actionable_errors():
    x = torch.randn(2, 4, 3, 3, device="cuda")
    p = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="weight has dtype Double but x has Float"):
        torch.ops.resnet_fused.bn_act(x, p.double(), p, None, p, p, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\]"):
        torch.ops.resnet_fused.bn_act(x, p, p[:3], None, p, p, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="running_var is on cpu but x is on cuda"):
        torch.ops.resnet_fused.bn_act(x, p, p, None, p, p.cpu(), True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel"):
        torch.ops.resnet_fused.bn_act(x[:1, :, :1, :1], p, p, None, p, p, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad_out and out must have x's dtype"):
        torch.ops.resnet_fused.bn_act_backward(x.half(), x, x, p, p, p, True, True)


@needs_gpu
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_indexing_past_2_31_elements(memory_format):
    """2^31 + bfloat16 elements: the last elements of every pass are checked against float64 math."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 25 GB of GPU memory")
    n, c, h, w = 1, 64, 4100, 8200  # 2.15e9 elements
    fmt = MEMORY_FORMATS[memory_format]
    x = torch.empty((n, c, h, w), dtype=torch.bfloat16, device="cuda", memory_format=fmt).normal_()
    weight = torch.rand(c, device="cuda") + 0.5
    bias, mean, var = torch.randn(c, device="cuda"), torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    out, save_mean, save_invstd, _, _ = torch.ops.resnet_fused.bn_act(x, weight, bias, None, mean, var, True, 0.1,
                                                                      1e-5, False)
    # Statistics by float64 sums over row chunks.
    total, squares = torch.zeros(c, dtype=torch.float64, device="cuda"), torch.zeros(c, dtype=torch.float64, device="cuda")
    for rows in x.split(256, dim=2):
        d = rows.double()
        total += d.sum(dim=(0, 2, 3))
        squares += (d * d).sum(dim=(0, 2, 3))
        del d
    count = n * h * w
    exact_mean = total / count
    exact_var = squares / count - exact_mean**2  # float64 over N(0, 1) data: ample here
    torch.testing.assert_close(save_mean.double(), exact_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(save_invstd.double(), (exact_var + 1e-5).rsqrt(), rtol=2e-5, atol=0)
    tail = (slice(None), slice(None), slice(h - 2, h), slice(w - 64, w))  # past element 2^31 in either layout
    scale = (weight * save_invstd).double()[None, :, None, None]
    expected = (x[tail].double() - save_mean.double()[None, :, None, None]) * scale + bias.double()[None, :, None, None]
    torch.testing.assert_close(out[tail].double(), expected, rtol=1e-2, atol=1e-2)

    grad_out = x  # any data; relu=False, so grad_pre is grad_out itself
    grad_x, grad_weight, grad_bias, grad_pre = torch.ops.resnet_fused.bn_act_backward(
        grad_out, out, x, weight, save_mean, save_invstd, True, False)
    assert torch.equal(grad_pre[tail], grad_out[tail])
    xhat = (x[tail].double() - save_mean.double()[None, :, None, None]) * save_invstd.double()[None, :, None, None]
    g = grad_out[tail].double()
    mean_g = (grad_bias.double() / count)[None, :, None, None]
    mean_gxhat = (grad_weight.double() / count)[None, :, None, None]
    expected_gx = scale * (g - mean_g - xhat * mean_gxhat)
    torch.testing.assert_close(grad_x[tail].double(), expected_gx, rtol=1e-2, atol=1e-2)
    # sum(g * xhat) with g = x is count * var / sqrt(var + eps): checks the backward reduction end to end.
    torch.testing.assert_close(grad_weight.double(), count * exact_var * (exact_var + 1e-5).rsqrt(), rtol=1e-3, atol=0)
