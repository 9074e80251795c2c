"""python -m bench: is fused faster than eager PyTorch, and by how much, on this machine?

Compares, for ResNet-50's conv shapes, the fused conv + BN (+ add) (+ ReLU) of every available backend
with the eager chain (conv, BN, add, ReLU as separate kernels) and with the conv alone. Every fused
output is checked against a float64 reference before it is timed.
"""
import argparse
from pathlib import Path

import torch
from tqdm import tqdm

import resnet_fused as rf

from . import report
from .conv import run_shape
from resnet_fused.shapes import RESNET50_CONVS

# --quick: one shape of each kind, small enough for a CPU in seconds.
QUICK_NAMES = ("stem", "l1.conv3x3", "l1.expand", "l2.downsample", "l3.conv3x3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_backends(device: torch.device) -> list[str]:
    """Every backend with a conv kernel that runs natively on the device (the Triton interpreter on a
    CPU is a correctness tool, not a speed one, so it is left out unless asked for)."""
    names = []
    for name in rf.available_backends():
        native = {"cpu": device.type == "cpu", "cuda": device.type == "cuda", "triton": device.type == "cuda",
                  "reference": True}[name]
        if native and rf.backends.has_kernel("conv_bn_act", name):
            names.append(name)
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="five shapes at a quarter of the resolution, batch 2: a few seconds to minutes on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--batch", type=int, help="default: 256 on a GPU, 8 on a CPU (2 with --quick)")
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help="ResNet-50 conv shapes by name (see resnet_fused/shapes.py)")
    parser.add_argument("--backends", nargs="+", choices=rf.backends.BACKENDS,
                        help="fused backends to compare (default: all that run natively here)")
    parser.add_argument("--compile", nargs="*", metavar="MODE", dest="compile_modes",
                        help="torch.compile modes of the eager chain to compare (default on a GPU: default "
                             "max-autotune; on a CPU: none). Give no MODE to disable")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per case on a CPU")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the JSON and markdown")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch = args.batch or (2 if args.quick else 256 if device.type == "cuda" else 8)
    names = args.shapes or (QUICK_NAMES if args.quick else [s.name for s in RESNET50_CONVS])
    unknown = set(names) - {s.name for s in RESNET50_CONVS}
    if unknown:
        raise SystemExit(f"unknown shapes: {', '.join(sorted(unknown))}")
    shapes = [s for s in RESNET50_CONVS if s.name in names]
    backends = args.backends or default_backends(device)
    compile_modes = args.compile_modes if args.compile_modes is not None else (
        ["default", "max-autotune"] if device.type == "cuda" else [])
    env = report.environment(device)
    print(f"{env['device']} | torch {env['torch']} | {str(dtype)[6:]} | batch {batch} | "
          f"backends: {', '.join(backends)} | compile: {', '.join(compile_modes) or 'none'}")

    rows = []
    for shape in tqdm(shapes, desc="conv shapes", disable=len(shapes) < 2):
        size = shape.size // 4 if args.quick else shape.size
        for row in run_shape(shape, batch, size, dtype, device, backends, args.min_run_time, compile_modes):
            rows.append(row)
            timing = f"{row['median_ms']:9.3f} ms {row['tflops']:7.2f} TFLOP/s" if row["status"] == "ok" else "  WRONG RESULT, not timed"
            tqdm.write(f"{shape.name:18s} {row['provider']:22s} {timing}")
    paths = report.write(args.out, env, rows)
    print()
    print(report.markdown(env, rows))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r["status"] == "wrong" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
