"""The image sets of the experiments, as in-memory uint8 tensors: the synthetic task (resnet_fused.
experiments.synthetic), a folder of images in torchvision's ImageFolder layout, or CIFAR-10 already on
disk (never downloaded).

Everything is loaded once into (N, 3, S, S) uint8 tensors; `ImageSet.normalize` turns a batch into
float32 with the training set's per-channel mean and std. Subsets are drawn with a seeded generator,
so a seed gives the same images in the same order.
"""
import os
from dataclasses import dataclass, field

import torch

from . import synthetic


@dataclass
class ImageSet:
    name: str
    classes: list[str]
    train_x: torch.Tensor  # uint8 (N, 3, S, S)
    train_y: torch.Tensor  # int64 (N,)
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    description: str = ""
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        x = self.train_x.float() / 255.0
        self.mean = x.mean(dim=(0, 2, 3))
        self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def to(self, device) -> "ImageSet":
        for name in ("train_x", "train_y", "heldout_x", "heldout_y", "mean", "std"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float32, standardized per channel, channels_last (the fused ops' fast layout)."""
        x = (x.float() / 255.0 - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        return x.contiguous(memory_format=torch.channels_last)

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "classes": list(self.classes),
                "num_classes": self.num_classes, "image_size": self.image_size,
                "train_size": int(self.train_y.numel()), "heldout_size": int(self.heldout_y.numel()),
                "channel_mean": [round(float(v), 6) for v in self.mean],
                "channel_std": [round(float(v), 6) for v in self.std], **self.source}


def synthetic_set(train_size: int, heldout_size: int, image_size: int, seed: int) -> ImageSet:
    """The textured-shapes task; the held-out images come from an independent stream (seed + 1)."""
    train_x, train_y = synthetic.make_dataset(train_size, image_size, seed=2 * seed)
    heldout_x, heldout_y = synthetic.make_dataset(heldout_size, image_size, seed=2 * seed + 1)
    return ImageSet("synthetic textured shapes", list(synthetic.CLASSES), train_x, train_y, heldout_x, heldout_y,
                    description=synthetic.DESCRIPTION,
                    source={"generator": "resnet_fused.experiments.synthetic.make_dataset"})


def _subset(n: int, size: int | None, g: torch.Generator) -> torch.Tensor:
    """Indices of a seeded random subset of range(n) (all of it, shuffled, when size is None)."""
    order = torch.randperm(n, generator=g)
    return order if size is None else order[:min(size, n)]


def is_cifar10(path: str) -> bool:
    return (os.path.basename(os.path.normpath(path)) == "cifar-10-batches-py"
            or os.path.isdir(os.path.join(path, "cifar-10-batches-py")))


def cifar10_set(path: str, train_size: int | None, heldout_size: int | None, image_size: int,
                seed: int) -> ImageSet:
    """CIFAR-10 from `path` (the folder holding cifar-10-batches-py, or that folder); never downloaded."""
    import torchvision

    root = os.path.dirname(os.path.normpath(path)) if os.path.basename(os.path.normpath(path)) == \
        "cifar-10-batches-py" else path
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=False)
        test = torchvision.datasets.CIFAR10(root, train=False, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(f"no usable CIFAR-10 under {path!r} ({e}); this experiment never downloads it") from e
    g = torch.Generator().manual_seed(seed)

    def take(ds, size):
        idx = _subset(len(ds.targets), size, g)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)[idx]  # uint8 (N, 3, 32, 32)
        if image_size != 32:
            x = torch.nn.functional.interpolate(x.float(), size=(image_size, image_size), mode="bilinear",
                                                antialias=True, align_corners=False).round().clamp(0, 255).byte()
        return x.contiguous(), torch.tensor(ds.targets)[idx]

    train_x, train_y = take(train, train_size)
    heldout_x, heldout_y = take(test, heldout_size)
    return ImageSet("CIFAR-10", list(train.classes), train_x, train_y, heldout_x, heldout_y,
                    description="CIFAR-10 (train split for training, test split held out), no augmentation",
                    source={"path": os.path.abspath(root)})


def folder_set(path: str, train_size: int | None, heldout_size: int | None, image_size: int, seed: int,
               heldout_fraction: float = 0.2) -> ImageSet:
    """A torchvision ImageFolder tree: `path/<class>/<image>`, or `path/train/<class>/...` with
    `path/val/` (or `path/test/`) as the held-out split. Otherwise a seeded `heldout_fraction` of the
    images is held out. Images are resized (shorter side) and center-cropped to image_size."""
    import torchvision
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def load(ds, indices):
        xs, ys = [], []
        for i in indices.tolist():
            img, label = ds[i]
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            xs.append(img[:3])
            ys.append(label)
        if not xs:
            return torch.empty((0, 3, image_size, image_size), dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return torch.stack(xs).contiguous(), torch.tensor(ys)

    def folder(p):
        return torchvision.datasets.ImageFolder(p, transform=transform, loader=_rgb_loader)

    g = torch.Generator().manual_seed(seed)
    split = next((os.path.join(path, s) for s in ("val", "test", "valid") if os.path.isdir(os.path.join(path, s))),
                 None)
    if os.path.isdir(os.path.join(path, "train")) and split is not None:
        train, heldout = folder(os.path.join(path, "train")), folder(split)
        if heldout.classes != train.classes:
            raise ValueError(f"{split} has classes {heldout.classes}, {path}/train has {train.classes}")
        train_idx = _subset(len(train), train_size, g)
        heldout_idx = _subset(len(heldout), heldout_size, g)
        layout = f"train/ and {os.path.basename(split)}/"
    else:
        train = heldout = folder(path)
        order = _subset(len(train), None, g)
        n_heldout = max(1, int(round(heldout_fraction * len(order))))
        heldout_idx, train_idx = order[:n_heldout], order[n_heldout:]
        if heldout_size is not None:
            heldout_idx = heldout_idx[:heldout_size]
        if train_size is not None:
            train_idx = train_idx[:train_size]
        layout = f"one tree, {heldout_fraction:.0%} held out"
    train_x, train_y = load(train, train_idx)
    heldout_x, heldout_y = load(heldout, heldout_idx)
    if len(train.classes) < 2 or train_y.numel() == 0 or heldout_y.numel() == 0:
        raise ValueError(f"{path}: need at least 2 classes and images in both splits "
                         f"(found {len(train.classes)} classes, {train_y.numel()} train, {heldout_y.numel()} held out)")
    return ImageSet(f"ImageFolder {os.path.basename(os.path.normpath(path))}", list(train.classes), train_x, train_y,
                    heldout_x, heldout_y,
                    description=f"images from {path} ({layout}), resized and center-cropped, no augmentation",
                    source={"path": os.path.abspath(path)})


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
