"""What a run records: the environment stamp, the JSON of every measurement, the markdown table."""
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


def speedups(rows: list[dict]) -> list[dict]:
    """Per shape and fused provider: speedup over the eager chain and over the conv alone."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], {})[row["provider"]] = row
    result = []
    for shape, providers in by_shape.items():
        for provider, row in providers.items():
            if provider in ("eager", "conv_alone"):
                continue
            entry = {"shape": shape, "provider": provider, "status": row["status"]}
            if row["status"] == "ok":
                for baseline in ("eager", "conv_alone"):
                    entry[f"vs_{baseline}"] = providers[baseline]["median_ms"] / row["median_ms"]
            result.append(entry)
    return result


def geometric_means(entries: list[dict]) -> dict[str, dict[str, float]]:
    means: dict[str, dict[str, float]] = {}
    for provider in sorted({e["provider"] for e in entries}):
        ok = [e for e in entries if e["provider"] == provider and e["status"] == "ok"]
        if ok:
            means[provider] = {key: math.exp(sum(math.log(e[key]) for e in ok) / len(ok))
                               for key in ("vs_eager", "vs_conv_alone")}
    return means


def markdown(env: dict, rows: list[dict]) -> str:
    entries = speedups(rows)
    lines = [
        f"# conv + BN (+ add) (+ ReLU): fused vs eager on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, {env['date']}, "
        f"commit {env['git_commit']}",
        "",
        "| shape | provider | median ms | TFLOP/s | vs eager chain | vs conv alone |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    speed = {(e["shape"], e["provider"]): e for e in entries}
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['shape']} | {row['provider']} | wrong result, not timed | | | |")
            continue
        s = speed.get((row["shape"], row["provider"]), {})
        ratio = lambda k: f"{s[k]:.2f}x" if k in s else ""  # noqa: E731
        lines.append(f"| {row['shape']} | {row['provider']} | {row['median_ms']:.3f} | {row['tflops']:.2f} | "
                     f"{ratio('vs_eager')} | {ratio('vs_conv_alone')} |")
    lines += ["", "Geometric mean over the shapes:", "", "| provider | vs eager chain | vs conv alone |",
              "| --- | ---: | ---: |"]
    for provider, mean in geometric_means(entries).items():
        lines.append(f"| {provider} | {mean['vs_eager']:.2f}x | {mean['vs_conv_alone']:.2f}x |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, env: dict, rows: list[dict]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = speedups(rows)
    json_path, md_path = out_dir / "conv_bn_act.json", out_dir / "conv_bn_act.md"
    json_path.write_text(json.dumps({"environment": env, "rows": rows, "speedups": entries,
                                     "geometric_means": geometric_means(entries)}, indent=2) + "\n")
    md_path.write_text(markdown(env, rows))
    return [json_path, md_path]
