"""The CPU kernels are built once per instruction set (setup.py); each library must load where torch's CPU
capability asks for it and compute the same results. ATEN_CPU_CAPABILITY picks the capability, as for
PyTorch's own kernels; each case runs in a fresh interpreter, since the library is chosen at import."""
import json
import os
import subprocess
import sys

import pytest

import resnet_fused as rf

_BUILT = rf._library._BUILD_CONFIG.get("cpu_isas", [])

# The parity check run in the subprocess: each op on odd shapes, both layouts, float32 and bfloat16,
# forward and backward, against the reference backend in float64.
_SCRIPT = r"""
import json, torch
import resnet_fused as rf
from resnet_fused import reference
torch.manual_seed(0)
errors = {}
for fmt in (torch.contiguous_format, torch.channels_last):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 7, 17, 17).to(dtype).contiguous(memory_format=fmt).requires_grad_()
        r = torch.randn(3, 7, 17, 17).to(dtype).contiguous(memory_format=fmt)
        w, b = torch.rand(7) + 0.5, torch.randn(7)
        rm, rv = torch.zeros(7), torch.ones(7)
        out = rf.bn_act(x, w, b, rm, rv, r, training=True, backend="cpu")
        grad, = torch.autograd.grad(out, x, torch.ones_like(out))
        x64 = x.detach().double().requires_grad_()
        want = reference.bn_act(x64, w.double(), b.double(), torch.zeros(7, dtype=torch.float64),
                                torch.ones(7, dtype=torch.float64), r.double(), training=True)
        grad64, = torch.autograd.grad(want, x64, torch.ones_like(want))
        cw = torch.randn(5, 7, 3, 3).to(dtype)
        conv = rf.conv_bn_act(x.detach(), cw, b[:5].to(dtype), None, padding=1, backend="cpu")
        conv64 = reference.conv_bn_act(x.detach().double(), cw.double(), b[:5].double(), None, (1, 1), (1, 1),
                                       (1, 1), 1, True)
        add = rf.add_act(x.detach(), r, backend="cpu")
        pool = rf.max_pool2d(x.detach(), 3, 2, 1, backend="cpu")
        gate = torch.rand(3, 7).to(dtype).requires_grad_()
        gated = rf.scale_add_act(x, gate, r, backend="cpu")
        gated_grads = torch.autograd.grad(gated, (x, gate), torch.ones_like(gated))
        gate64 = gate.detach().double().requires_grad_()
        gated64 = reference.scale_add_act(x64, gate64, r.double())
        gated_grads64 = torch.autograd.grad(gated64, (x64, gate64), torch.ones_like(gated64))
        key = f"{fmt}-{dtype}"
        pairs = [(out, want), (grad, grad64), (conv, conv64), (add, (x.detach().double() + r.double()).relu()),
                 (pool, torch.nn.functional.max_pool2d(x.detach().double(), 3, 2, 1)), (gated, gated64),
                 *zip(gated_grads, gated_grads64)]
        # errors relative to the largest value of each result
        errors[key] = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item() for a, b in pairs]
print(json.dumps({"isa": rf.build_info()["cpu_isa"], "errors": errors}))
"""


def _run(capability: str) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not rf.build_info()["cpu_compiled"], reason="the CPU kernels are not built")
@pytest.mark.parametrize("capability, isa", [("default", "default"), ("avx2", "avx2"), ("avx512", "avx512")])
def test_each_instruction_set_loads_and_agrees(capability, isa):
    if isa not in _BUILT:
        pytest.skip(f"no {isa} library was built here")
    import torch

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT" and isa != "default":
        pytest.skip("this CPU lacks the instruction set")
    result = _run(capability)
    if isa == "avx512" and result["isa"] != "avx512":
        pytest.skip("this CPU lacks AVX-512")
    assert result["isa"] == isa
    for key, (bn_out, bn_grad, conv, add, pool, *gated) in result["errors"].items():
        # a few ulps of float32, or of bfloat16's 8-bit mantissa (2**-8 = 0.0039)
        tolerance = 1e-5 if "float32" in key else 0.02
        assert max(bn_out, bn_grad, conv, add, *gated) < tolerance, (key, bn_out, bn_grad, conv, add, gated)
        assert pool == 0, (key, pool)  # a maximum is exact in any dtype
