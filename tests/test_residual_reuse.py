"""Writing a block's output into its residual's memory (inference on the cpu backend): the op
conv_bn_act_into_residual, the blocks' `reuse_input`, and rf.models.ResNet handing each block's output to the
next block, never where a hook may hold it."""
import pytest
import torch
import torchvision
from samples import CONV_CASES, MEMORY_FORMATS, ConvCase, conv_sample, skip_unless_runs

import resnet_fused as rf
from resnet_fused.ops.conv_bn_act import conv_bn_act_into_residual

# CONV_CASES' outputs are small, so they take the op's ATen path; these take oneDNN's (>= 16K output values).
ONEDNN_CASES = [
    ConvCase("onednn_3x3", 2, 16, (32, 32), 16, 3, padding=1),
    ConvCase("onednn_1x1_stride2_no_relu", 2, 32, (48, 48), 64, 1, stride=2, relu=False),
    ConvCase("onednn_residual_only", 1, 24, (40, 40), 24, 1, bias=False),
]
CASES = [c for c in CONV_CASES if c.residual] + ONEDNN_CASES
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _sample(case, dtype=torch.float32, memory_format="nhwc"):
    skip_unless_runs("conv_bn_act", "cpu", "cpu", dtype)
    return conv_sample(case, dtype, "cpu", memory_format)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_op_matches_conv_bn_act(case, dtype, memory_format):
    """The same computation as conv_bn_act on the cpu backend, bit for bit, in the residual's own memory."""
    (x, weight, bias, residual), kwargs = _sample(case, dtype, memory_format)
    want = rf.conv_bn_act(x, weight, bias, residual, **kwargs, backend="cpu")
    buffer = residual.clone()
    got = conv_bn_act_into_residual(x, weight, bias, buffer, **kwargs)
    assert got is buffer
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("case", ONEDNN_CASES, ids=lambda c: c.name)
def test_op_takes_a_prepacked_weight(case):
    (x, weight, bias, residual), kwargs = _sample(case)
    pair = lambda v: [v, v]  # noqa: E731
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, pair(case.padding), pair(case.stride),
                                                          pair(case.dilation), case.groups, list(x.shape))
    want = rf.conv_bn_act(x, weight, bias, residual, **kwargs, backend="cpu")
    got = conv_bn_act_into_residual(x, packed, bias, residual.clone(), **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("case", [CONV_CASES[0], ONEDNN_CASES[0]], ids=lambda c: c.name)
def test_opcheck(case, memory_format):
    """The schema's mutation annotation (residual is written, nothing returned) and the fake kernel."""
    (x, weight, bias, residual), kw = _sample(case, memory_format=memory_format)
    pair = lambda v: [v, v]  # noqa: E731
    torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act_into_residual.default,
                          (x, weight, bias, residual, pair(kw["stride"]), pair(kw["padding"]), pair(kw["dilation"]),
                           kw["groups"], kw["relu"]))


def _bad_calls():
    """(description, call, error type, message fragment)."""
    op = torch.ops.resnet_fused.conv_bn_act_into_residual

    def python(x, weight, bias, residual, kw):
        return conv_bn_act_into_residual(x, weight, bias, residual, **kw)

    def cpp(x, weight, bias, residual, kw):
        pair = lambda v: [v, v]  # noqa: E731
        return op(x, weight, bias, residual, pair(kw["stride"]), pair(kw["padding"]), pair(kw["dilation"]),
                  kw["groups"], kw["relu"])

    return [
        ("no residual", lambda x, w, b, r, kw: python(x, w, b, None, kw), ValueError, "residual is the output buffer"),
        ("meta tensors", lambda x, w, b, r, kw: python(*(t.to("meta") for t in (x, w, b, r)), kw), ValueError,
         "runs on the cpu backend only"),
        ("needs grad", lambda x, w, b, r, kw: python(x, w.requires_grad_(), b, r, kw), RuntimeError,
         "has no gradient"),
        ("residual shape", lambda x, w, b, r, kw: python(x, w, b, r[:, :, 1:], kw), ValueError,
         "residual must have shape"),
        ("residual layout", lambda x, w, b, r, kw: cpp(x, w, b, r.contiguous(), kw), RuntimeError,
         "residual must be contiguous in x's memory format (channels_last)"),
        ("residual dtype", lambda x, w, b, r, kw: cpp(x, w, b, r.double(), kw), RuntimeError,
         "residual must have x's dtype"),
        ("residual is x", lambda x, w, b, r, kw: python(r, w[:, :, 1:2, 1:2].contiguous(), b, r,
                                                        dict(kw, padding=0)), RuntimeError,
         "refer to a single memory location"),
    ]


@pytest.mark.parametrize("call,error,message", [b[1:] for b in _bad_calls()], ids=[b[0] for b in _bad_calls()])
def test_op_bad_input(call, error, message):
    (x, weight, bias, residual), kwargs = _sample(ONEDNN_CASES[0])
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, weight, bias, residual, kwargs)


def _block(cls, inplanes, planes, downsample):
    down = None
    if downsample:
        down = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * cls.expansion, 1, bias=False),
                                   torch.nn.BatchNorm2d(planes * cls.expansion))
    block = cls(inplanes, planes, downsample=down, backend="cpu")
    for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return block.eval().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("hw", [(5, 5), (24, 24)], ids=["aten_path", "onednn_path"])
@pytest.mark.parametrize("cls,inplanes,planes", [(rf.nn.BasicBlock, 32, 32), (rf.nn.Bottleneck, 64, 16)],
                         ids=["basic", "bottleneck"])
def test_block_writes_its_output_into_a_given_input(cls, inplanes, planes, hw):
    skip_unless_runs("conv_bn_act", "cpu", "cpu", torch.float32)
    block = _block(cls, inplanes, planes, downsample=False)
    x = torch.randn(2, inplanes, *hw).to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = block(x)
        kept = x.clone()
        torch.testing.assert_close(x, kept, rtol=0, atol=0)  # without reuse_input, x is left alone
        got = block(x, reuse_input=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("case", ["downsample", "grad_enabled"])
def test_block_leaves_a_given_input_alone(case):
    """With a downsample branch the block adds into the branch's fresh output instead; with autograd recording
    (parameters that require grad), nothing is written in place."""
    skip_unless_runs("conv_bn_act", "cpu", "cpu", torch.float32)
    inplanes = 32 if case == "downsample" else 64
    block = _block(rf.nn.Bottleneck, inplanes, 16, downsample=case == "downsample")
    x = torch.randn(2, inplanes, 24, 24).to(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.set_grad_enabled(case == "grad_enabled"):
        want = block(x)
        got = block(x, reuse_input=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    assert got.data_ptr() != x.data_ptr()


def _fused_resnet18():
    model = rf.fuse(torchvision.models.resnet18().eval(), backend="cpu")
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.to(memory_format=torch.channels_last)


def _stage_by_stage(model, x):
    """The model's output with every module called as nn.Module calls them (no reuse)."""
    x = model.maxpool(model._conv_bn("stem", x, model.conv1, model.bn1))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
    return model.fc(torch.flatten(model.avgpool(x), 1))


@pytest.mark.parametrize("hooked", ["maxpool", "layer1.0", "layer1", "global"])
def test_model_never_writes_into_what_a_hook_saw(hooked):
    """A forward hook may keep a module's output (feature extraction does): the next block must not write into
    it. Without the hook, layer1[1] would write into layer1[0]'s output and layer1[0] into the max pool's."""
    skip_unless_runs("conv_bn_act", "cpu", "cpu", torch.float32)
    model = _fused_resnet18()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    seen = []
    save = lambda module, args, output: seen.append((output, output.clone()))  # noqa: E731
    handle = (torch.nn.modules.module.register_module_forward_hook(save) if hooked == "global"
              else model.get_submodule(hooked).register_forward_hook(save))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    assert seen
    for output, at_hook_time in seen:
        torch.testing.assert_close(output, at_hook_time, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, _stage_by_stage(model, x), rtol=0, atol=0)


def test_model_reuses_block_outputs_without_hooks():
    """Without hooks, the blocks without a downsample branch return their input's memory: the output of
    layer1[0] becomes layer1[1]'s (a hook on layer1[1] sees only its output, not its input's fate)."""
    skip_unless_runs("conv_bn_act", "cpu", "cpu", torch.float32)
    model = _fused_resnet18()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    pointers = {}
    for name in ("layer1.0", "layer1.1"):
        model.get_submodule(name).forward = _recording(model.get_submodule(name), name, pointers)
    kept = x.clone()
    with torch.no_grad():
        out = model(x)
    assert pointers["layer1.1"] == pointers["layer1.0"]
    torch.testing.assert_close(x, kept, rtol=0, atol=0)  # the model's own input is never written
    with torch.no_grad():
        torch.testing.assert_close(out, _stage_by_stage(model, x), rtol=0, atol=0)


def _recording(block, name, pointers):
    """block.forward, recording its output's data pointer (an instance attribute: no hook is registered)."""
    forward = type(block).forward.__get__(block)

    def recorded(x, **kwargs):
        out = forward(x, **kwargs)
        pointers[name] = out.data_ptr()
        return out
    return recorded
