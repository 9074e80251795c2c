"""Per-call overhead: each op and module on a tiny tensor (1x8x4x4, nothing to compute), fused against the eager
chain it replaces, so what is timed is Python, argument checks, backend choice and dispatch. At batch 1 and in
small layers this is what a user sees."""
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf

from .timing import measure_side_by_side

SHAPE = (1, 8, 4, 4)


def _inputs(dtype, device):
    def make(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    return make(*SHAPE), make(*SHAPE)


def run(dtype, device, min_run_time: float) -> list[dict]:
    torch.manual_seed(0)
    x, residual = _inputs(dtype, device)
    channels = SHAPE[1]
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    bn = nn.BatchNorm2d(channels).to(device, dtype)
    fused = rf.nn.ConvBNAct.from_modules(conv, bn)  # shares conv and bn
    weight, bias = rf.fold_bn(conv.weight.detach(), None, bn.eval())
    comparisons = {
        # eval: conv + BN + add + ReLU
        "conv_bn_act": {
            "eager": lambda: F.relu(bn(conv(x)) + residual),
            "fused:op": lambda: rf.conv_bn_act(x, weight, bias, residual, padding=1),
            "fused:module": lambda: fused(x, residual),
        },
        # training-mode BN + add + ReLU (the running statistics are updated by both, as in a training step)
        "bn_act": {
            "eager": lambda: F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True)
                                    + residual),
            "fused:op": lambda: rf.bn_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, residual,
                                          training=True),
        },
    }
    bn.eval(), fused.eval()  # conv_bn_act: BN folded; bn_act is called in training mode explicitly

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    rows = []
    for op, fns in comparisons.items():
        fns = {name: no_grad(fn) for name, fn in fns.items()}
        expected = fns["eager"]()
        # The same answer first, within a few roundings of the dtype (the eager chain rounds after each op): a
        # guard; the ops' parity is the tests' job.
        tolerance = 8 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-4
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), expected, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"{op} {name}: {m}")
        for provider, timing in measure_side_by_side(fns, device, min_run_time).items():
            rows.append({"op": f"overhead.{op}", "shape": "x".join(map(str, SHAPE)), "provider": provider,
                         "batch": SHAPE[0], "dtype": str(dtype)[6:], "status": "ok", **timing,
                         "throughput": 1e3 / timing["median_ms"], "throughput_unit": "calls/s"})
    return rows
