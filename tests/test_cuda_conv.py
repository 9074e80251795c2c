"""The CUDA C++ conv_bn_act kernels (csrc/cuda/conv/).

Without a GPU: the kernels' address math (conv_geometry.h) against PyTorch's unfold and the PTX ISA's
fragment layouts, through test-only ops that run it on the CPU; the library holds the tensor-core
kernels (HMMA with cp.async and ldmatrix for sm_80, CUTLASS's HGMMA with TMA im2col for sm_90a) without
spills. With a GPU: every ResNet-18/50 conv shape on every kernel that can take it, float16/bfloat16/
float32, against float64 within twice PyTorch's own error, outputs poisoned with NaN first; epilogue
variants, tails, misaligned tensors, the kernel choice, and CUDA-graph capture. The op-level suite
(test_conv_bn_act.py) runs the odd shapes, layouts and gradients on backend="cuda" as well.
"""
import itertools
import os
import re

import pytest
import torch
import torch.nn.functional as F
from cuda_binary import resource_usage, sass_functions
from samples import assert_parity

import resnet_fused as rf
from resnet_fused import reference
from resnet_fused.shapes import RESNET18_CONVS, RESNET50_CONVS

CUDA_BUILT = rf.build_info()["cuda_compiled"]
REQUIRE_CUDA_BUILD = os.environ.get("RESNET_FUSED_REQUIRE_CUDA_BUILD") == "1"
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILT, reason="CUDA extension not built or not loaded")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in rf.available_backends(),
    reason="no CUDA device (or the CUDA library is not loaded): runs in a GPU session",
)
ops = torch.ops.resnet_fused
BLOCK_K = 32  # conv_geometry.h: kBlockK

# ------------------------------------------------------------------------------------------------------
# Address math on the CPU

# (N, C, H, W), (K, R, S), stride, padding, dilation: ResNet's kinds of conv plus odd ones; C a multiple of 8,
# as the tensor-core kernels require.
GEOMETRIES = [
    ((2, 16, 9, 9), (8, 3, 3), 1, 1, 1),
    ((1, 64, 8, 8), (16, 1, 1), 1, 0, 1),
    ((2, 32, 9, 11), (24, 1, 1), 2, 0, 1),
    ((1, 8, 17, 17), (8, 3, 3), 2, 1, 1),
    ((1, 8, 20, 20), (8, 7, 7), 2, 3, 1),      # a stem-like 7x7 stride 2: mostly padding at the borders
    ((1, 40, 12, 12), (8, 3, 3), 1, 2, 2),     # dilation; C = 40: a partial second k-tile
    ((3, 24, 5, 7), (16, 3, 1), (2, 1), (1, 0), (1, 1)),  # non-square kernel, stride and padding
    ((1, 8, 4, 4), (8, 5, 5), 1, 2, 1),        # kernel wider than the input: mostly padding
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def expected_gather(x_shape, w_shape, stride, padding, dilation):
    """What the kernels must read, from unfold: A[m, tap, c] = NHWC offset of x (or -1), B[k, tap, c]."""
    n, c, h, w = x_shape
    k, r, s = w_shape
    nhwc_offset = torch.arange(n * h * w * c, dtype=torch.float64).reshape(n, h, w, c).permute(0, 3, 1, 2)
    cols = F.unfold(nhwc_offset + 1, (r, s), dilation=dilation, padding=padding, stride=stride)  # 0 = padding
    cols = cols.reshape(n, c, r * s, -1).permute(0, 3, 2, 1).reshape(-1, r * s, c)  # [M, tap, c]
    a = cols.long() - 1
    b = torch.arange(k * r * s * c).reshape(k, r * s, c)
    return a, b


@needs_cuda_build
@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation", GEOMETRIES, ids=str)
def test_operand_gather_matches_unfold(x_shape, w_shape, stride, padding, dilation):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    k, r, s = w_shape
    c = x_shape[1]
    a, b, pq = ops._cuda_conv_gather(list(x_shape), [k, c, r, s], list(stride), list(padding), list(dilation))
    want_a, want_b = expected_gather(x_shape, w_shape, stride, padding, dilation)
    per_tap = -(-c // BLOCK_K) * BLOCK_K
    assert a.shape == (want_a.shape[0], r * s * per_tap) and b.shape == (k, r * s * per_tap)
    p, q = F.conv2d(torch.zeros(1, c, *x_shape[2:]), torch.zeros(k, c, r, s), None, stride, padding, dilation).shape[2:]
    assert pq.tolist() == [p, q]
    a, b = a.reshape(-1, r * s, per_tap), b.reshape(k, r * s, per_tap)
    torch.testing.assert_close(a[:, :, :c], want_a, rtol=0, atol=0)
    torch.testing.assert_close(b[:, :, :c], want_b, rtol=0, atol=0)
    assert (a[:, :, c:] == -1).all() and (b[:, :, c:] == -1).all(), "channels past C must be masked"


@needs_cuda_build
def test_channels_not_a_multiple_of_8_would_be_read_wrongly():
    """Why the dispatcher sends C % 8 != 0 (the 3-channel stem) to the direct kernel: a 16-byte chunk
    starting at a valid channel runs into the next pixel's channels."""
    a, _, _ = ops._cuda_conv_gather([1, 3, 6, 6], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1])
    want, _ = expected_gather((1, 3, 6, 6), (4, 3, 3), (1, 1), (1, 1), (1, 1))
    a = a.reshape(-1, 9, BLOCK_K)
    torch.testing.assert_close(a[:, :, :3], want, rtol=0, atol=0)  # channels 0-2 right ...
    assert (a[:, :, 3:8] >= 0).any(), "... but lanes 3-7 of the chunk read real elements instead of zeros"


@needs_cuda_build
@pytest.mark.parametrize("tiles_m,tiles_n,group_m", [(1, 1, 8), (3, 2, 2), (17, 5, 8), (8, 3, 8), (100, 1, 8),
                                                      (9, 16, 8)])
def test_block_order_covers_every_tile_once(tiles_m, tiles_n, group_m):
    order = ops._cuda_conv_tile_order(tiles_m, tiles_n, group_m)
    assert sorted(map(tuple, order.tolist())) == list(itertools.product(range(tiles_m), range(tiles_n)))
    # Grouped: the first group_m * tiles_n blocks stay within the first group_m tile rows.
    first = order[: group_m * tiles_n]
    assert first[:, 0].max() < min(group_m, tiles_m)


@needs_cuda_build
@pytest.mark.parametrize("large", [True, False], ids=["128x128", "64x64"])
def test_block_tile_through_smem_and_mma_fragments(large):
    """One k-tile through the kernel's cp.async, swizzle, ldmatrix and epilogue mappings, with the PTX
    semantics of ldmatrix and mma.m16n8k16 simulated: every element lands once, no ldmatrix phase has a bank
    conflict, and the block computes a @ b.T exactly."""
    block = 128 if large else 64
    a = torch.randint(-4, 5, (block, BLOCK_K)).float()
    b = torch.randint(-4, 5, (block, BLOCK_K)).float()
    c, conflicts, writes = ops._cuda_conv_warp_sim(a, b, large)
    assert (writes == 1).all(), "each shared-memory element must be written by exactly one copy"
    assert conflicts == 0
    torch.testing.assert_close(c, a @ b.T, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# What the library holds (CPU-runnable)

MMA_KERNEL = "conv_mma_kernel"
CUTLASS_CONV = "cutlass13device_kernelINS_4conv6kernel13ConvUniversal"


def _sm90_built():
    if not rf.build_info()["cutlass_sm90_compiled"]:
        assert not REQUIRE_CUDA_BUILD, "CI must build the CUTLASS Hopper kernels"
        pytest.skip("the CUTLASS Hopper kernels were not built (see build_info()['load_errors'] and setup.py)")


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_mma_kernels_use_tensor_cores_and_async_copies(arch):
    functions = sass_functions(arch)
    mma = {name: sass for name, sass in functions.items() if MMA_KERNEL in name}
    assert len(mma) == 4, list(mma)  # float16 and bfloat16, two tile shapes
    for name, sass in mma.items():
        bf16 = "bfloat16" in name
        assert ("HMMA.16816.F32.BF16" in sass) == bf16 and "HMMA.16816.F32" in sass, name
        assert "LDGSTS.E.BYPASS.128.ZFILL" in sass, f"{name}: no 16-byte zero-filling cp.async"
        assert "LDSM.16.M88.4" in sass, f"{name}: no ldmatrix.x4"


@needs_cuda_build
def test_hopper_kernels_use_wgmma_and_tma_im2col():
    _sm90_built()
    cutlass = {name: sass for name, sass in sass_functions("sm_90a").items() if CUTLASS_CONV in name}
    assert len(cutlass) == 6, list(cutlass)  # float16 and bfloat16, tile N 64, 128, 256
    for name, sass in cutlass.items():
        assert "HGMMA.64x" in sass, f"{name}: no wgmma"
        assert "UTMALDG.4D.IM2COL" in sass, f"{name}: no TMA im2col loads"
    widths = {int(n) for sass in cutlass.values() for n in re.findall(r"HGMMA\.64x(\d+)x16", sass)}
    assert widths == {64, 128, 256}


@needs_cuda_build
def test_conv_kernels_do_not_spill():
    checked = 0
    for (arch, name), res in resource_usage().items():
        hopper = CUTLASS_CONV in name and arch == "sm_90a"  # on sm_80 CUTLASS compiles the body out
        if MMA_KERNEL in name or hopper:
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {name}: {res}"
            checked += 1
    assert checked >= 8


@needs_cuda_build
def test_conv_has_a_cuda_kernel_but_is_not_the_default_yet():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv_bn_act", "CUDA")
    assert rf.backends.has_kernel("conv_bn_act", "cuda")
    # Not default until a committed GPU record shows parity (backends.GPU_VERIFIED, bench/results/).
    if "conv_bn_act" not in rf.backends.GPU_VERIFIED["cuda"]:
        assert rf.backends._default_backend("conv_bn_act", torch.device("cuda"), torch.bfloat16) != "cuda"


# ------------------------------------------------------------------------------------------------------
# GPU

RESNET_CONVS = RESNET50_CONVS + RESNET18_CONVS
TENSOR_CORE_DTYPES = [torch.bfloat16, torch.float16]


def _kernels_for(dtype, c_in=64, c_out=64):
    """The kernels that can take a call here: always direct; the tensor-core ones for 16-bit dtypes."""
    names = ["direct"]
    if dtype in TENSOR_CORE_DTYPES and c_in % 8 == 0 and c_out % 8 == 0:
        names.append("mma_sm80")
        if torch.cuda.get_device_capability() == (9, 0) and rf.build_info()["cutlass_sm90_compiled"]:
            names.append("cutlass_sm90")
    return names


def _inputs(n, c_in, size, c_out, kernel, dtype, bias=True, residual=True, stride=1, padding=None,
            memory_format=torch.channels_last):
    padding = kernel // 2 if padding is None else padding
    make = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64)  # noqa: E731
    x = make(n, c_in, *_pair(size)).to(dtype).contiguous(memory_format=memory_format)
    w = (make(c_out, c_in, kernel, kernel) * (c_in * kernel * kernel) ** -0.5).to(dtype)
    w = w.contiguous(memory_format=memory_format)
    b = make(c_out).to(dtype) if bias else None
    out_hw = [(d + 2 * padding - kernel) // stride + 1 for d in _pair(size)]
    r = make(n, c_out, *out_hw).to(dtype).contiguous(memory_format=memory_format) if residual else None
    return x, w, b, r, stride, padding


def _poison_allocator(numel, dtype):
    """Fill a block the caching allocator will hand out next with NaN, so an output element the kernel
    forgets to write shows up as NaN."""
    torch.empty(numel, device="cuda", dtype=dtype).fill_(float("nan"))
    torch.cuda.synchronize()


def _run_and_check(kernel, x, w, b, r, stride, padding, relu):
    n, k = x.shape[0], w.shape[0]
    expected_shape = F.conv2d(x[:1].float(), w.float(), None, stride, padding).shape[1:]
    _poison_allocator(n * expected_shape.numel(), x.dtype)
    args = (x, w, b, r, [stride] * 2, [padding] * 2, [1, 1], 1, relu)
    if kernel == "auto":
        y = ops.conv_bn_act(*args)
    else:
        y = ops._cuda_conv_bn_act_with(*args, kernel)
    torch.cuda.synchronize()
    same_dtype = reference.conv_bn_act(x, w, b, r, stride, padding, 1, 1, relu)
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = reference.conv_bn_act(to64(x), to64(w), to64(b), to64(r), stride, padding, 1, 1, relu)
    assert not y.isnan().any(), f"{kernel}: NaN in the output (an element left unwritten?)"
    assert_parity(y, same_dtype, oracle, what=f"{kernel} output")
    return y


@needs_gpu
@pytest.mark.parametrize("dtype", [*TENSOR_CORE_DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize("conv", RESNET_CONVS, ids=lambda c: c.name)
def test_gpu_resnet_shapes_every_kernel(conv, dtype):
    x, w, b, r, stride, padding = _inputs(2, conv.c_in, conv.size, conv.c_out, conv.kernel, dtype,
                                          residual=conv.epilogue == "add_relu", stride=conv.stride)
    for kernel in ["auto", *_kernels_for(dtype, conv.c_in, conv.c_out)]:
        _run_and_check(kernel, x, w, b, r, stride, padding, relu=conv.epilogue != "none")


@needs_gpu
@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES, ids=str)
@pytest.mark.parametrize("bias,residual,relu", list(itertools.product([False, True], repeat=3)))
def test_gpu_epilogue_variants(bias, residual, relu, dtype):
    x, w, b, r, stride, padding = _inputs(3, 64, 14, 256, 1, dtype, bias=bias, residual=residual)
    for kernel in _kernels_for(dtype):
        _run_and_check(kernel, x, w, b, r, stride, padding, relu)


@needs_gpu
@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES, ids=str)
@pytest.mark.parametrize("n,c_in,size,c_out,kernel,stride", [
    (1, 8, 17, 8, 3, 1),       # smallest tensor-core channels, M = 289 (tails in M)
    (3, 24, (9, 13), 72, 3, 2),  # C not a multiple of the k-tile, K not a multiple of any tile N
    (1, 40, 5, 136, 1, 1),     # M smaller than one tile
    (5, 64, 7, 2056, 1, 1),    # K past 2048 and not a multiple of 256
])
def test_gpu_tensor_core_tails(n, c_in, size, c_out, kernel, stride, dtype):
    x, w, b, r, stride, padding = _inputs(n, c_in, size, c_out, kernel, dtype, stride=stride)
    for name in _kernels_for(dtype, c_in, c_out):
        _run_and_check(name, x, w, b, r, stride, padding, relu=True)


@needs_gpu
def test_gpu_representative_subset_for_sanitizer():
    """A few shapes on every kernel, small enough for compute-sanitizer (bench/gpu_check.sh runs this test
    under memcheck and racecheck)."""
    for dtype in TENSOR_CORE_DTYPES:
        for n, c_in, size, c_out, kernel, stride in [(2, 64, 9, 64, 3, 1), (1, 128, 10, 256, 1, 2),
                                                     (1, 16, 7, 24, 3, 2)]:
            x, w, b, r, stride, padding = _inputs(n, c_in, size, c_out, kernel, dtype, stride=stride)
            for name in _kernels_for(dtype, c_in, c_out):
                _run_and_check(name, x, w, b, r, stride, padding, relu=True)
    x, w, b, r, stride, padding = _inputs(1, 3, 12, 8, 7, torch.float32, stride=2)  # the stem, direct
    _run_and_check("auto", x, w, b, r, stride, padding, relu=True)


@needs_gpu
def test_gpu_kernel_choice():
    x, w, b, r, stride, padding = _inputs(2, 64, 14, 128, 3, torch.bfloat16)
    args = (x, w, b, r, [1, 1], [1, 1], [1, 1], 1)
    tensor_core = "cutlass_sm90" if "cutlass_sm90" in _kernels_for(torch.bfloat16) else "mma_sm80"
    assert ops._cuda_conv_kernel(*args) == tensor_core
    assert ops._cuda_conv_kernel(x.float(), w.float(), b.float(), r.float(), *args[4:]) == "direct"
    stem = _inputs(1, 3, 16, 64, 7, torch.bfloat16, stride=2)
    assert ops._cuda_conv_kernel(*stem[:4], [2, 2], [3, 3], [1, 1], 1) == "direct"  # C = 3


@needs_gpu
@pytest.mark.parametrize("kernel,change,message", [
    ("mma_sm80", "float32", "float16 and bfloat16 only"),
    ("mma_sm80", "groups", "groups=1 only"),
    ("mma_sm80", "channels", "multiples of 8"),
    ("mma_sm80", "misaligned", "16-byte aligned"),
    ("tensor_cores", "float32", "unknown CUDA conv kernel"),
])
def test_gpu_forced_kernel_refusals_name_the_reason(kernel, change, message):
    x, w, b, r, stride, padding = _inputs(1, 16, 8, 16, 3, torch.bfloat16)
    groups = 1
    if change == "float32":
        x, w, b, r = (t.float() for t in (x, w, b, r))
    elif change == "groups":
        w, groups = w[:, :8].contiguous(memory_format=torch.channels_last), 2
    elif change == "channels":
        x, w = x[:, :12].contiguous(memory_format=torch.channels_last), w[:, :12].contiguous(memory_format=torch.channels_last)
    elif change == "misaligned":
        storage = torch.empty(r.numel() + 1, device="cuda", dtype=r.dtype)
        r = storage[1:].view(r.shape[0], r.shape[2], r.shape[3], r.shape[1]).permute(0, 3, 1, 2).copy_(r)
    with pytest.raises(RuntimeError, match=message):
        ops._cuda_conv_bn_act_with(x, w, b, r, [1, 1], [1, 1], [1, 1], groups, True, kernel)


@needs_gpu
def test_gpu_misaligned_residual_falls_back_correctly():
    x, w, b, r, stride, padding = _inputs(2, 64, 9, 64, 3, torch.bfloat16)
    storage = torch.empty(r.numel() + 1, device="cuda", dtype=r.dtype)
    shifted = storage[1:].view(r.shape[0], r.shape[2], r.shape[3], r.shape[1]).permute(0, 3, 1, 2).copy_(r)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 != 0
    assert ops._cuda_conv_kernel(x, w, b, shifted, [1, 1], [1, 1], [1, 1], 1) == "direct"
    _run_and_check("auto", x, w, b, shifted, stride, padding, relu=True)


@needs_gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gpu_output_follows_input_format(memory_format):
    x, w, b, r, stride, padding = _inputs(2, 32, 8, 32, 3, torch.float16, memory_format=memory_format)
    y = _run_and_check("auto", x, w, b, r, stride, padding, relu=True)
    assert y.is_contiguous(memory_format=memory_format)


@needs_gpu
def test_gpu_cuda_graph_capture_and_replay():
    """No host synchronization in the launch path: the op captures into a CUDA graph and replays."""
    x, w, b, r, stride, padding = _inputs(2, 64, 14, 64, 3, torch.bfloat16)
    call = lambda: rf.conv_bn_act(x, w, b, r, stride=stride, padding=padding, backend="cuda")  # noqa: E731
    expected = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    fresh = call()
    torch.testing.assert_close(captured, fresh, rtol=0, atol=0)
    assert not torch.equal(captured, expected)
