"""Blocks and ResNets training on conv_stats (resnet_fused/nn/fused.py `_conv_stats_block`) against torchvision:
outputs, every gradient, running statistics and num_batches_tracked. In float64 on the reference and cpu
backends (their conv_stats is exact up to rounding, so the path itself is checked to 1e-9; they are put in
CONV_STATS_BACKENDS for the test), and in float32 on the triton backend (the interpreter without a GPU),
bounded by PyTorch's own float32 error against float64. And bench/traffic.py's model of the bytes moved."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from samples import assert_parity, backends_for
from test_models import small_resnet, torchvision_reference
from test_nn import BLOCKS, assert_same_step, make_block_pair, randomize_bn, run_step

import resnet_fused as rf
from resnet_fused.nn import fused as fused_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives beside the package
from bench import traffic  # noqa: E402


@pytest.fixture
def conv_stats_calls(monkeypatch):
    """Counts the blocks' conv_stats calls, so a test knows the path ran."""
    calls = []
    original = fused_module.conv_stats

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_module, "conv_stats", counting)
    return calls


def _enable(monkeypatch, backend):
    if backend not in backends_for("conv_stats", "cpu"):
        pytest.skip(f"backend {backend!r} cannot run conv_stats on CPU tensors here")
    monkeypatch.setattr(fused_module, "CONV_STATS_BACKENDS", (backend,))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("plain", [False, True], ids=["residual", "plain"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_float64(kind, backend, plain, momentum, monkeypatch, conv_stats_calls):
    _enable(monkeypatch, backend)
    fused, reference = make_block_pair(kind, plain, backend)
    for m in (*fused.modules(), *reference.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    x = torch.randn(2, BLOCKS[kind][2]["inplanes"], 7, 7, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=2)
    # every conv, the downsample's included, twice
    assert len(conv_stats_calls) == 2 * (BLOCKS[kind][1]._depth + (0 if plain else 1))


def test_identity_shortcut_and_channels_last(monkeypatch, conv_stats_calls):
    _enable(monkeypatch, "cpu")
    import torchvision
    fused = randomize_bn(rf.nn.Bottleneck(16, 4, backend="cpu")).double()
    reference = torchvision.models.resnet.Bottleneck(16, 4).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert copy.deepcopy(fused)(x).is_contiguous(memory_format=torch.channels_last)
    assert_same_step(fused, reference, x, steps=1)
    assert len(conv_stats_calls) == 3 + 3  # the copy, then the step


def test_eval_and_reference_default_keep_todays_path(conv_stats_calls):
    fused, _ = make_block_pair("bottleneck", False, "cpu")
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fused(x)  # training on cpu: conv + bn_act (CONV_STATS_BACKENDS)
    fused.eval()
    fused(x)
    assert conv_stats_calls == []


def _float32_step_parity(fused, reference32, x):
    reference64 = copy.deepcopy(reference32).double()
    out, grads, buffers = run_step(fused, x)
    out32, grads32, buffers32 = run_step(reference32, x)
    out64, grads64, buffers64 = run_step(reference64, x.double())
    assert_parity(out, out32, out64, what="output")
    for name in grads64:
        assert_parity(grads[name], grads32[name], grads64[name], what=f"grad of {name}")
    for name in buffers64:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers[name], buffers64[name]), name
        else:
            assert_parity(buffers[name], buffers32[name], buffers64[name], what=name)


@pytest.mark.parametrize("kind", BLOCKS)
def test_triton_block_float32(kind, conv_stats_calls):
    if "triton" not in backends_for("conv_stats", "cpu"):
        pytest.skip("the triton backend cannot run on CPU tensors here (no interpreter)")
    fused, reference = make_block_pair(kind, False, "triton", dtype=torch.float32)
    x = torch.randn(2, BLOCKS[kind][2]["inplanes"], 7, 7)
    _float32_step_parity(fused, reference, x)
    assert conv_stats_calls and set(conv_stats_calls) == {"triton"}


@pytest.mark.parametrize("block", [rf.nn.BasicBlock, rf.nn.Bottleneck], ids=["resnet18_layout", "resnet50_layout"])
def test_triton_resnet_float32(block, conv_stats_calls):
    """One block per stage (ResNet-18's and ResNet-50's widths): stem (BN + ReLU in the max pool's op), four
    blocks on conv_stats, head. 48x48 images: layer4 normalizes over 8 values per channel, not 2."""
    if "triton" not in backends_for("conv_stats", "cpu"):
        pytest.skip("the triton backend cannot run on CPU tensors here (no interpreter)")
    fused = randomize_bn(small_resnet(block, backend="triton"))
    _float32_step_parity(fused, torchvision_reference(fused), torch.randn(2, 3, 48, 48))
    assert len(conv_stats_calls) == 4 * (block._depth + 1) - (1 if block is rf.nn.BasicBlock else 0)


@pytest.mark.parametrize("block", [rf.nn.BasicBlock, rf.nn.Bottleneck], ids=["resnet18_layout", "resnet50_layout"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_resnet_float64(block, backend, monkeypatch, conv_stats_calls):
    """One block per stage, two training steps: stem, blocks on conv_stats (downsample branches included), head."""
    _enable(monkeypatch, backend)
    fused = randomize_bn(small_resnet(block, backend=backend)).double()
    reference = torchvision_reference(fused)
    assert_same_step(fused, reference, torch.randn(2, 3, 32, 32, dtype=torch.float64), steps=2)
    assert len(conv_stats_calls) == 2 * 4 * (block._depth + 1) - (0 if block is rf.nn.Bottleneck else 2)


def test_traffic_model_and_saved_bytes():
    """bench/traffic.py: the conv_stats forward of a downsampling Bottleneck reads and writes exactly
    conv1 (x, y1), conv2 (y1, y2), conv3 (y2, y3), the downsample conv (x, yd) and the exit (y3, yd, out); both
    paths keep about the same for the backward (the conv outputs, the block input and output)."""
    shape = traffic.BottleneckShape("test", 64, 16, 2, 8, 1)
    e = {"x": 2 * 64 * 64, "y1": 2 * 16 * 64, "y2": 2 * 16 * 16, "y3": 2 * 64 * 16}
    moved = traffic.bytes_moved(shape, 2, 2)
    expected = (e["x"] + e["y1"]) + (e["y1"] + e["y2"]) + (e["y2"] + e["y3"]) + (e["x"] + e["y3"]) + 3 * e["y3"]
    assert moved["conv_stats"]["forward"] == 2 * expected
    assert moved["conv_stats"]["forward"] < moved["today"]["forward"]
    if "cpu" in rf.available_backends():
        saved = traffic.saved_for_backward(2, 6, torch.float32, "cpu")
        assert 3.0 < saved["conv_stats"] < 3.6 and 3.0 < saved["today"] < 3.6


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_block(backend, monkeypatch):
    """The conv_stats path under torch.compile(fullgraph=True): no graph break, the eager step's results."""
    _enable(monkeypatch, backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    fused, _ = make_block_pair("bottleneck", False, backend, dtype=dtype)
    compiled = torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    out, grads, buffers = run_step(compiled, x)
    expected_out, expected_grads, expected_buffers = run_step(fused, x)
    torch.testing.assert_close(out, expected_out)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=name)
    for name in expected_buffers:
        torch.testing.assert_close(buffers[name], expected_buffers[name], msg=name)


def test_untracked_statistics(monkeypatch, conv_stats_calls):
    """BN layers without running statistics (track_running_stats=False) normalize with the batch's."""
    import functools
    import torchvision
    _enable(monkeypatch, "cpu")
    norm = functools.partial(torch.nn.BatchNorm2d, track_running_stats=False)
    fused = rf.nn.BasicBlock(8, 8, norm_layer=norm, backend="cpu").double()
    reference = torchvision.models.resnet.BasicBlock(8, 8, norm_layer=norm).double()
    reference.load_state_dict(fused.state_dict())
    assert_same_step(fused, reference, torch.randn(2, 8, 5, 5, dtype=torch.float64), steps=1)
    assert len(conv_stats_calls) == 2
