"""python -m bench.coverage: how much of each family model rf.fuse fuses. For every model of
resnet_fused.family: the BatchNorm layers computed inside a fused op, in training and in eval, and the
reason for each one that is not. Writes coverage.md (the README's table) and coverage.json."""
import argparse
import json
from pathlib import Path

import torch

import resnet_fused as rf
from resnet_fused import family


def measure(name: str) -> dict:
    torch.manual_seed(0)
    _, report = rf.fuse(family.build(name), inplace=True, report=True)
    return {"model": name, "bn_layers": len(report.notes["eval"]),
            **{f"fused_{mode}": len(report.fused(mode)) for mode in report.notes},
            **{f"not_fused_{mode}": report.not_fused(mode) for mode in report.notes},
            "with_conv_eval": sum(1 for note in report.notes["eval"].values()  # the blocks' BNs all follow a conv
                                  if note.startswith("fused (conv") or note.startswith("fused (in ")),
            "untraceable": report.untraceable}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | BatchNorm layers | fused, training | fused, eval | of which with their conv | not fused (why) "
             "| modules torch.fx cannot trace |", "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        total = row["bn_layers"]
        share = {mode: f"{row[f'fused_{mode}']} ({100 * row[f'fused_{mode}'] / total:.0f}%)" for mode in ("train", "eval")}
        why = "; ".join(f"`{path}`: {reason}" for path, reason in {**row["not_fused_train"],
                                                                    **row["not_fused_eval"]}.items()) or "none"
        untraceable = "; ".join(f"`{path}` ({error})" for path, error in row["untraceable"].items()) or "none"
        lines.append(f"| {row['model']} | {total} | {share['train']} | {share['eval']} | {row['with_conv_eval']} | "
                     f"{why} | {untraceable} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coverage", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=family.MODELS, default=list(family.MODELS))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = [measure(name) for name in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "coverage.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0 if all(min(r["fused_train"], r["fused_eval"]) >= 0.95 * r["bn_layers"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
