"""Op level, training mode: batch norm (+ add) + ReLU, forward and forward+backward, the fused op per
backend against the eager chain (F.batch_norm, add, ReLU) and torch.compile of it."""
import torch
import torch.nn.functional as F

import resnet_fused as rf
from resnet_fused import reference
from resnet_fused.shapes import RESNET50_CONVS
from resnet_fused.testing import parity

from .timing import measure_side_by_side


def resnet50_bn_shapes() -> list[tuple[str, int, int, bool, bool]]:
    """(name, channels, size, residual, relu) of every distinct BN of ResNet-50: the one after each conv."""
    shapes = {}
    for conv in RESNET50_CONVS:
        residual, relu = conv.epilogue == "add_relu", conv.epilogue != "none"
        name = f"c{conv.c_out}@{conv.output_size()}" + {"add_relu": "+add", "relu": "", "none": " no-relu"}[conv.epilogue]
        shapes[name] = (name, conv.c_out, conv.output_size(), residual, relu)
    return list(shapes.values())


class BNProblem:
    """NHWC activations in `dtype`, float32 BN parameters (as under autocast), training mode."""

    def __init__(self, channels, size, residual, relu, batch, dtype, device, requires_grad):
        make = lambda *s: torch.randn(*s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
        self.x = make(batch, channels, size, size).requires_grad_(requires_grad)
        self.residual = make(batch, channels, size, size).requires_grad_(requires_grad) if residual else None
        self.weight = (torch.rand(channels, device=device) + 0.5).requires_grad_(requires_grad)
        self.bias = torch.randn(channels, device=device).requires_grad_(requires_grad)
        self.running_mean, self.running_var = torch.zeros(channels, device=device), torch.ones(channels, device=device)
        self.relu = relu
        self.grad_out = make(batch, channels, size, size)
        self.inputs = [t for t in (self.x, self.weight, self.bias, self.residual) if t is not None]

    def eager(self, x, weight, bias, residual, running_mean, running_var):
        return reference.bn_act(x, weight, bias, running_mean, running_var, residual, training=True, relu=self.relu)

    def fused(self, backend):
        def run(x, weight, bias, residual, running_mean, running_var):
            return rf.bn_act(x, weight, bias, running_mean, running_var, residual, training=True, relu=self.relu,
                             backend=backend)
        return run

    def args(self, to64=False):
        tensors = (self.x, self.weight, self.bias, self.residual, self.running_mean.clone(), self.running_var.clone())
        if not to64:
            return tensors
        return tuple(None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors)


def bytes_moved(problem: BNProblem, mode: str) -> int:
    """The traffic of the two-pass algorithms. Forward: read x for the statistics, read x (and the
    residual) and write out. Backward: read grad_out, out and x for the sums; read them again and write
    grad_x (and the residual's gradient)."""
    act = problem.x.numel() * problem.x.element_size()
    has_residual = problem.residual is not None
    forward = act * (3 + has_residual)
    backward = act * (7 + has_residual)
    return forward if mode == "forward" else forward + backward


def run_shape(shape, batch: int, dtype, device, backends: list[str], min_run_time: float, compile_modes: list[str],
              modes=("forward", "forward+backward")) -> list[dict]:
    name, channels, size, residual, relu = shape
    rows = []
    for mode in modes:
        problem = BNProblem(channels, size, residual, relu, batch, dtype, device, requires_grad=mode != "forward")
        total_bytes = bytes_moved(problem, mode)
        oracle_args = problem.args(to64=True)

        def results(fn, args):
            out = fn(*args)
            if mode == "forward":
                return [out.detach()]
            inputs = [t for t in args[:4] if t is not None]
            return [out.detach(), *torch.autograd.grad(out, inputs, problem.grad_out.to(out.dtype))]

        oracle = results(problem.eager, oracle_args)
        same_dtype = results(problem.eager, problem.args())
        candidates = [("eager", problem.eager)]
        for compile_mode in compile_modes:
            torch._dynamo.reset()
            candidates.append((f"compile:{compile_mode}", torch.compile(problem.eager, mode=compile_mode)))
        candidates += [(f"fused:{b}", problem.fused(b)) for b in backends]
        mode_rows, steps = {}, {}
        for provider, fn in candidates:
            row = mode_rows[provider] = {
                "op": f"bn_act.{mode}", "shape": name, "provider": provider, "batch": batch, "channels": channels,
                "size": size, "residual": residual, "relu": relu, "dtype": str(dtype)[6:], "bytes": total_bytes,
                "throughput_unit": "GB/s"}
            if provider != "eager":
                checks = [parity(a, t, o) for a, t, o in zip(results(fn, problem.args()), same_dtype, oracle)]
                row["parity"] = "; ".join(map(str, checks))
                if not all(c.ok for c in checks):
                    row["status"] = "wrong"
                    continue
            args = problem.args()
            if mode == "forward":
                def step(fn=fn, args=args):
                    with torch.no_grad():
                        fn(*args)
            else:
                def step(fn=fn, args=args):
                    torch.autograd.grad(fn(*args), problem.inputs, problem.grad_out)
            steps[provider] = step
        for provider, timing in measure_side_by_side(steps, device, min_run_time).items():
            mode_rows[provider].update(status="ok", **timing, throughput=total_bytes / timing["median_ms"] / 1e6)
        rows += mode_rows.values()
    return rows
