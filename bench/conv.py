"""Op level: fused conv + BN (+ add) (+ ReLU) per backend against the eager chain and cuDNN alone."""
import torch
import torch.nn.functional as F

import resnet_fused as rf
from resnet_fused import reference
from resnet_fused.shapes import ConvShape
from resnet_fused.testing import parity

from .timing import measure_side_by_side


class ConvProblem:
    """Inputs of one conv shape: NHWC activations, an eval-mode BN, its folded weights, the residual."""

    def __init__(self, shape: ConvShape, batch: int, size: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.size = shape, size
        make = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
        self.x = make(batch, shape.c_in, size, size).contiguous(memory_format=torch.channels_last)
        self.weight = (make(shape.c_out, shape.c_in, shape.kernel, shape.kernel) * (shape.c_in * shape.kernel**2) ** -0.5
                       ).contiguous(memory_format=torch.channels_last)
        self.bn = torch.nn.BatchNorm2d(shape.c_out).to(device).eval()
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_()
            self.bn.running_mean.normal_(0, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)
        self.bn.to(dtype)
        out = shape.output_size(size)
        self.residual = (make(batch, shape.c_out, out, out).contiguous(memory_format=torch.channels_last)
                         if shape.epilogue == "add_relu" else None)
        self.relu = shape.epilogue != "none"
        self.folded_weight, self.folded_bias = rf.fold_bn(self.weight, None, self.bn)

    def eager(self):
        """The chain eager PyTorch runs: cuDNN conv, BN, add, ReLU, each its own kernel."""
        y = self.bn(F.conv2d(self.x, self.weight, None, self.shape.stride, self.shape.padding))
        if self.residual is not None:
            y = y + self.residual
        return F.relu(y) if self.relu else y

    def conv_alone(self):
        return F.conv2d(self.x, self.folded_weight, None, self.shape.stride, self.shape.padding)

    def fused(self, backend: str):
        return lambda: rf.conv_bn_act(self.x, self.folded_weight, self.folded_bias, self.residual,
                                      stride=self.shape.stride, padding=self.shape.padding, relu=self.relu,
                                      backend=backend)

    def _cuda_args(self):
        return (self.x, self.folded_weight, self.folded_bias, self.residual, [self.shape.stride] * 2,
                [self.shape.padding] * 2, [1, 1], 1)

    def cuda_kernel(self) -> str:
        """The CUDA kernel backend="cuda" picks for this shape (csrc/cuda/conv/conv_dispatch.cpp)."""
        return torch.ops.resnet_fused._cuda_conv_kernel(*self._cuda_args())

    def fused_cuda_with(self, kernel: str):
        """backend="cuda" on a named kernel, to compare the Hopper kernel with its mma.sync fallback."""
        return lambda: torch.ops.resnet_fused._cuda_conv_bn_act_with(*self._cuda_args(), self.relu, kernel)

    def oracle(self):
        """The folded op in float64: what every candidate is checked against."""
        to64 = lambda t: None if t is None else t.double()  # noqa: E731
        return reference.conv_bn_act(to64(self.x), to64(self.folded_weight), to64(self.folded_bias),
                                     to64(self.residual), self.shape.stride, self.shape.padding, relu=self.relu)


# Providers whose output is the block's result, checked against float64 before they are timed (the
# conv alone computes less and is a speed reference only).
CHECKED_PREFIXES = ("fused:", "compile")


def run_shape(shape: ConvShape, batch: int, size: int, dtype: torch.dtype, device: torch.device,
              backends: list[str], min_run_time: float, compile_modes: list[str]) -> list[dict]:
    """One row per provider: the eager chain, the conv alone, torch.compile of the eager chain per mode
    (max-autotune includes Inductor's Triton conv template), and the fused op per backend. An output
    that fails the parity check against float64 is recorded as wrong and never timed."""
    problem = ConvProblem(shape, batch, size, dtype, device)
    flops = shape.flops(batch, size)
    common = {"op": "conv_bn_act", "shape": shape.name, "batch": batch, "size": size, "dtype": str(dtype)[6:],
              "c_in": shape.c_in, "c_out": shape.c_out, "kernel": shape.kernel, "stride": shape.stride,
              "epilogue": shape.epilogue, "flops": flops}
    with torch.no_grad():
        eager_out, oracle = problem.eager(), problem.oracle()
        candidates = [("eager", problem.eager), ("conv_alone", problem.conv_alone)]
        for mode in compile_modes:
            torch._dynamo.reset()  # each mode compiles afresh, not from the previous mode's cache
            candidates.append((f"compile:{mode}", torch.compile(problem.eager, mode=mode)))
        candidates += [(f"fused:{name}", problem.fused(name)) for name in backends]
        kernels = {}
        if "cuda" in backends and device.type == "cuda":
            kernels["fused:cuda"] = problem.cuda_kernel()
            if kernels["fused:cuda"] == "cutlass_sm90":  # the hand-written fallback, side by side
                candidates.append(("fused:cuda[mma_sm80]", problem.fused_cuda_with("mma_sm80")))
                kernels["fused:cuda[mma_sm80]"] = "mma_sm80"
        rows, timed = {}, {}
        for provider, fn in candidates:
            row = {**common, "provider": provider, "throughput_unit": "TFLOP/s"}
            if provider in kernels:
                row["kernel"] = kernels[provider]
            rows[provider] = row
            if provider.startswith(CHECKED_PREFIXES):
                check = parity(fn(), eager_out, oracle)
                row["parity"] = str(check)
                if not check.ok:
                    row["status"] = "wrong"
                    continue
            timed[provider] = fn
        for provider, timing in measure_side_by_side(timed, device, min_run_time).items():
            rows[provider].update(status="ok", **timing, throughput=flops / timing["median_ms"] / 1e9)
    return list(rows.values())
