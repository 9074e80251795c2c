"""Plain vs residual networks: the degradation problem of deep plain networks, reproduced with rf.models.

    python -m resnet_fused.experiments.plain_vs_residual [--quick] [--out DIR] [--data PATH] ...

trains plain-18, plain-34 (`rf.models.resnet18/34(plain=True)`: no skip connections), ResNet-18 and
ResNet-34 with the same data, batch order, schedule and seed on
  - the built-in synthetic task (resnet_fused.experiments.synthetic: textured shapes, no download), or
  - `--data PATH`: an ImageFolder tree, or CIFAR-10 already on disk (never downloaded),
and records, per net: the training loss of every step, per epoch the training loss and accuracy (running,
over the epoch's batches in training mode) and the held-out loss and accuracy (eval mode), and on the
first batch, before any update, the gradient norm of every conv weight (by depth) and of every block's
output: the signal that reaches each layer at the start of training. It writes results.json,
loss_curves.png, grad_norms.png (and samples.png for the synthetic task) and summary.md to --out, and
prints the summary table. A linear classifier on the pixels is trained on the same split as a reference
for how hard the task is.

The models run on the fused ops with their default backend for the device (`backend=None`: the C++
"cpu" backend on CPU tensors; on a GPU whatever resnet_fused.backends picks), channels_last, float32,
with deterministic algorithms: on a CPU, the same seed and thread count give the same numbers.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused import backends as rf_backends

from . import data as datasets

# key: (label, rf.models factory, plain, depth)
NETS = {
    "plain18": ("plain-18", "resnet18", True, 18),
    "plain34": ("plain-34", "resnet34", True, 34),
    "resnet18": ("ResNet-18", "resnet18", False, 18),
    "resnet34": ("ResNet-34", "resnet34", False, 34),
}


@dataclass
class Config:
    nets: tuple[str, ...] = tuple(NETS)
    epochs: int = 7
    train_size: int | None = 6400
    heldout_size: int | None = 1000
    image_size: int = 32
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    seed: int = 0
    data: str | None = None
    dataset: str = "auto"  # auto | synthetic | folder | cifar10
    device: str = "auto"
    eval_batch_size: int = 250
    quick: bool = False


# The full run (the defaults above: 700 steps per net, 16-17 minutes on a shared 2-core CPU, 1 thread)
# and --quick (90 steps per net, under 3 minutes there). Anything given on the command line overrides either.
QUICK = dict(epochs=3, train_size=1920, heldout_size=500)


# ---------------------------------------------------------------------------------------------------
# training


def build_model(key: str, num_classes: int, seed: int, device: torch.device) -> nn.Module:
    """The net `key` of NETS, initialized from `seed` (torchvision's init), on `device`, channels_last."""
    _, factory, plain, _ = NETS[key]
    torch.manual_seed(seed)
    model = getattr(rf.models, factory)(num_classes=num_classes, plain=plain)  # backend=None: the device's default
    return model.to(device=device, memory_format=torch.channels_last)


def shortcut_inventory(model: nn.Module) -> dict:
    """What the skip connections of `model` consist of: blocks that add a shortcut, downsample modules
    and their parameters. All zero for a plain net."""
    blocks = [m for m in model.modules() if isinstance(m, (rf.nn.BasicBlock, rf.nn.Bottleneck))]
    downsample = [name for name, _ in model.named_modules() if name.endswith(".downsample")]
    return {
        "blocks": len(blocks),
        "blocks_with_shortcut": sum(not b.plain for b in blocks),
        "downsample_modules": len([b for b in blocks if b.downsample is not None]),
        "shortcut_params": sum(p.numel() for name, p in model.named_parameters() if ".downsample." in name),
        "downsample_names": downsample,
    }


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup from base/10 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (0.1 + 0.9 * step / warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _main_path_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convs on the main path, in the order the input meets them (stem, then each block's convs);
    the downsample (shortcut) convs are not on it."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and ".downsample." not in name]


class BlockGradients:
    """Forward hooks that record, for one backward, the gradient norm at the stem's output (after the
    max pool: layer1's input, since a fused stem runs the pool inside its op) and at every block's output,
    in depth order."""

    def __init__(self, model: nn.Module):
        self.names = ["stem"] + [f"{stage}.{i}" for stage in ("layer1", "layer2", "layer3", "layer4")
                                 for i in range(len(getattr(model, stage)))]
        blocks = [getattr(model, n.split(".")[0])[int(n.split(".")[1])] for n in self.names[1:]]
        self.norms: dict[str, float] = {}
        self.handles = [model.layer1.register_forward_pre_hook(lambda module, inputs: self._record("stem", inputs[0]))]
        self.handles += [m.register_forward_hook(lambda module, inputs, output, name=n: self._record(name, output))
                         for n, m in zip(self.names[1:], blocks)]

    def _record(self, name: str, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda g: self.norms.__setitem__(name, float(g.detach().norm())))

    def remove(self):
        for h in self.handles:
            h.remove()


def gradient_record(model: nn.Module, blocks: BlockGradients) -> dict:
    """Gradient norms after the first backward (before any update), by depth."""
    convs = _main_path_convs(model)
    record = {
        "layers": [name for name, _ in convs] + ["fc"],
        "weight_grad_norm": [float(m.weight.grad.norm()) for _, m in convs] + [float(model.fc.weight.grad.norm())],
        "weight_norm": [float(m.weight.detach().norm()) for _, m in convs] + [float(model.fc.weight.detach().norm())],
        "blocks": blocks.names,
        "block_output_grad_norm": [blocks.norms.get(n, float("nan")) for n in blocks.names],
        "shortcut_convs": {name: float(m.weight.grad.norm()) for name, m in model.named_modules()
                           if isinstance(m, nn.Conv2d) and ".downsample." in name},
    }
    record["relative_grad_norm"] = [g / w for g, w in zip(record["weight_grad_norm"], record["weight_norm"])]
    return record


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dataset: datasets.ImageSet,
             batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, labels.numel(), batch_size):
        x = dataset.normalize(images[start:start + batch_size])
        y = labels[start:start + batch_size]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train()
    n = max(1, labels.numel())
    return loss_sum / n, correct / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_net(key: str, dataset: datasets.ImageSet, cfg: Config, device: torch.device, progress: bool,
              log=print) -> dict:
    """Trains one net with cfg's schedule; returns its record (see the module docstring)."""
    from tqdm.auto import tqdm

    label, _, plain, depth = NETS[key]
    model = build_model(key, dataset.num_classes, cfg.seed, device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = dataset.train_y.numel()
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({n} images) is smaller than one batch ({cfg.batch_size})")
    total = steps_per_epoch * cfg.epochs
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    order_gen = torch.Generator().manual_seed(cfg.seed)  # the same batch order for every net

    record = {"label": label, "depth": depth, "plain": plain,
              "params": sum(p.numel() for p in model.parameters()),
              "shortcuts": shortcut_inventory(model),
              "steps_per_epoch": steps_per_epoch, "step_loss": [], "epochs": []}
    initial_loss, initial_acc = evaluate(model, dataset.heldout_x, dataset.heldout_y, dataset, cfg.eval_batch_size)
    record["initial_heldout"] = {"loss": initial_loss, "acc": initial_acc}
    blocks = BlockGradients(model)
    bar = tqdm(total=total, desc=f"{label:>9}", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0, unit="step")
    _sync(device)
    start_time = time.perf_counter()
    step, diverged = 0, None
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=order_gen).to(dataset.train_y.device)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, y = dataset.normalize(dataset.train_x[idx]), dataset.train_y[idx]
            lr = lr_at(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                record["grad_norms"] = gradient_record(model, blocks)
                blocks.remove()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                diverged = step
                break
            optimizer.step()
            record["step_loss"].append(loss_value)
            loss_sum += loss_value * y.numel()
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += y.numel()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}", refresh=False)
        if diverged is not None:
            break
        heldout_loss, heldout_acc = evaluate(model, dataset.heldout_x, dataset.heldout_y, dataset,
                                             cfg.eval_batch_size)
        _sync(device)
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                 "heldout_loss": heldout_loss, "heldout_acc": heldout_acc, "lr_end": lr,
                 "wall_time_s": time.perf_counter() - start_time}
        record["epochs"].append(entry)
        if log is not None:
            line = (f"{label:>9} epoch {epoch + 1}/{cfg.epochs}: train loss {entry['train_loss']:.4f} "
                    f"acc {entry['train_acc']:.3f} | held-out loss {heldout_loss:.4f} acc {heldout_acc:.3f}")
            if progress:
                bar.write(line)
            else:
                log(line)
    bar.close()
    blocks.remove()
    record["diverged_at_step"] = diverged
    record["wall_time_s"] = time.perf_counter() - start_time
    return record


def linear_baseline(dataset: datasets.ImageSet, seed: int, iterations: int = 100) -> dict:
    """Multinomial logistic regression on the standardized pixels (full batch, Adam, small L2): how far
    a model without any spatial structure gets on the same split."""
    torch.manual_seed(seed)
    start = time.perf_counter()

    def features(x):
        return dataset.normalize(x).contiguous().flatten(1).cpu()

    xtr, ytr = features(dataset.train_x), dataset.train_y.cpu()
    xho, yho = features(dataset.heldout_x), dataset.heldout_y.cpu()
    linear = nn.Linear(xtr.shape[1], dataset.num_classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(iterations):
        loss = F.cross_entropy(linear(xtr), ytr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {"model": f"logistic regression on pixels (Adam, {iterations} full-batch steps)",
                "train_loss": float(F.cross_entropy(linear(xtr), ytr)),
                "train_acc": float((linear(xtr).argmax(1) == ytr).float().mean()),
                "heldout_loss": float(F.cross_entropy(linear(xho), yho)),
                "heldout_acc": float((linear(xho).argmax(1) == yho).float().mean()),
                "wall_time_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------
# data, environment, the whole run


def load_dataset(cfg: Config) -> datasets.ImageSet:
    kind = cfg.dataset
    if kind == "auto":
        kind = "synthetic" if cfg.data is None else ("cifar10" if datasets.is_cifar10(cfg.data) else "folder")
    if kind != "synthetic" and cfg.data is None:
        raise ValueError(f"--dataset {kind} needs --data PATH")
    if kind == "synthetic":
        return datasets.synthetic_set(cfg.train_size, cfg.heldout_size, cfg.image_size, cfg.seed)
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"--data {cfg.data!r} is not a directory")
    if kind == "cifar10":
        return datasets.cifar10_set(cfg.data, cfg.train_size, cfg.heldout_size, cfg.image_size, cfg.seed)
    if kind == "folder":
        return datasets.folder_set(cfg.data, cfg.train_size, cfg.heldout_size, cfg.image_size, cfg.seed)
    raise ValueError(f"unknown dataset {kind!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but no CUDA device is visible")
    return device


def environment(device: torch.device) -> dict:
    import torchvision

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "resnet_fused": rf.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # the backend each fused op runs on for these tensors (backend=None, float32)
        "backends": {op: rf_backends.resolve_backend(op, None, device, torch.float32) for op in rf_backends.OPS},
        "memory_format": "channels_last",
        "dtype": "float32",
    }


def run(cfg: Config, out: str | None = None, progress: bool = True, log=print, command: str | None = None) -> dict:
    """Trains every net of cfg.nets; writes results.json, the PNGs and summary.md to `out` (if given);
    returns the results. Deterministic algorithms are switched on for the run (and restored after)."""
    unknown = [k for k in cfg.nets if k not in NETS]
    if unknown:
        raise ValueError(f"unknown nets {unknown}; choose from {', '.join(NETS)}")
    device = resolve_device(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        started = time.perf_counter()
        dataset = load_dataset(cfg)
        log(f"data: {dataset.name}: {dataset.train_y.numel()} train / {dataset.heldout_y.numel()} held-out images, "
            f"{dataset.num_classes} classes, {dataset.image_size}x{dataset.image_size}")
        env = environment(device)
        if command is not None:
            env["command"] = command
        log(f"device: {env['device']} ({env['device_name']}), {env['torch_threads']} threads; fused-op backends: "
            + ", ".join(f"{op}={b}" for op, b in env["backends"].items()))
        baseline = linear_baseline(dataset, cfg.seed)
        dataset.to(device)
        results = {"experiment": "plain_vs_residual", "config": asdict(cfg), "dataset": dataset.summary(),
                   "environment": env, "linear_baseline": baseline, "nets": {}}
        for key in cfg.nets:
            results["nets"][key] = train_net(key, dataset, cfg, device, progress, log)
        results["total_wall_time_s"] = time.perf_counter() - started
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    table = summary_table(results)
    log(table)
    if out is not None:
        write_outputs(results, dataset, out, table)
        log(f"wrote {', '.join(sorted(os.listdir(out)))} to {out}")
    return results


# ---------------------------------------------------------------------------------------------------
# outputs

STYLE = {  # the ResNet paper's convention: depth by colour, plain dashed
    "plain18": dict(color="tab:blue", linestyle="--"),
    "plain34": dict(color="tab:red", linestyle="--"),
    "resnet18": dict(color="tab:blue", linestyle="-"),
    "resnet34": dict(color="tab:red", linestyle="-"),
}


def summary_table(results: dict) -> str:
    rows = [("net", "params", "train loss", "train acc", "held-out loss", "held-out acc", "wall time")]
    for key, r in results["nets"].items():
        last = r["epochs"][-1] if r["epochs"] else None
        if last is None:
            rows.append((r["label"], f"{r['params'] / 1e6:.1f}M", "diverged", "", "", "", f"{r['wall_time_s']:.0f} s"))
            continue
        rows.append((r["label"], f"{r['params'] / 1e6:.1f}M", f"{last['train_loss']:.4f}",
                     f"{100 * last['train_acc']:.1f}%", f"{last['heldout_loss']:.4f}",
                     f"{100 * last['heldout_acc']:.1f}%", f"{r['wall_time_s']:.0f} s"))
    b = results.get("linear_baseline")
    if b:
        rows.append(("linear (pixels)", "", f"{b['train_loss']:.4f}", f"{100 * b['train_acc']:.1f}%",
                     f"{b['heldout_loss']:.4f}", f"{100 * b['heldout_acc']:.1f}%", f"{b['wall_time_s']:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    cfg, ds = results["config"], results["dataset"]
    title = (f"{ds['name']}, {ds['train_size']} train / {ds['heldout_size']} held-out images at {ds['image_size']}px; "
             f"{cfg['epochs']} epochs of batch {cfg['batch_size']}, SGD lr {cfg['lr']} (cosine), seed {cfg['seed']}; "
             f"{results['environment']['device']}. Train loss/acc: the last epoch's running mean (training mode); "
             "held-out: eval mode after the last epoch.")
    return title + "\n\n" + "\n".join(lines)


def _smooth(values: list[float], window: int) -> tuple[list[int], list[float]]:
    """Trailing moving average: (step index, mean of the last `window` values) from the window-th step."""
    if len(values) < window or window <= 1:
        return list(range(len(values))), list(values)
    xs, ys, acc = [], [], sum(values[:window])
    for i in range(window - 1, len(values)):
        if i >= window:
            acc += values[i] - values[i - window]
        xs.append(i)
        ys.append(acc / window)
    return xs, ys


def plot_losses(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6))
    for key, r in results["nets"].items():
        style = STYLE.get(key, {})
        spe = r["steps_per_epoch"]
        xs, ys = _smooth(r["step_loss"], max(1, spe // 4))
        ax_loss.plot([(x + 1) / spe for x in xs], ys, label=r["label"], linewidth=1.6, **style)
        epochs = [e["epoch"] for e in r["epochs"]]
        ax_loss.plot(epochs, [e["train_loss"] for e in r["epochs"]], "o", color=style.get("color"), markersize=3.5)
        ax_acc.plot(epochs, [100 * (1 - e["heldout_acc"]) for e in r["epochs"]], marker="o", markersize=3.5,
                    linewidth=1.8, label=f"{r['label']} held-out", **style)
        ax_acc.plot(epochs, [100 * (1 - e["train_acc"]) for e in r["epochs"]], linewidth=0.8, alpha=0.6, **style)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training cross-entropy (log scale)")
    ax_loss.set_title("training loss (line: moving average over a quarter epoch; dots: epoch mean)", fontsize=9.5)
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("error (%)")
    ax_acc.set_title("error: bold = held-out (eval mode), thin = training (running)", fontsize=9.5)
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8)
    cfg, ds = results["config"], results["dataset"]
    fig.suptitle(f"Plain vs residual on {ds['name']} ({ds['train_size']} train images, {ds['image_size']}px, "
                 f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, seed {cfg['seed']}, "
                 f"{results['environment']['device']})", fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grad_norms(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in results["nets"].values()})
    fig, axes = plt.subplots(2, len(depths), figsize=(6 * len(depths), 8), squeeze=False)
    for col, depth in enumerate(depths):
        ax_w, ax_b = axes[0, col], axes[1, col]
        for key, r in results["nets"].items():
            if r["depth"] != depth or "grad_norms" not in r:
                continue
            g, style = r["grad_norms"], STYLE.get(key, {})
            kind = "plain" if r["plain"] else "residual"
            ax_w.plot(range(1, len(g["weight_grad_norm"]) + 1), g["weight_grad_norm"], marker="o", markersize=3,
                      label=f"{r['label']} ({kind})", **style)
            ax_b.plot(range(len(g["block_output_grad_norm"])), g["block_output_grad_norm"], marker="o", markersize=3,
                      label=f"{r['label']} ({kind})", **style)
        ax_w.set_yscale("log")
        ax_w.set_xlabel(f"layer (1 = stem conv, {depth} = fc)")
        ax_w.set_ylabel("‖∂L/∂W‖ on the first batch")
        ax_w.set_title(f"depth {depth}: weight gradient norm per layer", fontsize=10)
        ax_w.grid(True, which="both", alpha=0.3)
        ax_w.legend()
        ax_b.set_yscale("log")
        ax_b.set_xlabel("block (0 = stem output, then each residual/plain block)")
        ax_b.set_ylabel("‖∂L/∂(block output)‖ on the first batch")
        ax_b.set_title(f"depth {depth}: gradient reaching each block's output", fontsize=10)
        ax_b.grid(True, which="both", alpha=0.3)
        ax_b.legend()
    fig.suptitle("Gradients at the start of training (same first batch, before any update); the loss is at the "
                 "right end, the input at the left", fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(dataset: datasets.ImageSet, path: str, per_class: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = dataset.train_x.cpu(), dataset.train_y.cpu()
    classes = dataset.num_classes
    fig, axes = plt.subplots(classes, per_class, figsize=(1.0 * per_class, 1.1 * classes), squeeze=False)
    for c in range(classes):
        idx = (y == c).nonzero().flatten()[:per_class].tolist()
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(idx):
                ax.imshow(x[idx[j]].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[c, 0].set_title(dataset.classes[c], fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(results: dict, dataset: datasets.ImageSet, out: str, table: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    plot_losses(results, os.path.join(out, "loss_curves.png"))
    plot_grad_norms(results, os.path.join(out, "grad_norms.png"))
    if dataset.name.startswith("synthetic"):
        plot_samples(dataset, os.path.join(out, "samples.png"))


# ---------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m resnet_fused.experiments.plain_vs_residual",
        description="Train plain-18/34 and ResNet-18/34 (rf.models, the fused ops) with the same schedule and seed; "
                    "write results.json, loss_curves.png, grad_norms.png and summary.md.")
    p.add_argument("--quick", action="store_true",
                   help=f"a small setting for a first look (a few minutes on 2 CPU cores): {QUICK}")
    p.add_argument("--out", default="out/plain_vs_residual", help="output folder (default: %(default)s)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="an ImageFolder tree (PATH/<class>/..., or PATH/train + PATH/val), or a folder holding "
                        "cifar-10-batches-py; default: the built-in synthetic task")
    p.add_argument("--dataset", choices=("auto", "synthetic", "folder", "cifar10"), default="auto",
                   help="how to read --data (auto: CIFAR-10 if cifar-10-batches-py is there, else ImageFolder)")
    p.add_argument("--nets", nargs="+", choices=tuple(NETS), default=None, help="default: all four")
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-size", type=int, help="training images (synthetic: generated; else a seeded subset)")
    p.add_argument("--heldout-size", type=int)
    p.add_argument("--image-size", type=int, help=f"pixels (default {defaults.image_size})")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--threads", default="auto",
                   help="torch threads for a CPU run: a number, or auto (default): torch's count, less the cores "
                        "other jobs keep busy (1-minute load average), at least 1. Oversubscribed cores are slow: "
                        "on a loaded 2-core machine 2 threads ran 3x slower than 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    values = asdict(defaults)
    if args.quick:
        values.update(QUICK, quick=True)
    for f in fields(Config):
        given = getattr(args, f.name, None)
        if given is not None and f.name not in ("quick",):
            values[f.name] = tuple(given) if f.name == "nets" else given
    if args.data is not None and args.train_size is None and not args.quick:
        values["train_size"] = values["heldout_size"] = None  # a real data set: all of it unless told
    cfg = Config(**values)
    for name in ("epochs", "batch_size", "image_size", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return cfg, args


def auto_threads() -> int:
    """torch's thread count, less the cores that other processes keep busy (the 1-minute load average,
    read before this run starts computing), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Linux/Unix: torch's choice
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), cores - int(round(busy))))


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads == "auto":
        if resolve_device(cfg.device).type == "cpu":
            torch.set_num_threads(auto_threads())
    else:
        try:
            torch.set_num_threads(max(1, int(args.threads)))
        except ValueError:
            raise SystemExit(f"--threads must be a number or auto, got {args.threads!r}") from None
    try:
        command = " ".join(["python -m resnet_fused.experiments.plain_vs_residual",
                            *(sys.argv[1:] if argv is None else argv)])
        run(cfg, out=args.out, progress=not args.no_progress, command=command)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
