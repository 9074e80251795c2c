"""The plain-vs-residual experiment (resnet_fused.experiments.plain_vs_residual): a tiny --quick run
writes the JSON and PNGs and the losses go down; plain nets have no shortcut; a fixed seed gives the
same numbers twice on CPU; the synthetic data and the data loaders."""
import json
import math

import pytest
import torch

import resnet_fused as rf
from resnet_fused.experiments import data, plain_vs_residual as pvr, synthetic

# --quick with a tiny setting: 16x16 images, 2 batches of 16 per epoch, 4 epochs, all four nets.
TINY = ["--quick", "--image-size", "16", "--train-size", "32", "--heldout-size", "32", "--batch-size", "16",
        "--epochs", "4", "--lr", "0.01", "--warmup-epochs", "0", "--eval-batch-size", "32", "--device", "cpu",
        "--threads", "1", "--no-progress"]


def _run(out):
    assert pvr.main(TINY + ["--out", str(out)]) == 0
    with open(out / "results.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvr")
    return out, _run(out)


def test_quick_run_writes_json_and_pngs(tiny_run):
    out, results = tiny_run
    for name in ("loss_curves.png", "grad_norms.png", "samples.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 10_000, name
    assert "| plain-34 " in (out / "summary.md").read_text()
    assert list(results["nets"]) == ["plain18", "plain34", "resnet18", "resnet34"]
    if "cpu" in rf.available_backends():  # the models' default on CPU tensors: the fused C++ ops
        assert results["environment"]["backends"] == {op: "cpu" for op in rf.backends.OPS}
    assert results["environment"]["command"].endswith(" ".join(TINY + ["--out", str(out)]))
    for r in results["nets"].values():
        assert r["diverged_at_step"] is None
        assert len(r["epochs"]) == 4 and len(r["step_loss"]) == 4 * 2
        convs = r["depth"] - 1  # stem + the blocks' convs; then fc
        g = r["grad_norms"]
        assert len(g["weight_grad_norm"]) == len(g["layers"]) == r["depth"] and g["layers"][-1] == "fc"
        assert g["layers"][0] == "conv1" and len([n for n in g["layers"] if "conv" in n]) == convs
        assert all(math.isfinite(v) and v > 0 for v in g["weight_grad_norm"] + g["block_output_grad_norm"])
        assert len(g["block_output_grad_norm"]) == 1 + (8 if r["depth"] == 18 else 16)


def test_quick_run_losses_decrease(tiny_run):
    _, results = tiny_run
    for key, r in results["nets"].items():
        epochs = r["epochs"]
        assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], (key, [e["train_loss"] for e in epochs])
        assert epochs[-1]["train_loss"] < r["step_loss"][0], key


def test_same_seed_same_numbers_on_cpu(tiny_run, tmp_path):
    _, first = tiny_run
    second = _run(tmp_path)

    def numbers(results):  # everything but the clock and the environment
        def strip(v):
            if isinstance(v, dict):
                return {k: strip(x) for k, x in v.items() if "time" not in k}
            if isinstance(v, list):
                return [strip(x) for x in v]
            return v
        return strip({k: v for k, v in results.items() if k != "environment"})

    assert numbers(first) == numbers(second)


@pytest.mark.parametrize("depth", [18, 34])
def test_plain_nets_have_no_shortcut(depth):
    plain = pvr.build_model(f"plain{depth}", 10, seed=0, device=torch.device("cpu"))
    residual = pvr.build_model(f"resnet{depth}", 10, seed=0, device=torch.device("cpu"))
    assert not any("downsample" in name for name, _ in plain.named_modules())
    assert not any("downsample" in name for name, _ in plain.named_parameters())
    blocks = [m for m in plain.modules() if isinstance(m, rf.nn.BasicBlock)]
    assert len(blocks) == (depth - 2) // 2 and all(b.plain and b.downsample is None for b in blocks)
    assert pvr.shortcut_inventory(plain) == {"blocks": len(blocks), "blocks_with_shortcut": 0,
                                             "downsample_modules": 0, "shortcut_params": 0, "downsample_names": []}
    inventory = pvr.shortcut_inventory(residual)
    assert inventory["blocks_with_shortcut"] == len(blocks) and inventory["downsample_modules"] == 3
    assert inventory["shortcut_params"] > 0
    # Functionally: with the last block's last conv zeroed, nothing of the input reaches the output of a
    # plain net (no path around the convs); the residual net's output still depends on the input.
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for model, depends in ((plain, False), (residual, True)):
        model.eval()
        with torch.no_grad():
            model.layer4[-1].conv2.weight.zero_()
            y = model(x)
        assert torch.allclose(y, y[:1].expand_as(y), atol=1e-6) != depends


def test_synthetic_data_deterministic_and_balanced():
    x, y = synthetic.make_dataset(60, 16, seed=3)
    x2, y2 = synthetic.make_dataset(60, 16, seed=3)
    assert x.dtype == torch.uint8 and x.shape == (60, 3, 16, 16) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y, minlength=10).tolist() == [6] * 10
    x3, _ = synthetic.make_dataset(60, 16, seed=4)
    assert not torch.equal(x, x3)
    # chunked generation is one stream: the first images do not depend on the chunk size
    xc, yc = synthetic.make_dataset(60, 16, seed=3, chunk=7)
    assert xc.shape == x.shape and torch.equal(yc, y)


def test_lr_schedule():
    assert pvr.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert pvr.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert pvr.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert pvr.lr_at(0, 100, 0, 1.0) == pytest.approx(1.0)


def test_image_folder_and_missing_cifar(tmp_path):
    from PIL import Image

    for c, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB" if i % 2 else "L", (20 + i, 24), colour[0] if i % 2 == 0 else colour).save(
                tmp_path / "imgs" / c / f"{i}.png")
    cfg = pvr.Config(data=str(tmp_path / "imgs"), train_size=None, heldout_size=None, image_size=16)
    ds = pvr.load_dataset(cfg)
    assert ds.classes == ["cats", "dogs"] and ds.train_x.shape[1:] == (3, 16, 16)
    assert ds.train_y.numel() + ds.heldout_y.numel() == 10 and ds.heldout_y.numel() == 2
    again = pvr.load_dataset(cfg)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.heldout_y, again.heldout_y)

    # train/ + val/: the held-out split is val/
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "split" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "split" / split / c / f"{i}.png")
    ds = pvr.load_dataset(pvr.Config(data=str(tmp_path / "split"), train_size=None, heldout_size=None, image_size=8))
    assert ds.train_y.numel() == 8 and ds.heldout_y.numel() == 4 and ds.heldout_x.shape == (4, 3, 8, 8)

    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    assert data.is_cifar10(str(tmp_path / "cifar"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        pvr.load_dataset(pvr.Config(data=str(tmp_path / "cifar")))
