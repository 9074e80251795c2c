"""rf.fuse: converting torchvision and timm ResNets (and models that contain their blocks) keeps the
outputs, gradients, running statistics, state_dict keys, train/eval state, dtype, device and memory
format; unknown modules are left alone."""
import copy
import subprocess
import sys

import pytest
import torch
import torchvision
from test_nn import BLOCK_BACKENDS, assert_same_step, randomize_bn, set_mode
from torch import nn

import resnet_fused as rf

timm = pytest.importorskip("timm")

TV = torchvision.models.resnet
TIMM = timm.models.resnet


def fused_blocks(model):
    return [m for m in model.modules() if isinstance(m, (rf.nn.BasicBlock, rf.nn.Bottleneck))]


def library_blocks(model):
    return [m for m in model.modules() if type(m) in (TV.BasicBlock, TV.Bottleneck, TIMM.BasicBlock, TIMM.Bottleneck)]


def small_bottleneck_resnet(**kwargs):
    """torchvision's ResNet with one Bottleneck per stage: every kind of conversion at a third of ResNet-50."""
    return torchvision.models.ResNet(TV.Bottleneck, [1, 1, 1, 1], **kwargs)


# ResNet-18 on every backend, a Bottleneck ResNet on the default one (test_models.py checks the fused
# ResNet-50 itself on every backend).
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch,backend", [("resnet18", b) for b in BLOCK_BACKENDS] + [("bottleneck", None)])
def test_fuse_torchvision(arch, backend, mode):
    make = small_bottleneck_resnet if arch == "bottleneck" else torchvision.models.resnet18
    original = set_mode(randomize_bn(make(num_classes=10)).double(), mode)
    reference = copy.deepcopy(original)
    fused = rf.fuse(original, backend=backend)
    assert isinstance(fused, rf.models.ResNet) and isinstance(fused, torchvision.models.ResNet)
    assert not library_blocks(fused)
    assert all(m.backend == backend for m in fused.modules() if isinstance(m, rf.nn.FusedModule))
    assert type(original) is torchvision.models.ResNet and not fused_blocks(original)  # inplace=False: a copy
    assert fused.training == (mode == "train") and all(m.training == fused.training for m in fused.modules())
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=2 if mode == "train" else 1)


def test_fuse_low_memory():
    """low_memory reaches every Bottleneck, new or already fused; None leaves the ones already fused alone."""
    original = set_mode(randomize_bn(small_bottleneck_resnet(num_classes=10)).double(), "train")
    reference = copy.deepcopy(original)
    fused = rf.fuse(original, low_memory=True)
    assert all(block.low_memory for block in fused_blocks(fused))
    assert all(block.low_memory for block in fused_blocks(rf.fuse(fused)))
    assert not any(block.low_memory for block in fused_blocks(rf.fuse(fused, low_memory=False)))
    assert_same_step(fused, reference, torch.randn(2, 3, 48, 48, dtype=torch.float64), steps=2)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["resnet18", "resnet26", "resnet26d"])
def test_fuse_timm(name, mode):
    # resnet26: Bottleneck blocks; resnet26d: a deep stem and average-pool shortcuts
    # (Sequential(AvgPool2d, Conv2d, BatchNorm2d)).
    original = set_mode(randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).double(), mode)
    reference = copy.deepcopy(original)
    fused = rf.fuse(original)
    # timm's model class (its pooling, head, methods) stays: the graph pass fuses its stem in a subclass
    assert type(fused).__bases__ == (type(original),)
    assert not library_blocks(fused) and fused_blocks(fused)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=2 if mode == "train" else 1)


def test_fuse_converts_known_blocks_and_graph_fuses_the_rest():
    class MyBlock(TV.BasicBlock):  # a subclass may change forward: not converted by class, fused by graph
        pass

    frozen = TV.BasicBlock(4, 4, norm_layer=torchvision.ops.FrozenBatchNorm2d)  # not a BatchNorm2d
    se = timm.create_model("seresnet18", pretrained=False).layer1[0]  # squeeze-excitation: not a plain block
    swish = TIMM.BasicBlock(4, 4, act_layer=nn.SiLU)
    ordinary = TV.BasicBlock(4, 4)
    model = nn.Sequential(MyBlock(4, 4), frozen, nn.Conv2d(4, 64, 1), se, nn.Conv2d(64, 4, 1), swish, ordinary)
    fused, report = rf.fuse(model, report=True)
    assert [type(m).__bases__ for m in fused[0:6:3]] == [(MyBlock,), (TIMM.BasicBlock,)]
    assert type(fused[5]).__bases__ == (TIMM.BasicBlock,)
    # FrozenBatchNorm2d is no BatchNorm layer: only the block's final add + ReLU is fused
    assert [type(m) for m in fused[1].children()][-1] is rf.graph_fuse.GraphFusedAddReLU
    assert type(fused[6]) is rf.nn.BasicBlock
    assert not any(path.startswith("1.") for path in report.fused("eval"))  # FrozenBatchNorm2d: not a BN
    x = torch.randn(2, 4, 8, 8)
    model.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_keeps_dtype_device_memory_format_and_state():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).to(torch.float64)
    model = model.to(memory_format=torch.channels_last).eval()
    model.layer2.train()  # a mixed state is kept module by module
    strides = {name: p.stride() for name, p in model.named_parameters()}
    fused = rf.fuse(model)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in fused.parameters())
    assert {name: p.stride() for name, p in fused.named_parameters()} == strides
    modes = lambda m: {name: sub.training for name, sub in m.named_modules()}  # noqa: E731
    assert modes(fused) == modes(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    features = {}
    fused.layer1.register_forward_hook(lambda m, i, o: features.setdefault("layer1", o))
    model.layer2.eval(), fused.layer2.eval()  # compare in eval: no running-stat updates in between
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)
    assert features["layer1"].is_contiguous(memory_format=torch.channels_last)


def test_fuse_inplace_and_nested_models():
    backbone = torchvision.models.resnet18(num_classes=10)
    # a model that holds torchvision blocks without being a ResNet, e.g. a detection backbone
    model = nn.ModuleDict({"features": nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.layer1,
                                                     backbone.layer2), "head": nn.Linear(4, 4)})
    returned = rf.fuse(model, inplace=True, backend="reference")
    assert returned is model
    assert all(type(b) is rf.nn.BasicBlock and b.backend == "reference" for b in model["features"][3])
    assert type(model["features"][1]) is nn.BatchNorm2d  # a loose stem conv + BN is not a known block
    # a root that is itself a known block is replaced: the returned object is the fused one
    block = TV.Bottleneck(8, 2)
    assert type(rf.fuse(block, inplace=True)) is rf.nn.Bottleneck
    # an already fused model: backends are updated, nothing else changes
    fused = rf.models.resnet18(backend="cpu" if "cpu" in BLOCK_BACKENDS else None)
    refused = rf.fuse(fused, backend="reference")
    assert all(m.backend == "reference" for m in refused.modules() if isinstance(m, rf.nn.FusedModule))


def test_fuse_keeps_hooks_and_attributes():
    block = TV.BasicBlock(4, 4)
    calls = []
    block.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    block.note = "kept"
    fused = rf.fuse(block)
    fused(torch.randn(1, 4, 5, 5))
    assert calls == [rf.nn.BasicBlock] and fused.note == "kept"


def test_fuse_sync_batchnorm_model():
    # A model already converted to SyncBatchNorm: its blocks are fused with the group of their BN layers
    # (none here, torch.distributed not being initialized, so no synchronization), and eval matches.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(torchvision.models.resnet18(num_classes=10)))
    model = model.double().eval()
    fused = rf.fuse(model)
    assert isinstance(fused, rf.models.ResNet) and type(fused.layer1[0].bn1) is nn.SyncBatchNorm
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


def test_fuse_bad_argument():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        rf.fuse(torch.randn(3))


def test_fused_torchvision_resnet_is_both_classes_and_pickles(tmp_path):
    """rf.fuse of torchvision's ResNet is a subclass of rf.models.ResNet and of torchvision's ResNet, made at run
    time: torch.save / torch.load, here and in a fresh interpreter that has not made the class yet, and
    copy.deepcopy give the same class and the same outputs."""
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).double().eval()
    fused = rf.fuse(model)
    assert isinstance(fused, torchvision.models.ResNet) and isinstance(fused, rf.models.ResNet)
    assert type(fused).forward is rf.models.ResNet.forward
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    path = tmp_path / "fused.pt"
    torch.save(fused, path)
    loaded, copied = torch.load(path, weights_only=False), copy.deepcopy(fused)
    with torch.no_grad():
        want = fused(x)
        for other in (loaded, copied):
            assert type(other) is type(fused)
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    torch.save(x, tmp_path / "x.pt")
    script = (f"import torch, torchvision, resnet_fused\n"
              f"m = torch.load({str(path)!r}, weights_only=False)\n"
              f"assert isinstance(m, torchvision.models.ResNet) and isinstance(m, resnet_fused.models.ResNet)\n"
              f"with torch.no_grad():\n"
              f"    torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)
