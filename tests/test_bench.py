"""python -m bench --quick end to end on this machine, the files it writes, and that a wrong kernel is
never timed."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import resnet_fused as rf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives beside the package
from bench import __main__ as bench_main  # noqa: E402

QUICK = ["--quick", "--shapes", "l1.expand", "--min-run-time", "0.01", "--device", "cpu", "--image-size", "32",
         "--models", "resnet18", "--batch", "2"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = bench_main.main([*QUICK, "--out", str(out)])
    return status, out


def test_quick_run_writes_json_and_markdown(quick_run):
    status, out = quick_run
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    for key in ("device", "torch", "torch_cuda", "triton", "date", "git_commit", "resnet_fused_backends"):
        assert key in env
    ops = {row["op"] for row in results["rows"]}
    assert ops == {"conv_bn_act", "bn_act.forward", "bn_act.forward+backward", "overhead.conv_bn_act",
                   "overhead.bn_act", "model.inference", "model.latency", "model.train_step"}
    assert {row["batch"] for row in results["rows"] if row["op"] == "model.latency"} == {1}
    for row in results["rows"]:
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["low_ms"] <= row["median_ms"] <= row["high_ms"]
        assert row["throughput"] > 0 and row["throughput_unit"] in ("TFLOP/s", "GB/s", "img/s", "calls/s")
        # timed side by side with the others of its comparison: the ratio is the median of per-round ratios
        assert row["rounds"] >= 7 and (row["provider"] == "eager" or row["vs_eager"] > 0), row
    providers = {row["provider"] for row in results["rows"]}
    assert {"eager", "conv_alone", "fused:reference"} <= providers
    if "cpu" in rf.available_backends():
        assert "fused:cpu" in providers
    for entry in results["speedups"]:
        assert entry["vs_eager"] > 0
    assert {m["op"] for m in results["geometric_means"]} == ops
    memory = results["memory"]
    assert {row["provider"] for row in memory} >= {"eager", "fused:reference"}
    assert all(row["saved_bytes"] > 0 for row in memory)
    for op in ("conv_bn_act", "bn_act.forward", "bn_act.forward_backward", "model.inference", "model.latency",
               "model.train_step"):
        assert (out / f"{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert env["ceilings"]["copy_gbps"] > 0 and env["ceilings"]["matmul_tflops"] > 0
    markdown = (out / "results.md").read_text()
    assert "## conv_bn_act" in markdown and "## bn_act.forward" in markdown and "activation memory" in markdown


def test_wrong_kernel_is_not_timed(tmp_path, monkeypatch):
    real = rf.conv_bn_act

    def off_by_a_little(*args, backend=None, **kwargs):
        out = real(*args, backend=backend, **kwargs)
        return out * 1.01 if backend == "reference" else out

    monkeypatch.setattr(rf, "conv_bn_act", off_by_a_little)
    status = bench_main.main([*QUICK, "--ops", "conv", "--backends", "reference", "--out", str(tmp_path)])
    assert status == 1
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    wrong = [row for row in rows if row["provider"] == "fused:reference"]
    assert wrong and all(row["status"] == "wrong" and "median_ms" not in row for row in wrong)
    assert "wrong result, not timed" in (tmp_path / "results.md").read_text()


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
        bench_main.main(["--cuda-graphs", "--device", "cpu"])


def test_unknown_shape_is_refused():
    with pytest.raises(SystemExit, match="unknown shapes: nope"):
        bench_main.main(["--shapes", "nope", "--device", "cpu"])


def test_memory_fused_blocks_and_model_save_less_than_eager():
    from bench import memory

    if "cpu" not in rf.available_backends():
        pytest.skip("the cpu backend is not built")
    rows = memory.run(2, 8, torch.float32, torch.device("cpu"), ["reference", "cpu"], model_size=32)
    graph_model = ("resnetv2_50",) if importlib.util.find_spec("timm") else ()  # rf.fuse's graph pass
    for block in ("BasicBlock", "Bottleneck", "resnet50", *graph_model):
        saved = {row["provider"]: row["saved_bytes"] for row in rows if row["block"] == block}
        assert saved["fused:cpu"] < saved["eager"] == saved["fused:reference"], (block, saved)


def test_worst_shape_is_the_lowest_ratio_to_conv_alone():
    from bench.worst_shape import worst_shape

    rows = [{"op": "conv_bn_act", "status": "ok", "shape": shape, "provider": provider, "median_ms": ms}
            for shape, provider, ms in [("a", "conv_alone", 1.0), ("a", "fused:cuda", 1.1),
                                        ("b", "conv_alone", 1.0), ("b", "fused:cuda", 2.0),
                                        ("c", "conv_alone", 1.0), ("c", "fused:triton", 9.0)]]
    assert worst_shape(rows, "fused:cuda") == "b"
    assert worst_shape(rows, "fused:cpu") is None


def test_models_time_each_backend_and_low_memory_for_bottlenecks():
    """--backends gives one fused model per backend; a Bottleneck network on a fused backend is also trained
    with low_memory, checked against float64 first like every other row."""
    from bench import models

    if "cpu" not in rf.available_backends():
        pytest.skip("the cpu backend is not built")
    rows = list(models.run_model("resnet50", 2, 32, torch.float32, torch.device("cpu"), [], 0.01,
                                 backends=["reference", "cpu"]))
    assert all(row["status"] == "ok" for row in rows), rows
    train = [row["provider"] for row in rows if row["op"] == "model.train_step"]
    assert train == ["eager", "fused:reference", "fused:cpu", "fused:cpu+low_memory"]
    assert all("parity" in row for row in rows if row["provider"] != "eager")
