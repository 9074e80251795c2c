"""Bytes moved per training step of ResNet-50's Bottlenecks, today's fused path (conv, then bn_act's statistics
and apply passes) against the conv_stats path (BN statistics in the conv's epilogue, BN + ReLU in the next
conv's prologue), computed from the shapes, so it holds without a GPU; and the bytes each path keeps for
the backward, measured with saved-tensor hooks (the same on any device).

The model counts activation traffic to and from DRAM: every pass reads each of its input activations and
writes each of its outputs once (a conv reads its input once: perfect on-chip reuse; weights, BN parameters
and statistics are left out, being small). Each step below is one kernel's pass:

today (training, fused backend, BN + ReLU recomputed inside the next conv's op):
    forward, per conv i: conv reads its input, writes y_i; BN_i reads y_i (statistics), reads y_i (+ the
    shortcut) and writes a_i (apply); the next conv reads a_i.
    backward, per BN: reduce reads grad, y (+ the ReLU's mask source), apply reads them again and writes
    grad_y (the last BN also the shortcut's gradient); a recomputed BN + ReLU reads y_i and writes a_i;
    per conv: data gradient reads grad_y, writes grad_in; weight gradient reads grad_y and the input.
conv_stats:
    forward, per conv: reads its input (the previous y; BN + ReLU applied on load), writes y_i; the exit reads
    y_3 and the shortcut (y_d or x) and writes the output.
    backward: the exit reads grad, y_3, the shortcut, writes grad_y3 (and grad_yd or the shortcut's grad);
    per conv: the statistics' gradient folded into grad_y (reads grad_y, y_i, writes grad_acc), z recomputed
    (reads the input, writes z), data gradient (reads grad_acc, writes grad_z), weight gradient (reads
    grad_acc, z), prologue gradient (reads grad_z and the input, writes grad_in).
The conv_stats backward is counted as those passes; today it runs as several PyTorch ops per pass (more
traffic), as does the exit's backward (its forward is one Triton pass): fusing them is what the model counts.
"""
import contextlib
from dataclasses import dataclass

import torch

import resnet_fused as rf

from .memory import saved_bytes


@dataclass(frozen=True)
class BottleneckShape:
    name: str
    c_in: int
    width: int
    stride: int
    size: int  # input height = width
    count: int  # how many such blocks ResNet-50 has

    @property
    def downsample(self) -> bool:
        return self.stride != 1 or self.c_in != 4 * self.width


# ResNet-50 (v1.5: stride on the 3x3 conv) at 224x224: the first block of each stage, then the others.
RESNET50_BOTTLENECKS = [
    BottleneckShape("layer1.0", 64, 64, 1, 56, 1),
    BottleneckShape("layer1.x", 256, 64, 1, 56, 2),
    BottleneckShape("layer2.0", 256, 128, 2, 56, 1),
    BottleneckShape("layer2.x", 512, 128, 1, 28, 3),
    BottleneckShape("layer3.0", 512, 256, 2, 28, 1),
    BottleneckShape("layer3.x", 1024, 256, 1, 14, 5),
    BottleneckShape("layer4.0", 1024, 512, 2, 14, 1),
    BottleneckShape("layer4.x", 2048, 512, 1, 7, 2),
]


def _elements(shape: BottleneckShape, batch: int) -> dict:
    """Element counts of the block's activations (gradients have the same sizes)."""
    out = shape.size // shape.stride
    n = {"x": shape.c_in * shape.size**2, "y1": shape.width * shape.size**2, "y2": shape.width * out**2,
         "y3": 4 * shape.width * out**2}
    n["yd"] = n["y3"] if shape.downsample else 0
    return {k: batch * v for k, v in n.items()}


def today_passes(e: dict) -> dict:
    """(reads, writes) in elements per phase of today's fused path."""
    x, y1, y2, y3, yd = e["x"], e["y1"], e["y2"], e["y3"], e["yd"]
    shortcut = yd if yd else x
    forward = [
        (x, y1),  # conv1
        (y1, 0), (y1, y1),  # BN1 statistics, apply + ReLU
        (y1, y2),  # conv2
        (y2, 0), (y2, y2),  # BN2
        (y2, y3),  # conv3
        (y3, 0), (y3 + shortcut, y3),  # BN3 statistics, apply + shortcut + ReLU
    ]
    if yd:
        forward += [(x, yd), (yd, 0), (yd, yd)]  # downsample conv, its BN (no ReLU)
    backward = [
        (3 * y3, 0), (3 * y3, 2 * y3),  # BN3 reduce (grad, output for the mask, y3), apply (grad_y3, grad_shortcut)
        (y2, y2),  # BN2 + ReLU recomputed for conv3's weight gradient
        (y3, y2), (y3 + y2, 0),  # conv3 data, weight gradient
        (3 * y2, 0), (3 * y2, y2),  # BN2 reduce (grad, a2, y2), apply
        (y1, y1),  # BN1 + ReLU recomputed
        (y2, y1), (y2 + y1, 0),  # conv2
        (3 * y1, 0), (3 * y1, y1),  # BN1
        (y1, x), (y1 + x, 0),  # conv1
    ]
    if yd:
        backward += [(2 * yd, 0), (2 * yd, yd), (yd, x), (yd + x, 0), (2 * x, x)]  # BN_d, conv_d, grad_x sum
    else:
        backward += [(2 * x, x)]  # grad_x + the shortcut's gradient
    return {"forward": forward, "backward": backward}


def conv_stats_passes(e: dict) -> dict:
    """(reads, writes) in elements per phase of the conv_stats path."""
    x, y1, y2, y3, yd = e["x"], e["y1"], e["y2"], e["y3"], e["yd"]
    shortcut = yd if yd else x
    forward = [(x, y1), (y1, y2), (y2, y3), (y3 + shortcut, y3)]  # conv1..3, exit
    if yd:
        forward.insert(3, (x, yd))

    def conv_backward(source, y, prologue):
        steps = [(2 * y, y)]  # statistics' gradient folded into grad_y
        if prologue:
            steps += [(source, source)]  # z recomputed
        steps += [(y, source), (y + source, 0)]  # data, weight gradient
        if prologue:
            steps += [(2 * source, source)]  # through BN + ReLU to the input
        return steps

    backward = [(y3 + y3 + shortcut, y3 + shortcut)]  # the exit
    backward += conv_backward(y2, y3, True) + conv_backward(y1, y2, True) + conv_backward(x, y1, False)
    if yd:
        backward += conv_backward(x, yd, False)
    backward += [(2 * x, x)]  # grad_x + the shortcut's gradient
    return {"forward": forward, "backward": backward}


def bytes_moved(shape: BottleneckShape, batch: int, element_size: int) -> dict:
    """{path: {phase: bytes}} for one block."""
    e = _elements(shape, batch)
    result = {}
    for path, passes in (("today", today_passes(e)), ("conv_stats", conv_stats_passes(e))):
        result[path] = {phase: element_size * sum(r + w for r, w in steps) for phase, steps in passes.items()}
        result[path]["step"] = result[path]["forward"] + result[path]["backward"]
    return result


@contextlib.contextmanager
def _conv_stats_blocks(backend: str):
    """Blocks on `backend` train on conv_stats inside (for measuring that path where it is not the default)."""
    from resnet_fused.nn import fused
    saved = fused.CONV_STATS_BACKENDS
    fused.CONV_STATS_BACKENDS = (backend,)
    try:
        yield
    finally:
        fused.CONV_STATS_BACKENDS = saved


def saved_for_backward(batch: int, size: int, dtype: torch.dtype, backend: str) -> dict:
    """Bytes kept for the backward by ResNet-50's layer1.1 Bottleneck (256 -> 64 -> 256) on `backend` (CPU
    tensors), today's path and the conv_stats path, in units of the block's input."""
    torch.manual_seed(0)
    block = rf.nn.Bottleneck(256, 64, backend=backend).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 256, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = list(block.parameters())
    today = saved_bytes(block, x, exclude=params)
    with _conv_stats_blocks(backend):
        stats = saved_bytes(block, x, exclude=params)
    unit = x.numel() * x.element_size()
    return {"today": today / unit, "conv_stats": stats / unit}


def report(batch: int = 256, element_size: int = 2) -> str:
    """A markdown table of bytes moved per training step (bf16: element_size 2), one Bottleneck and the 16 of
    ResNet-50, and the saved-for-backward ratio measured on a small CPU batch."""
    lines = [f"Bytes moved per training step, batch {batch}, {8 * element_size}-bit activations (GB):", "",
             "| block | today fwd | today bwd | today step | conv_stats fwd | conv_stats bwd | conv_stats step "
             "| step ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    totals = {"today": dict.fromkeys(("forward", "backward", "step"), 0),
              "conv_stats": dict.fromkeys(("forward", "backward", "step"), 0)}
    for shape in RESNET50_BOTTLENECKS:
        moved = bytes_moved(shape, batch, element_size)
        for path in totals:
            for phase in totals[path]:
                totals[path][phase] += shape.count * moved[path][phase]
        if shape.name == "layer1.x":
            lines.append(_row("Bottleneck 256-64-256 @56", moved))
    lines.append(_row("ResNet-50, 16 Bottlenecks", totals))
    backend = rf.backends.resolve_backend("conv_stats", None, torch.device("cpu"), torch.float32)
    saved = saved_for_backward(2, 14, torch.float32, backend)
    lines += ["", f"Saved for backward (Bottleneck 256-64-256, backend {backend}, in block inputs): "
                  f"today {saved['today']:.3f}, conv_stats {saved['conv_stats']:.3f}"]
    return "\n".join(lines)


def _row(name, moved):
    t, s = moved["today"], moved["conv_stats"]
    gb = lambda v: f"{v / 1e9:.2f}"  # noqa: E731
    return (f"| {name} | {gb(t['forward'])} | {gb(t['backward'])} | {gb(t['step'])} | {gb(s['forward'])} | "
            f"{gb(s['backward'])} | {gb(s['step'])} | {s['step'] / t['step']:.2f} |")
