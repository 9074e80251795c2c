"""What a run records: the environment stamp, the JSON of every measurement, the markdown tables."""
import datetime
import json
import math
import platform
import subprocess
from pathlib import Path

import torch

import resnet_fused as rf


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device) -> dict:
    info = rf.build_info()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": info["triton_version"],
        "resnet_fused_backends": rf.available_backends(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


from .timing import BASELINES


def speedups(rows: list[dict]) -> list[dict]:
    """Per (op, shape) and candidate provider: the speedup over each baseline measured beside it."""
    groups: dict[tuple[str, str, str], dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"]), {})[row["provider"]] = row
    result = []
    for (op, shape, dtype), providers in groups.items():
        for provider, row in providers.items():
            if provider in BASELINES:
                continue
            entry = {"op": op, "shape": shape, "dtype": dtype, "provider": provider, "status": row["status"]}
            if row["status"] == "ok":
                for baseline in BASELINES:
                    if providers.get(baseline, {}).get("status") == "ok":
                        # the median of the interleaved rounds' ratios where the run measured it
                        entry[f"vs_{baseline}"] = row.get(
                            f"vs_{baseline}", providers[baseline]["median_ms"] / row["median_ms"])
            result.append(entry)
    return result


def geometric_means(entries: list[dict]) -> list[dict]:
    """Per (op, dtype, provider): the geometric mean of each speedup over the shapes."""
    means = []
    for op, dtype, provider in sorted({(e["op"], e["dtype"], e["provider"]) for e in entries}):
        ok = [e for e in entries if (e["op"], e["dtype"], e["provider"]) == (op, dtype, provider) and e["status"] == "ok"]
        entry = {"op": op, "dtype": dtype, "provider": provider, "shapes": len(ok)}
        for key in (f"vs_{b}" for b in BASELINES):
            values = [e[key] for e in ok if key in e]
            if values:
                entry[key] = math.exp(sum(math.log(v) for v in values) / len(values))
        means.append(entry)
    return means


def ceiling_for(env: dict, unit: str) -> tuple[float, str] | None:
    """(value, description) of the measured ceiling a throughput in `unit` is a fraction of, if any."""
    c = env["ceilings"]
    return {"TFLOP/s": (c["matmul_tflops"], c["matmul_what"]), "GB/s": (c["copy_gbps"], c["copy_what"])}.get(unit)


def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key]:.2f}x" if key in entry else ""


def memory_markdown(memory_rows: list[dict]) -> list[str]:
    if not memory_rows:
        return []
    lines = ["", "## training activation memory (fused vs torchvision's; parameters not counted)", "",
             "| shape | batch | provider | saved for backward, MB | in block inputs | vs eager | peak fwd+bwd, MB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in memory_rows:
        peak = f"{row['peak_bytes'] / 1e6:.1f}"
        inputs = f"{row['saved_activations']:.2f}" if "saved_activations" in row else ""
        lines.append(f"| {row['shape']} | {row['batch']} | {row['provider']} | {row['saved_bytes'] / 1e6:.2f} | "
                     f"{inputs} | {row['vs_eager']:.2f} | {peak} |")
    return lines


def markdown(env: dict, rows: list[dict], memory_rows: list[dict] = ()) -> str:
    entries = speedups(rows)
    speed = {(e["op"], e["shape"], e["dtype"], e["provider"]): e for e in entries}
    lines = [
        f"# resnet-fused benchmark on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, {env['date']}, "
        f"commit {env['git_commit']}",
        "",
        f"Ceilings measured in this run: {env['ceilings']['copy_gbps']:.0f} GB/s ({env['ceilings']['copy_what']}), "
        f"{env['ceilings']['matmul_tflops']:.1f} TFLOP/s ({env['ceilings']['matmul_what']}).",
    ]
    for op in dict.fromkeys(row["op"] for row in rows):
        op_rows = [row for row in rows if row["op"] == op]
        unit = op_rows[0]["throughput_unit"]
        ceiling = ceiling_for(env, unit)
        fraction_header = f"of {ceiling[1]}" if ceiling else "of a ceiling"
        lines += ["", f"## {op}", "",
                  f"| shape | dtype | provider | median ms | {unit} | {fraction_header} | vs eager | vs conv alone |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in op_rows:
            # the CUDA kernel the row ran, where the backend picks among several
            provider = f"{row['provider']} ({row['kernel']})" if "kernel" in row else row["provider"]
            if row["status"] != "ok":
                lines.append(f"| {row['shape']} | {row['dtype']} | {provider} | wrong result, not timed | | | | |")
                continue
            e = speed.get((op, row["shape"], row["dtype"], row["provider"]), {})
            fraction = f"{row['throughput'] / ceiling[0]:.0%}" if ceiling else ""
            lines.append(f"| {row['shape']} | {row['dtype']} | {provider} | {row['median_ms']:.3f} | "
                         f"{row['throughput']:.2f} | {fraction} | {_ratio(e, 'vs_eager')} | {_ratio(e, 'vs_conv_alone')} |")
    lines += ["", "Ratios: on a CPU, the median of the per-round ratios of providers timed side by side, round after "
              "round; on a GPU, the ratio of do_bench medians.", "",
              "Geometric mean over the shapes:", "", "| op | dtype | provider | vs eager | vs conv alone |",
              "| --- | --- | --- | ---: | ---: |"]
    for mean in geometric_means(entries):
        lines.append(f"| {mean['op']} | {mean['dtype']} | {mean['provider']} | {_ratio(mean, 'vs_eager')} | "
                     f"{_ratio(mean, 'vs_conv_alone')} |")
    peaks = [row for row in rows if row.get("peak_bytes")]
    if peaks:
        lines += ["", "Peak memory (GPU, allocated during one call):", "", "| op | shape | provider | peak MB |",
                  "| --- | --- | --- | ---: |"]
        lines += [f"| {r['op']} | {r['shape']} | {r['provider']} | {r['peak_bytes'] / 1e6:.0f} |" for r in peaks]
    lines += memory_markdown(list(memory_rows))
    return "\n".join(lines) + "\n"


def write(out_dir: Path, env: dict, rows: list[dict], memory_rows: list[dict] = ()) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = speedups(rows)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"environment": env, "rows": rows, "speedups": entries,
                                     "geometric_means": geometric_means(entries), "memory": list(memory_rows)},
                                    indent=2) + "\n")
    md_path.write_text(markdown(env, rows, memory_rows))
    return [json_path, md_path]
