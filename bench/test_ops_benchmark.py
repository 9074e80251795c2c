"""pytest-benchmark suite of op-level cases: `pytest bench/ --benchmark-only` (not part of `pytest tests`).

Each case's output is checked against float64 first, so a wrong kernel fails instead of being timed.
On a CPU the shapes run at a quarter of the resolution, batch 2; on a GPU at full size, batch 32, bf16."""
import pytest
import torch

import resnet_fused as rf
from resnet_fused.shapes import RESNET50_CONVS
from resnet_fused.testing import parity

from .__main__ import default_backends
from .conv import ConvProblem

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = 32 if GPU else 2
SHAPES = [s for s in RESNET50_CONVS if s.name in ("stem", "l1.conv3x3", "l1.expand", "l3.conv3x3", "l4.expand")]
PROVIDERS = ["eager", "conv_alone"] + [f"fused:{b}" for b in default_backends("conv_bn_act", DEVICE)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_conv_bn_act(benchmark, shape, provider):
    problem = ConvProblem(shape, BATCH, shape.size if GPU else shape.size // 4, DTYPE, DEVICE)
    if provider == "eager":
        fn = problem.eager
    elif provider == "conv_alone":
        fn = problem.conv_alone
    else:
        fn = problem.fused(provider.split(":")[1])
        with torch.no_grad():
            check = parity(fn(), problem.eager(), problem.oracle())
        assert check.ok, f"{provider} on {shape.name}: {check}"

    def run():
        with torch.no_grad():
            fn()
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape=shape.name, provider=provider, flops=shape.flops(BATCH),
                                backends=rf.available_backends())
    benchmark(run)
