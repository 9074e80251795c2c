"""Prints the conv shape where a fused provider does worst against cuDNN's conv alone, from a results.json
of `python -m bench`: the shape to profile with ncu (bench/gpu_check.sh).

    python -m bench.worst_shape bench/out/results.json [--provider fused:cuda]
"""
import argparse
import json
from pathlib import Path


def worst_shape(rows: list[dict], provider: str) -> str | None:
    """The shape with the lowest conv-alone-time / provider-time ratio among rows timed for both."""
    times = {}
    for row in rows:
        if row.get("op") == "conv_bn_act" and row.get("status") == "ok":
            times.setdefault(row["shape"], {})[row["provider"]] = row["median_ms"]
    ratios = {shape: t["conv_alone"] / t[provider] for shape, t in times.items() if "conv_alone" in t and provider in t}
    return min(ratios, key=ratios.get) if ratios else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worst_shape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--provider", default="fused:cuda")
    args = parser.parse_args(argv)
    shape = worst_shape(json.loads(args.results.read_text())["rows"], args.provider)
    if shape is None:
        raise SystemExit(f"no conv_bn_act shape has timings for both conv_alone and {args.provider}")
    print(shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
