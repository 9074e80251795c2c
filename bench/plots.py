"""PNG plots of a run, one per op: speedup over the eager chain per shape and provider, and the
fraction of the measured ceiling (matmul TFLOP/s for convs, copy GB/s for BN) each reaches."""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import ceiling_for, speedups  # noqa: E402


def _grouped_bars(ax, shapes, series: dict[str, list[float]], colors: dict[str, str], ylabel: str,
                  reference_line: float | None):
    width = 0.8 / max(len(series), 1)
    for i, (provider, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(shapes))], values, width, label=provider, color=colors[provider])
    if reference_line is not None:
        ax.axhline(reference_line, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(shapes))], shapes, rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def write(out_dir: Path, env: dict, rows: list[dict]) -> list[Path]:
    paths = []
    entries = speedups(rows)
    for op in dict.fromkeys(row["op"] for row in rows):
        op_rows = [r for r in rows if r["op"] == op]
        several_dtypes = len({r["dtype"] for r in op_rows}) > 1

        def label(r):  # the bar group: the shape, and its dtype where the run has several
            return f"{r['shape']} {r['dtype']}" if several_dtypes else r["shape"]

        shapes = list(dict.fromkeys(label(r) for r in op_rows))
        providers = [p for p in dict.fromkeys(r["provider"] for r in op_rows) if p not in ("eager", "conv_alone")]
        speed = {(label(e), e["provider"]): e.get("vs_eager", 0.0) for e in entries if e["op"] == op}
        timed = {(label(r), r["provider"]): r for r in op_rows if r["status"] == "ok"}
        ceiling = ceiling_for(env, op_rows[0]["throughput_unit"])

        everyone = ["eager"] + providers
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {p: palette[i % len(palette)] for i, p in enumerate(everyone)}  # one color per provider
        fig, axes = plt.subplots(2 if ceiling else 1, 1, figsize=(max(8, len(shapes) * 0.6), 8 if ceiling else 4.5),
                                 constrained_layout=True, squeeze=False)
        top = axes[0][0]
        _grouped_bars(top, shapes, {p: [speed.get((s, p), 0.0) for s in shapes] for p in providers}, colors,
                      "speedup over the eager chain (x)", 1.0)
        top.set_title(f"{op} on {env['device']} ({env['date'][:10]}, torch {env['torch']})", fontsize=9)
        if ceiling:
            _grouped_bars(axes[1][0], shapes,
                          {p: [timed[(s, p)]["throughput"] / ceiling[0] if (s, p) in timed else 0.0 for s in shapes]
                           for p in everyone}, colors,
                          f"fraction of {ceiling[1]}", None)
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", op) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
