"""The graph pass of rf.fuse (resnet_fused.graph_fuse): what it fuses, what it must leave alone (and says
why), the recomputing ops it runs in training (and where it must not), and the model-level guarantees on
small graphs and single models: both modes, torch.compile in training, pickling, deep copies. The guarantees
over every model of the family table (state_dict round trips, fusing twice, inplace=False, torch.compile and
torch.export in eval) are in test_fuse_family.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_nn import assert_same_step, randomize_bn, set_mode
from test_recomputed_bn_relu import saved_storages
from torch import nn

import resnet_fused as rf
from resnet_fused import family
from resnet_fused.graph_fuse import GraphFusedAddReLU, GraphFusedStep, GraphRecomputingStep, GraphRecomputingTailStep
from resnet_fused.graph_fuse import step as graph_step
from resnet_fused.nn import fused as fused_modules
from resnet_fused.graph_fuse.report import RECOMPUTED, TAIL_RECOMPUTED

timm = pytest.importorskip("timm")


def steps(model):
    return [m for m in model.modules() if isinstance(m, GraphFusedStep)]


def assert_same(fused, original, x, modes=("eval", "train")):
    """Outputs (and, in training, running statistics) equal in float64; the two models stay independent."""
    for mode in modes:
        set_mode(fused, mode), set_mode(original, mode)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), original(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(fused.state_dict(), original.state_dict(), rtol=1e-9, atol=1e-9)


class ConvBN(nn.Module):
    def __init__(self, channels=4, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, padding_mode=padding_mode)
        self.bn = nn.BatchNorm2d(channels)


class ConvOutputReused(ConvBN):
    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.bn(y)) + y  # the conv output has a second user: only BN + ReLU fuse


class BNOutputReused(ConvBN):
    def forward(self, x):
        z = self.bn(self.conv(x))
        return torch.relu(z) * z  # the BN output has a second user: conv + BN fuse, the ReLU stays


class ReflectPadding(ConvBN):
    def __init__(self):
        super().__init__(padding_mode="reflect")

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


class SharedConv(ConvBN):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + self.conv(x)  # one conv module, two calls


class BroadcastResidual(ConvBN):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x.mean((2, 3), keepdim=True))  # fused, added outside the op


class DataDependent(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.relu() if x.sum() > 0 else y  # control flow on a tensor: torch.fx cannot trace it


class TrainingBranch(ConvBN):
    def forward(self, x):
        return F.dropout(F.relu(self.bn(self.conv(x))), 0.5, training=self.training)


@pytest.mark.parametrize("module,eval_note", [
    (ConvOutputReused, "fused (bn+relu)"),
    (BNOutputReused, "fused (conv+bn)"),
    (ReflectPadding, "fused (bn+relu)"),
    (SharedConv, "fused (bn+relu)"),
    (BroadcastResidual, "fused (conv+bn+add+relu)"),
])
def test_fuses_only_what_is_safe(module, eval_note):
    original = randomize_bn(module()).double()
    fused, report = rf.fuse(original, report=True)
    assert report.notes["eval"] == {"bn": eval_note} and report.notes["train"] == {"bn": eval_note}
    assert [step.conv is not None for step in steps(fused)] == ["conv+" in eval_note]
    assert_same(fused, original, torch.randn(2, 4, 6, 6, dtype=torch.float64))


class RecomputingChain(nn.Module):
    """Every recomputing pattern of a training graph: a stem (conv -> BN -> ReLU -> max pool), a pre-activation
    BN -> ReLU -> conv (no conv before the BN; its input, the pool output, is also the residual), conv -> BN ->
    ReLU -> conv, and the BN after that conv with the residual and ReLU. BNs with momentum=None, without affine
    parameters, and as timm's BatchNormAct2d."""

    def __init__(self, channels=8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(channels, momentum=None)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = timm.layers.BatchNormAct2d(channels, affine=False)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        p = self.pool(F.relu(self.bn0(self.stem(x))))
        y = self.conv2(self.bn2(self.conv1(torch.relu(self.bn1(p)))))
        return F.relu(self.bn3(y) + p)


CHAIN_NOTES = {
    "train": {"bn0": f"fused (conv+bn+relu+max_pool; {RECOMPUTED})", "bn1": f"fused (bn+relu+conv; {RECOMPUTED})",
              "bn2": f"fused (bn+relu+conv; {RECOMPUTED})", "bn3": "fused (bn+add+relu; its conv runs in bn2's step)"},
    "eval": {"bn0": "fused (conv+bn+relu+max_pool)", "bn1": "fused (bn+relu)", "bn2": "fused (conv+bn+relu)",
             "bn3": "fused (conv+bn+add+relu)"},
}


def fused_backend():
    if "cpu" not in rf.available_backends():
        pytest.skip("the recomputing ops run on a fused backend; the cpu backend is not built here")
    return "cpu"


def chain_pair(backend):
    torch.manual_seed(0)
    original = randomize_bn(RecomputingChain()).double()
    fused, report = rf.fuse(original, backend=backend, report=True)
    return fused, original, report


def test_training_graph_runs_the_recomputing_ops():
    """The report names the recomputing BNs; a training step (output, every gradient, running statistics,
    num_batches_tracked; two steps, for momentum=None) and eval equal the unfused model's in float64."""
    fused, original, report = chain_pair(fused_backend())
    assert report.notes == CHAIN_NOTES and report.recomputed() == ["bn0", "bn1", "bn2"]
    assert "3 with " + RECOMPUTED in str(report)
    assert sorted(type(step.then).__name__ for step in steps(fused) if isinstance(step, GraphRecomputingStep)) == \
        ["Conv2d", "Conv2d", "MaxPool2d"]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_same_step(set_mode(fused, "train"), set_mode(original, "train"), x, steps=2)
    assert_same(fused, original, x, modes=("eval",))


def test_recomputing_ops_keep_the_bn_input_only():
    """The fused model keeps exactly the three ReLU outputs and the pool's int64 indices less than the unfused
    one (give or take per-channel statistics): without the recomputing ops it would keep them all."""
    fused, original, _ = chain_pair(fused_backend())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    kept = {name: sum(nbytes for nbytes, _ in saved_storages(lambda: model.train()(x), model.parameters()).values())
            for name, model in (("unfused", original), ("fused", fused))}
    relu_outputs = 8 * 2 * 8 * (16 * 16 + 8 * 8 + 8 * 8)  # float64: the stem's at 16x16, two after the pool at 8x8
    indices = 8 * 2 * 8 * 8 * 8
    assert abs(kept["unfused"] - kept["fused"] - (relu_outputs + indices)) < 1000, kept


@pytest.mark.parametrize("backend, no_grad, mode, expected", [
    ("cpu", False, "train", {"bn_relu_conv": 2, "bn_relu_max_pool": 1}),
    ("reference", False, "train", {}),  # plain PyTorch, as the blocks on that backend
    ("cpu", True, "train", {}),  # nothing is kept for a backward
    ("cpu", False, "eval", {}),  # the eval graph: conv_bn_act with the folded weights
])
def test_recomputing_ops_only_where_the_blocks_use_them(monkeypatch, backend, no_grad, mode, expected):
    if backend == "cpu":
        fused_backend()
    calls = {}

    def counted(name, op):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return op(*args, **kwargs)
        return run

    for name in ("bn_relu_conv", "bn_relu_max_pool"):
        monkeypatch.setattr(graph_step, name, counted(name, getattr(graph_step, name)))
    fused, original, _ = chain_pair(backend)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.set_grad_enabled(not no_grad):
        torch.testing.assert_close(set_mode(fused, mode)(x), set_mode(original, mode)(x), rtol=1e-9, atol=1e-9)
    assert calls == expected


class ConvBNAddReLU(ConvBN):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


@pytest.mark.parametrize("backend, public_calls", [("cpu", 0), ("reference", 1)])
def test_training_step_calls_the_cpu_op_below_rf_bn_act(monkeypatch, backend, public_calls):
    """In training on the cpu backend a step's BN runs the C++ op rf.bn_act would call, without rf.bn_act's Python
    (its checks and backend choice cost microseconds per BN of a training step; the op checks the tensors itself);
    on other backends through rf.bn_act. The same values either way."""
    if backend == "cpu":
        fused_backend()
    calls = []
    monkeypatch.setattr(fused_modules, "bn_act", lambda *args, **kwargs: calls.append(1) or rf.bn_act(*args, **kwargs))
    original = randomize_bn(ConvBNAddReLU()).double()
    fused = rf.fuse(original, backend=backend)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_same_step(set_mode(fused, "train"), set_mode(original, "train"), x, steps=2)
    assert len(calls) == 2 * public_calls


def test_bn_converted_behind_the_step_raises():
    """A BN converted on its own after fusing (its step is not told) gets the op's error, not a wrong answer."""
    fused = rf.fuse(ConvBNAddReLU(), backend=fused_backend()).train()
    fused.bn.double()
    with pytest.raises(TypeError, match="the BN parameters have dtype Double but x has Float"):
        fused(torch.randn(2, 4, 6, 6))


class PreActivationAdd(ConvBN):
    """BN -> + other -> ReLU on the module's input (no conv before the BN), the other a conv output (in the autocast
    dtype under autocast) or the input scaled (float32)."""

    def __init__(self, other: str):
        super().__init__()
        self.other = other

    def forward(self, x):
        other = self.conv(x) if self.other == "conv" else x * 2
        return F.relu(self.bn(x) + other)


@pytest.mark.parametrize("other", ["conv", "scaled input"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_alone_under_autocast_takes_a_residual_of_another_dtype(mode, other):
    """A BN without a conv before it runs in its input's dtype under autocast (float32 here), as PyTorch's does; a
    residual in another dtype is cast to it (it used to be cast to the autocast dtype, and the op refused the mix)."""
    torch.manual_seed(0)
    original = randomize_bn(PreActivationAdd(other))
    fused, report = rf.fuse(original, report=True)
    assert report.notes[mode] == {"bn": "fused (bn+add+relu)"}
    x = torch.randn(2, 4, 6, 6)
    for model in (fused, original):
        set_mode(model, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(x), original(x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.state_dict(), original.state_dict(), rtol=1e-4, atol=1e-4)


def test_frozen_bn_in_a_training_graph_runs_the_plain_steps():
    """A BN in eval mode inside a training module (frozen BN fine-tuning) is not recomputed: its step runs it
    with its running statistics, then the next conv."""
    fused, original, _ = chain_pair(fused_backend())
    for model in (fused, original):
        model.train()
        model.bn1.eval()
    assert_same_step(fused, original, torch.randn(2, 3, 16, 16, dtype=torch.float64))


TAIL_NOTES = {"bn2": f"fused (bn+relu+conv; {RECOMPUTED}, then bn3; {TAIL_RECOMPUTED})",
              "bn3": "fused (bn+add+relu; in bn2's step, with its conv)"}


def test_low_memory_runs_the_bn_after_the_next_conv_in_the_same_op():
    """With low_memory, bn2 -> ReLU -> conv2 -> bn3 + residual -> ReLU is one op (bn_relu_conv_bn_act) that keeps
    neither the ReLU output nor conv2's output; a step (two, for momentum=None) and eval equal the unfused
    model's in float64."""
    backend = fused_backend()
    torch.manual_seed(0)
    original = randomize_bn(RecomputingChain()).double()
    fused, report = rf.fuse(original, backend=backend, low_memory=True, report=True)
    assert report.notes == {"train": {**CHAIN_NOTES["train"], **TAIL_NOTES}, "eval": CHAIN_NOTES["eval"]}
    assert report.recomputed() == ["bn0", "bn1", "bn2"]
    tails = [step for step in steps(fused) if isinstance(step, GraphRecomputingTailStep)]
    assert [(step.bn, step.then, step.bn2) for step in tails] == [(fused.bn2, fused.conv2, fused.bn3)]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_same_step(set_mode(fused, "train"), set_mode(original, "train"), x, steps=2)
    assert_same(fused, original, x, modes=("eval",))
    default = rf.fuse(original, backend=backend)
    kept = {name: sum(nbytes for nbytes, _ in saved_storages(lambda: model.train()(x), model.parameters()).values())
            for name, model in (("default", default), ("low_memory", fused))}
    conv2_output = 8 * 2 * 8 * 8 * 8  # float64, 2x8x8x8
    assert abs(kept["default"] - kept["low_memory"] - conv2_output) < 1000, kept


@pytest.mark.parametrize("backend, no_grad, mode, frozen, expected", [
    ("cpu", False, "train", None, 1),
    ("reference", False, "train", None, 0),  # plain PyTorch
    ("cpu", True, "train", None, 0),  # nothing is kept for a backward
    ("cpu", False, "eval", None, 0),
    ("cpu", False, "train", "bn3", 0),  # a frozen BN after the conv: bn_relu_conv, then bn3 on its own
    ("cpu", False, "train", "bn2", 0),  # a frozen BN before it: no recomputing op at all
])
def test_low_memory_op_only_where_the_blocks_use_it(monkeypatch, backend, no_grad, mode, frozen, expected):
    if backend == "cpu":
        fused_backend()
    calls = []
    tail_op = fused_modules.bn_relu_conv_bn_act  # called by FusedModule._recomputed_tail
    monkeypatch.setattr(fused_modules, "bn_relu_conv_bn_act", lambda *args, **kwargs: calls.append(1) or tail_op(
        *args, **kwargs))
    torch.manual_seed(0)
    original = randomize_bn(RecomputingChain()).double()
    fused = rf.fuse(original, backend=backend, low_memory=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for model in (fused, original):
        set_mode(model, mode)
        if frozen:
            model.get_submodule(frozen).eval()
    with torch.set_grad_enabled(not no_grad):
        torch.testing.assert_close(fused(x), original(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused.state_dict(), original.state_dict(), rtol=1e-9, atol=1e-9)
    assert len(calls) == expected


class BroadcastTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.conv, self.bn2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn2(self.conv(F.relu(self.bn1(x)))) + x.mean((2, 3), keepdim=True))


def test_low_memory_tail_with_a_broadcasting_residual_adds_it_outside(monkeypatch):
    """The graph cannot tell a broadcasting add: the tail step sees it at run time and runs bn_relu_conv, then bn2,
    then the add outside the op."""
    backend = fused_backend()
    monkeypatch.setattr(fused_modules, "bn_relu_conv_bn_act", None)  # not called
    original = randomize_bn(BroadcastTail()).double()
    fused = rf.fuse(original, backend=backend, low_memory=True)
    assert len([step for step in steps(fused) if isinstance(step, GraphRecomputingTailStep)]) == 1
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_same_step(set_mode(fused, "train"), set_mode(original, "train"), x)


def test_low_memory_tail_pairs_bns_that_synchronize_alike():
    """The op runs both BNs with one process group: a SyncBatchNorm and a BatchNorm2d are not paired."""
    original = RecomputingChain()
    original.bn3 = nn.SyncBatchNorm(8, process_group=object())
    _, report = rf.fuse(original, low_memory=True, report=True)
    assert report.notes["train"]["bn3"] == "fused (bn+add+relu; its conv runs in bn2's step)"
    group = object()
    chain = rf.nn.convert_sync_batchnorm(rf.fuse(RecomputingChain(), low_memory=True), process_group=group)
    assert {step.process_group for step in steps(chain)} == {group}


def test_low_memory_pickle_round_trip(tmp_path):
    backend = fused_backend()
    original = randomize_bn(RecomputingChain()).double()
    fused = rf.fuse(original, backend=backend, low_memory=True)
    torch.save(fused, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in fused.named_modules()]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_same_step(set_mode(loaded, "train"), set_mode(original, "train"), x)


class NextConv(ConvBN):
    def __init__(self, bias=False):
        super().__init__()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)


class BNOutputFeedsTwo(NextConv):
    def forward(self, x):
        z = self.bn(self.conv(x))
        return self.conv2(F.relu(z)) + z  # the BN output has a second user: conv + BN fuse, nothing is recomputed


class ReLUOutputFeedsTwo(NextConv):
    def forward(self, x):
        a = F.relu(self.bn(self.conv(x)))
        return self.conv2(a) + a  # the backward needs the ReLU output anyway: conv + BN + ReLU fuse


class NextConvWithBias(NextConv):
    def __init__(self):
        super().__init__(bias=True)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv(x))))  # bn_relu_conv takes no conv bias


@pytest.mark.parametrize("module,note", [
    (BNOutputFeedsTwo, "fused (conv+bn)"),
    (ReLUOutputFeedsTwo, "fused (conv+bn+relu)"),
    (NextConvWithBias, "fused (conv+bn+relu)"),
])
def test_no_recomputing_step_where_it_does_not_apply(module, note):
    original = randomize_bn(module()).double()
    fused, report = rf.fuse(original, report=True, backend=fused_backend())
    assert report.notes == {"train": {"bn": note}, "eval": {"bn": note}} and not report.recomputed()
    assert not any(isinstance(step, GraphRecomputingStep) for step in steps(fused))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_same_step(set_mode(fused, "train"), set_mode(original, "train"), x)


class GatedTail(ConvBN):
    """The tail of an SE block: conv -> BN -> gate, then + shortcut -> ReLU; and a broadcasting add -> ReLU."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        return F.relu(y + x), torch.relu(x + x.mean((2, 3), keepdim=True))


def test_add_relu_after_a_gate():
    original = randomize_bn(GatedTail()).double()
    fused, report = rf.fuse(original, report=True, backend="cpu" if "cpu" in rf.available_backends() else None)
    assert report.notes["eval"] == {"bn": "fused (conv+bn)"}
    assert len([m for m in fused.modules() if isinstance(m, GraphFusedAddReLU)]) == 1
    code = fused._rf_graph_forwards[False].__code__
    assert "fused_add_relu" in code.co_names and "relu" not in code.co_names  # both add -> ReLU pairs taken
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for mode in ("eval", "train"):
        set_mode(fused, mode), set_mode(original, mode)
        with torch.no_grad():
            for a, b in zip(fused(x), original(x)):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bn_alone_and_hooks_are_left_alone():
    class BNAlone(ConvBN):
        def forward(self, x):
            return self.bn(x) * 2

    class Hooked(ConvBN):
        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    hooked = Hooked()
    hooked.bn.register_forward_hook(lambda *args: None)
    for model, reason in ((BNAlone(), "a BN alone"), (hooked, "the BN module has hooks")):
        fused, report = rf.fuse(model, report=True)
        assert type(fused) is type(model) and not steps(fused)
        assert report.coverage("eval") == 0 and report.not_fused("eval")["bn"].startswith(reason)


class ConvBNReLU(nn.Sequential):  # as torchvision's Conv2dNormActivation: nn.Sequential's forward
    def __init__(self, channels=4, relu=True):
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         *([nn.ReLU()] if relu else []))


class Doubled(ConvBNReLU):
    def forward(self, x):
        return super().forward(x) * 2  # its own forward: a leaf, never inlined


class TwoContainers(nn.Module):
    def __init__(self, first):
        super().__init__()
        self.a, self.b = first, ConvBNReLU(relu=False)

    def forward(self, x):
        return self.b(self.a(x))


def _plain_conv_bn_relu():
    return nn.Sequential(*ConvBNReLU())


@pytest.mark.parametrize("make_first, hook, spans", [
    (ConvBNReLU, None, True),  # inlined: a's BN -> ReLU and b's conv are one recomputing step of the parent
    (_plain_conv_bn_relu, None, True),
    (Doubled, None, False),  # its forward is its own: traced alone
    (ConvBNReLU, "forward", False),  # a hook on the container would not run inlined: traced alone
    (_plain_conv_bn_relu, "forward", False),
    (ConvBNReLU, "backward", False),
])
def test_sequential_containers_inlined_where_sequential_runs_them(make_first, hook, spans):
    calls, first = [], make_first()
    if hook == "forward":
        first.register_forward_hook(lambda *args: calls.append(1))
    elif hook == "backward":
        first.register_full_backward_hook(lambda *args: calls.append(1))
    original = randomize_bn(TwoContainers(first)).double()
    fused, report = rf.fuse(original, backend="cpu" if "cpu" in rf.available_backends() else None, report=True)
    assert report.coverage("train") == report.coverage("eval") == 1
    assert ("a.1" in report.recomputed("train")) == (spans and "cpu" in rf.available_backends())
    assert type(fused.a).__name__.startswith("GraphFused") != spans  # traced on its own where not inlined
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    set_mode(copy.deepcopy(fused), "train")(x.requires_grad_()).sum().backward()  # a copy: its statistics move
    assert len(calls) == (1 if hook else 0)  # the fused model's copy of the hook runs
    x = x.detach()
    assert_same(fused, original, x)
    assert_same_step(set_mode(fused, "train"), set_mode(original, "train"), x)


def test_untraceable_module_is_left_alone_and_reported():
    original = nn.Sequential(randomize_bn(BNOutputReused()), randomize_bn(DataDependent())).double()
    fused, report = rf.fuse(original, report=True)
    assert type(fused[1]) is DataDependent and list(report.untraceable) == ["1"]
    assert "torch.fx cannot trace" in report.not_fused("eval")["1.bn"]
    assert "1.bn" in str(report)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_same(fused, original, x)
    assert_same(fused, original, -x.abs())


def test_training_branches_follow_the_mode():
    original = randomize_bn(TrainingBranch()).double()
    fused = rf.fuse(original)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for mode in ("train", "eval", "train"):
        torch.manual_seed(1)
        expected = set_mode(original, mode)(x)
        torch.manual_seed(1)
        torch.testing.assert_close(set_mode(fused, mode)(x), expected, rtol=1e-9, atol=1e-9)


def test_model_keeps_class_methods_and_state_dict():
    original = randomize_bn(timm.create_model("seresnet50", pretrained=False, num_classes=10)).double()
    fused = rf.fuse(original)
    assert isinstance(fused, type(original)) and type(fused).__bases__ == (type(original),)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in original.named_buffers()]
    fused.reset_classifier(7)
    assert fused.get_classifier().out_features == 7
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    set_mode(fused, "eval"), set_mode(original, "eval")
    with torch.no_grad():  # forward_features is the original method: it calls the fused blocks
        torch.testing.assert_close(fused.forward_features(x), original.forward_features(x), rtol=1e-9, atol=1e-9)


def test_deepcopy_and_conversions_keep_steps_on_their_own_modules():
    original = randomize_bn(family.build("timm/ecaresnet50d", num_classes=10))
    fused = rf.fuse(original)
    copied = copy.deepcopy(fused).double()
    modules = {id(m) for m in copied.modules()}
    assert all(id(step.bn) in modules and (step.conv is None or id(step.conv) in modules) for step in steps(copied))
    with torch.no_grad():
        for p in fused.parameters():
            p.zero_()  # the copy does not share them
    assert_same(copied, original.double(), torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_compile_fullgraph_training():
    """In training (eval: every family model, test_fuse_family.py), running statistics updated as eager's."""
    original = set_mode(randomize_bn(family.build("timm/skresnet18", num_classes=10)), "train")
    fused = rf.fuse(original)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(compiled(x), original(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.state_dict(), original.state_dict(), rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_with_low_memory_steps():
    """Under torch.compile a tail step runs its plain steps (the compiler makes its own recompute choices)."""
    original = RecomputingChain()
    original.bn1.momentum = 0.1  # momentum=None reads num_batches_tracked on the host: a graph break (README)
    original = randomize_bn(original).train()
    fused = rf.fuse(original, low_memory=True)
    assert any(isinstance(step, GraphRecomputingTailStep) for step in steps(fused))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compiled(x), original(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.state_dict(), original.state_dict(), rtol=1e-4, atol=1e-4)


def test_pickle_round_trip(tmp_path):
    original = randomize_bn(family.build("timm/resnetv2_50", num_classes=10)).double()
    fused = rf.fuse(original, backend="reference")
    torch.save(fused, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in fused.named_modules()]
    assert all(step.backend == "reference" for step in steps(loaded))
    modules = {id(m) for m in loaded.modules()}
    assert all(id(step.bn) in modules for step in steps(loaded))
    assert_same(loaded, original, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_wrapped_model_is_fused_inside():
    original = nn.DataParallel(randomize_bn(TrainingBranch()).double())  # a wrapper: its module is visited
    fused, report = rf.fuse(original, report=True)
    assert type(fused) is nn.DataParallel and report.notes["eval"] == {"module.bn": "fused (conv+bn+relu)"}
    assert_same(fused, original, torch.randn(2, 4, 6, 6, dtype=torch.float64), modes=("eval",))


def test_synchronized_batch_norm():
    """A SyncBatchNorm keeps its group in its fused step; rf.nn.convert_sync_batchnorm gives the steps the group
    and leaves the BN layers they compute as they are (a stand-in group: nothing runs across processes here)."""
    group = object()
    original = ConvOutputReused()
    original.bn = nn.SyncBatchNorm(4, process_group=group)
    assert [step.process_group for step in steps(rf.fuse(original, inplace=True))] == [group]
    fused = rf.fuse(TrainingBranch())
    converted = rf.nn.convert_sync_batchnorm(fused, process_group=group)
    assert type(converted.bn) is nn.BatchNorm2d and [step.process_group for step in steps(converted)] == [group]
    chain = rf.nn.convert_sync_batchnorm(rf.fuse(RecomputingChain()), process_group=group)  # recomputing steps too
    assert all(type(chain.get_submodule(f"bn{i}")) is not nn.SyncBatchNorm for i in range(4))
    assert {step.process_group for step in steps(chain)} == {group}
