"""rf.models: the ResNets against torchvision's (state_dict keys, initialization, float64 train and eval
parity, plain networks against torchvision's layers without the skips), and the model-level features:
autocast, channels_last, torch.compile, torch.save/torch.load, torch.export, training, bad input."""
import copy

import pytest
import torch
import torchvision
from samples import assert_parity
from test_nn import BLOCK_BACKENDS, assert_same_step, make_plain, randomize_bn, set_mode
from torch import nn

import resnet_fused as rf

DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def torchvision_reference(model: rf.models.ResNet) -> nn.Module:
    """torchvision's ResNet with `model`'s layout and weights; for a plain model, torchvision's blocks
    without the skips."""
    tv = torchvision.models.resnet
    block = tv.Bottleneck if isinstance(model.layer1[0], rf.nn.Bottleneck) else tv.BasicBlock
    layers = [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)]
    # a stage whose stride was replaced by dilation starts with a stride-1 block
    dilation = [layer[0].stride == 1 for layer in (model.layer2, model.layer3, model.layer4)]
    reference = tv.ResNet(block, layers, num_classes=model.fc.out_features, groups=model.groups,
                          width_per_group=model.base_width, replace_stride_with_dilation=dilation)
    if model.plain:
        for m in reference.modules():
            if isinstance(m, (tv.BasicBlock, tv.Bottleneck)):
                make_plain(m)
    reference.load_state_dict(model.state_dict())
    return reference.to(next(model.parameters()).dtype).train(model.training)


def small_resnet(block=rf.nn.BasicBlock, **kwargs) -> rf.models.ResNet:
    """One block per stage: the whole ResNet structure at a fraction of the cost."""
    return rf.models.ResNet(block, [1, 1, 1, 1], num_classes=10, **kwargs)


@pytest.mark.parametrize("depth", DEPTHS)
def test_state_dict_keys_match_torchvision(depth):
    with torch.device("meta"):  # no memory, no initialization cost
        fused, reference = getattr(rf.models, depth)(), getattr(torchvision.models, depth)()
        plain = getattr(rf.models, depth)(plain=True)
    assert list(fused.state_dict()) == list(reference.state_dict())
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fused) == shapes(reference)
    # plain: the same layers without the downsample branches
    assert list(plain.state_dict()) == [k for k in reference.state_dict() if ".downsample." not in k]


def test_same_seed_same_weights_as_torchvision():
    torch.manual_seed(0)
    fused = rf.models.resnet18(num_classes=10, zero_init_residual=True)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
    for (name, a), b in zip(fused.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("plain", [False, True], ids=["residual", "plain"])
@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_model_matches_torchvision_float64(depth, backend, plain, mode):
    fused = randomize_bn(getattr(rf.models, depth)(num_classes=10, plain=plain, backend=backend)).double()
    set_mode(fused, mode)
    reference = torchvision_reference(fused)
    # 48x48 leaves layer4 2x2: training BN statistics over 8 values per channel, not 2
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert_same_step(fused, reference, x, steps=2 if mode == "train" else 1)


@pytest.mark.parametrize("plain", [False, True], ids=["residual", "plain"])
@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_low_memory_resnet50_matches_torchvision_float64(backend, plain):
    """low_memory (conv3's output recomputed in the backward) changes what is kept, not the results."""
    fused = randomize_bn(rf.models.resnet50(num_classes=10, plain=plain, backend=backend, low_memory=True)).double()
    assert all(block.low_memory for block in fused.modules() if isinstance(block, rf.nn.Bottleneck))
    reference = torchvision_reference(fused)
    assert_same_step(fused, reference, torch.randn(2, 3, 48, 48, dtype=torch.float64), steps=2)


def test_low_memory_needs_bottlenecks():
    with pytest.raises(ValueError, match="low_memory recomputes a Bottleneck's conv3"):
        rf.models.resnet18(low_memory=True)
    assert "low_memory=True" in repr(rf.models.resnet50(low_memory=True).layer1[0])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_model_float32_parity(depth, backend, mode):
    # The project's bound: the fused float32 result is at most 2x PyTorch's own float32 error (plus ulps)
    # away from the float64 result.
    fused = randomize_bn(getattr(rf.models, depth)(num_classes=10, backend=backend))
    set_mode(fused, mode)
    reference32 = torchvision_reference(fused)
    reference64 = copy.deepcopy(reference32).double()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_parity(fused(x), reference32(x), reference64(x.double()))


def test_plain_model_structure():
    model = rf.models.resnet50(plain=True)
    blocks = [m for m in model.modules() if isinstance(m, rf.nn.Bottleneck)]
    assert len(blocks) == 16 and all(b.plain and b.downsample is None for b in blocks)
    assert "plain=True" in repr(blocks[0])
    with pytest.raises(ValueError, match="plain network"):
        rf.models.resnet18(plain=True, zero_init_residual=True)


def test_dilation_and_groups_match_torchvision():
    kwargs = dict(groups=4, width_per_group=16, replace_stride_with_dilation=[False, True, True])
    fused = randomize_bn(small_resnet(rf.nn.Bottleneck, **kwargs)).double().eval()
    reference = torchvision_reference(fused)
    assert_same_step(fused, reference, torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_weights_argument_loads_a_torchvision_state_dict():
    source = randomize_bn(torchvision.models.resnet18(num_classes=3))

    class FakeWeights:  # the two members of torchvision's WeightsEnum that are used
        meta = {"categories": ["a", "b", "c"]}

        @staticmethod
        def get_state_dict(progress, check_hash):
            return source.state_dict()

    model = rf.models.resnet18(num_classes=3, weights=FakeWeights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="3 classes"):
        rf.models.resnet18(weights=FakeWeights)
    with pytest.raises(ValueError, match="plain=True takes weights=None"):
        rf.models.resnet18(num_classes=3, plain=True, weights=FakeWeights)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("depth,options", [("resnet18", {}), ("resnet50", {"low_memory": True})],
                         ids=["resnet18", "resnet50_low_memory"])
def test_autocast_bfloat16(depth, options, mode):
    model = set_mode(randomize_bn(getattr(rf.models, depth)(num_classes=10, **options)), mode)
    reference = torchvision_reference(model)
    x = torch.randn(2, 3, 48, 48)
    exact = copy.deepcopy(reference)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        torch_bf16 = reference(x)
    assert out.dtype == torch.bfloat16 == torch_bf16.dtype
    # close to the fp32 result, in the same way as torchvision's own autocast run
    error, torch_error = (out.float() - exact).abs().max().item(), (torch_bf16.float() - exact).abs().max().item()
    assert error <= 3 * torch_error + 1e-2 * exact.abs().max().item(), (error, torch_error)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_channels_last_model():
    model = randomize_bn(rf.models.resnet50(num_classes=10)).eval().to(memory_format=torch.channels_last)
    reference = torchvision_reference(model)
    x = torch.randn(2, 3, 32, 32)
    features = {}
    model.layer2.register_forward_hook(lambda m, i, o: features.setdefault("layer2", o))
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    assert features["layer2"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph(mode):
    # float64, so that the compiled model must match torchvision's up to rounding (train: 2 steps)
    model = set_mode(randomize_bn(small_resnet()).double(), mode)
    reference = torchvision_reference(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(compiled, reference, torch.randn(2, 3, 48, 48, dtype=torch.float64), steps=2)


def test_compile_inductor_eval():
    # One block (Inductor compiles C++ per graph: a whole model costs ~10x more here); the fold is
    # computed inside the compiled graph, so a weight update shows at once.
    block = randomize_bn(rf.nn.Bottleneck(16, 8, stride=2, downsample=nn.Sequential(
        nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32)))).eval()
    reference = torchvision.models.resnet.Bottleneck(16, 8, stride=2, downsample=copy.deepcopy(block.downsample)).eval()
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-4)
        for m in (block, reference):
            m.bn2.running_mean.add_(0.5)
            m.downsample[1].weight.mul_(2)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = randomize_bn(rf.models.resnet18(num_classes=10, backend="reference")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded) is rf.models.ResNet and not loaded.training and loaded.backend == "reference"
    assert all(not m._fold_cache for m in loaded.modules() if isinstance(m, rf.nn.FusedModule))
    fresh = rf.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    # torchvision's model takes the same state_dict
    torchvision.models.resnet18(num_classes=10).load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(fresh(x), expected)


def test_export_eval_model():
    model = randomize_bn(rf.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "resnet_fused.conv_bn_act.default" in ops or "aten.convolution.default" in ops
    assert not any("batch_norm" in op for op in ops), "eval BN should be folded, not run"
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), model(y), rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = rf.models.resnet18(num_classes=4)
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # and the trained model evaluates with its learned running statistics, like torchvision's would
    model.eval()
    reference = torchvision_reference(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bad_input(mode):
    model = set_mode(rf.models.resnet18(num_classes=4), mode)
    with pytest.raises(ValueError, match=r"ResNet expects a 4-D input \(N, C, H, W\), got shape \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"ResNet expects 3 input channels, got x of shape \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="fused block class"):
        rf.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


# ---- GPU: CUDA graphs (no host synchronization anywhere in a training step or the eval forward) ----

GPU_BACKENDS = ["reference", "cuda", "triton"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: runs in a GPU session")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_training_step_and_inference(backend):
    if backend not in rf.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(0)
    make = lambda: small_resnet(backend=backend).cuda().to(memory_format=torch.channels_last)  # noqa: E731
    graphed, eager = make(), make()
    eager.load_state_dict(graphed.state_dict())
    opt_graphed = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,), device="cuda")

    def step(model, optimizer, x, y):
        optimizer.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    # Warm up on a side stream (as torch.cuda.graphs asks), mirrored on the eager copy, then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(graphed, opt_graphed, images, labels)
            step(eager, opt_eager, images, labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_graphed, images, labels)
    for _ in range(2):  # capture ran nothing; each replay is one step on the current images
        images.copy_(torch.randn_like(images))
        graph.replay()
        expected = step(eager, opt_eager, images, labels)
        torch.testing.assert_close(static_loss, expected, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

    # Inference: the eval forward (BN folded inside the captured region) captures and replays too.
    graphed.eval()
    eager.eval()
    with torch.no_grad():
        graphed(images)  # warm-up
        inference = torch.cuda.CUDAGraph()
        with torch.cuda.graph(inference):
            static_logits = graphed(images)
        images.copy_(torch.randn_like(images))
        inference.replay()
        torch.testing.assert_close(static_logits, eager(images), rtol=1e-4, atol=1e-5)
