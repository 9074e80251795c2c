"""python -m bench: is fused faster than eager PyTorch, and by how much, on this machine?

Op level, for ResNet-50's and ResNet-18's conv shapes: the fused conv + BN (+ add) (+ ReLU) of every
available backend against the eager chain (conv, BN, add, ReLU as separate kernels), the conv alone and
torch.compile;
the fused training-mode BN (+ add) + ReLU, forward and forward+backward, against eager and
torch.compile. Every candidate is checked against a float64 reference before it is timed.
"""
import argparse
from pathlib import Path

import torch
from tqdm import tqdm

import resnet_fused as rf

from . import bn, conv, family, memory, models, overhead, plots, report, traffic
from .ceilings import measure_ceilings
from resnet_fused.family import MODELS as FAMILY_MODELS
from resnet_fused.shapes import RESNET18_CONVS, RESNET50_CONVS

# --quick: one shape of each kind; at a quarter of the resolution on a GPU, at full resolution on a CPU, where
# smaller tensors would measure the per-call overhead rather than the kernels.
QUICK_NAMES = ("stem", "l1.conv3x3", "l1.expand", "l2.downsample", "l3.conv3x3")
QUICK_BN_NAMES = ("c64@56", "c256@56+add", "c512@28 no-relu")
CONV_SHAPES = RESNET50_CONVS + RESNET18_CONVS  # ResNet-50's first: the targets are set on them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


OPS = ("conv", "bn", "overhead", "memory", "models", "traffic", "family")  # family: only when asked for (16 models)


def default_backends(op: str, device: torch.device) -> list[str]:
    """Every backend with a kernel for `op` that runs natively on the device (the Triton interpreter on a
    CPU is a correctness tool, not a speed one, so it is left out unless asked for)."""
    names = []
    for name in rf.available_backends():
        native = {"cpu": device.type == "cpu", "cuda": device.type == "cuda", "triton": device.type == "cuda",
                  "reference": True}[name]
        if native and rf.backends.has_kernel(op, name):
            names.append(name)
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS[:-1]), help="which comparisons to run")
    parser.add_argument("--quick", action="store_true",
                        help="a few op shapes at batch 2 (a quarter of the resolution on a GPU), and the models without "
                             "torch.compile: under a minute on a 2-core CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES,
                        help="default: bfloat16 on a GPU; on a CPU float32, and bfloat16 too without --quick")
    parser.add_argument("--batch", type=int, help="default: 256 on a GPU, 8 on a CPU (2 with --quick, except "
                                                  "the models on a CPU)")
    parser.add_argument("--shapes", nargs="+", metavar="NAME",
                        help="ResNet-50/18 conv shapes by name (see resnet_fused/shapes.py) for the conv comparison "
                             "(default: all of them)")
    parser.add_argument("--backends", nargs="+", choices=rf.backends.BACKENDS,
                        help="fused backends to compare (default: all that run natively here; for the models, "
                             "the ops' default choice)")
    parser.add_argument("--models", nargs="+", choices=models.DEPTHS,
                        help="ResNets for the model-level comparison (default: resnet50 on a GPU, resnet18 on a CPU)")
    parser.add_argument("--family-models", nargs="+", choices=FAMILY_MODELS, default=list(FAMILY_MODELS),
                        help="models for --ops family: each as built against rf.fuse of it")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="model level: also time each eager and fused model replayed from a CUDA graph")
    parser.add_argument("--image-size", type=int,
                        help="model-level input size (default 224; 64 with --quick on a GPU); on a CPU the training "
                             "step runs at half of it")
    parser.add_argument("--compile", nargs="*", metavar="MODE", dest="compile_modes",
                        help="torch.compile modes of the eager chain to compare (default on a GPU: default "
                             "max-autotune; on a CPU: default, for the models only, and none with --quick: compiling "
                             "a ResNet-50 takes minutes there). Give no MODE to disable")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per case on a CPU")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for results.json and results.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("--cuda-graphs needs a CUDA device")
    cpu = device.type == "cpu"
    dtype_names = args.dtype or (["bfloat16"] if not cpu else ["float32"] if args.quick else ["float32", "bfloat16"])
    dtypes = [DTYPES[name] for name in dtype_names]
    dtype = dtypes[0]
    batch = args.batch or (2 if args.quick else 8 if cpu else 256)
    names = args.shapes or (QUICK_NAMES if args.quick else [s.name for s in CONV_SHAPES])
    unknown = set(names) - {s.name for s in CONV_SHAPES}
    if unknown:
        raise SystemExit(f"unknown shapes: {', '.join(sorted(unknown))}")
    shapes = [s for s in CONV_SHAPES if s.name in names]
    default_compile = ["default", "max-autotune"] if not cpu else [] if args.quick else ["default"]
    compile_modes = args.compile_modes if args.compile_modes is not None else default_compile
    # On a CPU, torch.compile of single ops is not what a user compares (and costs minutes): the models only.
    op_compile_modes = compile_modes if args.compile_modes is not None or not cpu else []
    env = report.environment(device)
    env["ceilings"] = measure_ceilings(device, dtype, args.quick)
    print(f"{env['device']} | torch {env['torch']} | {', '.join(dtype_names)} | batch {batch} | "
          f"compile: {', '.join(compile_modes) or 'none'}")
    print(f"ceilings: {env['ceilings']['copy_gbps']:.0f} GB/s ({env['ceilings']['copy_what']}), "
          f"{env['ceilings']['matmul_tflops']:.1f} TFLOP/s ({env['ceilings']['matmul_what']})")

    # (op, shape name, function returning its rows)
    jobs = []
    for dtype in dtypes:
        label = f" {str(dtype)[6:]}" if len(dtypes) > 1 else ""
        if "conv" in args.ops:
            backends = args.backends or default_backends("conv_bn_act", device)
            for shape in shapes:
                size = shape.size // 4 if args.quick and not cpu else shape.size  # CPU: overhead-bound below
                jobs.append((shape.name + label, lambda shape=shape, size=size, dtype=dtype: conv.run_shape(
                    shape, batch, size, dtype, device, backends, args.min_run_time, op_compile_modes)))
        if "bn" in args.ops:
            backends = args.backends or default_backends("bn_act", device)
            bn_shapes = bn.resnet50_bn_shapes()
            if args.quick:
                bn_shapes = [(n, c, s if cpu else s // 4, r, a) for n, c, s, r, a in bn_shapes if n in QUICK_BN_NAMES]
            for shape in bn_shapes:
                jobs.append((shape[0] + label, lambda shape=shape, dtype=dtype: bn.run_shape(
                    shape, batch, dtype, device, backends, args.min_run_time, op_compile_modes)))
        if "overhead" in args.ops:
            jobs.append(("overhead" + label, lambda dtype=dtype: overhead.run(dtype, device, args.min_run_time)))
        if "models" in args.ops:
            # On a CPU: ResNet-50 inference at batch 8, 224 px, and its training step at 112 px, what a CPU user
            # would run; on a GPU, --quick shrinks them.
            depths = args.models or ["resnet50"]
            image_size = args.image_size or (64 if args.quick and not cpu else 224)
            model_batch = args.batch or (8 if cpu else 2 if args.quick else 256)
            for depth in depths:
                jobs.append((depth + label, lambda depth=depth, dtype=dtype: models.run_model(
                    depth, model_batch, image_size, dtype, device, compile_modes, args.min_run_time,
                    backends=args.backends or [None], cuda_graphs=args.cuda_graphs,
                    train_size=image_size // 2 if cpu else None)))
        if "family" in args.ops:
            image_size = args.image_size or (64 if args.quick else 224)
            for name in args.family_models:
                jobs.append((name + label, lambda name=name, dtype=dtype: family.run_family_model(
                    name, batch, image_size, dtype, device, args.min_run_time, backend=(args.backends or [None])[0])))

    rows = []
    for name, job in tqdm(jobs, desc="shapes", disable=len(jobs) < 2):
        for row in job():
            rows.append(row)
            timing = (f"{row['median_ms']:9.3f} ms {row['throughput']:8.2f} {row['throughput_unit']}"
                      if row["status"] == "ok" else "  WRONG RESULT, not timed")
            tqdm.write(f"{row['op']:26s} {name:18s} {row['provider']:22s} {timing}")
            report.write(args.out, env, rows)  # after every row, so a run cut short keeps what it measured
    memory_rows = []
    if "memory" in args.ops:
        memory_backends = args.backends or default_backends("bn_act", device)
        memory_rows = memory.run(batch, 14 if args.quick else 56, dtype, device, memory_backends,
                                 model_size=args.image_size or (64 if args.quick else 224))
    paths = report.write(args.out, env, rows, memory_rows)
    paths += plots.write(args.out, env, rows)
    print()
    print(report.markdown(env, rows, memory_rows))
    if "traffic" in args.ops:
        print(traffic.report(batch, torch.empty((), dtype=dtype).element_size()))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r["status"] == "wrong" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
