"""A synthetic image-classification task, generated deterministically (no download): "textured shapes".

Each image shows one object on a cluttered background; the class is the *conjunction* of the object's
shape and its fill:

    class = 2 * shape + fill,   shape in (disk, square, triangle, plus, ring),  fill in (solid, striped)

so 10 classes. Everything else is a nuisance drawn at random per image: the object's position, size,
rotation and colour; the stripes' orientation, period and phase; the background colour, its linear
shading and a faint grating; a small distractor blob (solid or striped) anywhere in the image; pixel
noise. Neither cue alone decides the class: texture detectors must be combined with a shape that spans
a third of the image at an arbitrary position, rotation and scale, and the striped distractor and the
background grating put stripes in images of "solid" classes too. A linear classifier on the pixels is
near chance (the experiment measures it), while a convolutional network can learn it.

Images are uint8 (N, 3, S, S), labels int64 (N,), exactly balanced; the same (n, size, seed) gives the
same tensors on every CPU (one torch.Generator, float32 arithmetic, no threading-dependent reduction).
"""
import math

import torch

SHAPES = ("disk", "square", "triangle", "plus", "ring")
FILLS = ("solid", "striped")
CLASSES = tuple(f"{fill} {shape}" for shape in SHAPES for fill in FILLS)
NUM_CLASSES = len(CLASSES)
DESCRIPTION = ("10 classes = shape (disk, square, triangle, plus, ring) x fill (solid, striped); random position, "
               "size, rotation, colours, stripe orientation/period, shaded background with a faint grating, a "
               "small solid-or-striped distractor blob, Gaussian pixel noise")

_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _uniform(g: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


def _shape_sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in units of the object's radius; < 0 inside) of each image's shape at the
    object-frame coordinates (u, v): (B, S, S)."""
    r = torch.sqrt(u * u + v * v)
    disk = r - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.82
    # equilateral triangle with circumradius 1.15 (three half-planes, one edge at the bottom)
    tri = None
    for k in range(3):
        angle = math.pi / 2 + 2 * math.pi * k / 3
        half = u * math.cos(angle) + v * math.sin(angle) - 0.575
        tri = half if tri is None else torch.maximum(tri, half)
    bar_h = torch.maximum(u.abs() - 1.0, v.abs() - 0.36)
    bar_v = torch.maximum(v.abs() - 1.0, u.abs() - 0.36)
    plus = torch.minimum(bar_h, bar_v)
    ring = (r - 0.72).abs() - 0.30
    all_sdf = torch.stack([disk, square, tri, plus, ring])  # (5, B, S, S)
    return all_sdf.gather(0, shape.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def _stripes(g: torch.Generator, b: int, x: torch.Tensor, y: torch.Tensor, period_px: tuple[float, float],
             scale: float) -> torch.Tensor:
    """A soft square wave in [0, 1] with random orientation, period and phase per image: (B, S, S)."""
    theta = _uniform(g, (b, 1, 1), 0, math.pi)
    period = _uniform(g, (b, 1, 1), *period_px) * scale
    phase = _uniform(g, (b, 1, 1), 0, 2 * math.pi)
    t = (x * torch.cos(theta) + y * torch.sin(theta)) * (2 * math.pi / period) + phase
    return 0.5 + 0.5 * torch.tanh(3.0 * torch.sin(t))


def _contrasting_colour(g: torch.Generator, b: int, luma: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Random colours whose luminance differs from `luma` (B,) by low..high, away from the nearer end."""
    colour = torch.rand((b, 3), generator=g)
    direction = torch.where(luma < 0.5, 1.0, -1.0)
    target = (luma + direction * _uniform(g, (b,), low, high)).clamp(0.0, 1.0)
    colour = colour - (colour @ _LUMA - target).unsqueeze(1)
    return colour.clamp(0.0, 1.0)


def _render(g: torch.Generator, labels: torch.Tensor, size: int, noise: float) -> torch.Tensor:
    b = labels.numel()
    s = size / 32.0  # every length below is in pixels of a 32x32 image
    shape, striped = labels // 2, (labels % 2).float().view(b, 1, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(b, size, size), y.expand(b, size, size)
    aa = 0.6 * s  # edge softness (anti-aliasing), pixels

    # background: a colour, linear shading, a faint grating
    bg = torch.rand((b, 3), generator=g) * 0.8 + 0.1
    gdir = _uniform(g, (b, 1, 1), 0, 2 * math.pi)
    shade = ((x - size / 2) * torch.cos(gdir) + (y - size / 2) * torch.sin(gdir)) / size
    shade = shade * _uniform(g, (b, 1, 1), 0.0, 0.5)
    grating = (_stripes(g, b, x, y, (2.5, 6.0), s) - 0.5) * _uniform(g, (b, 1, 1), 0.0, 0.14)
    img = bg.view(b, 3, 1, 1) + (shade + grating).unsqueeze(1)

    # the object: shape, pose, colour, fill
    luma_bg = bg @ _LUMA
    cx = _uniform(g, (b, 1, 1), 10.0, 22.0) * s
    cy = _uniform(g, (b, 1, 1), 10.0, 22.0) * s
    radius = _uniform(g, (b, 1, 1), 6.5, 9.5) * s
    rot = _uniform(g, (b, 1, 1), 0, 2 * math.pi)
    du, dv = x - cx, y - cy
    u = (du * torch.cos(rot) + dv * torch.sin(rot)) / radius
    v = (-du * torch.sin(rot) + dv * torch.cos(rot)) / radius
    sdf_px = _shape_sdf(shape, u, v) * radius
    mask = torch.sigmoid(-sdf_px / aa).unsqueeze(1)
    obj = _contrasting_colour(g, b, luma_bg, 0.3, 0.6)
    stripe_colour = _contrasting_colour(g, b, obj @ _LUMA, 0.3, 0.5)
    pattern = _stripes(g, b, x, y, (2.5, 4.5), s).unsqueeze(1)
    fill = obj.view(b, 3, 1, 1) + striped * pattern * (stripe_colour - obj).view(b, 3, 1, 1)
    img = img * (1 - mask) + fill * mask

    # a distractor: a small disk or square, solid or striped, anywhere
    dx = _uniform(g, (b, 1, 1), 2.0, 30.0) * s
    dy = _uniform(g, (b, 1, 1), 2.0, 30.0) * s
    dr = _uniform(g, (b, 1, 1), 2.0, 3.5) * s
    ddu, ddv = (x - dx).abs(), (y - dy).abs()
    is_square = (torch.rand((b, 1, 1), generator=g) < 0.5).float()
    dsdf = is_square * (torch.maximum(ddu, ddv) - dr) + (1 - is_square) * (torch.sqrt(ddu ** 2 + ddv ** 2) - dr)
    dmask = torch.sigmoid(-dsdf / aa).unsqueeze(1)
    dcol = torch.rand((b, 3), generator=g).view(b, 3, 1, 1)
    dstriped = (torch.rand((b, 1, 1, 1), generator=g) < 0.5).float()
    dpattern = _stripes(g, b, x, y, (2.5, 4.5), s).unsqueeze(1)
    dfill = dcol * (1 - 0.6 * dstriped * dpattern)
    img = img * (1 - dmask) + dfill * dmask

    img = img + noise * torch.randn(img.shape, generator=g)
    return (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def make_dataset(n: int, size: int = 32, seed: int = 0, noise: float = 0.06,
                 chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images of the textured-shapes task: (uint8 (n, 3, size, size), int64 labels (n,))."""
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        images[start:start + chunk] = _render(g, labels[start:start + chunk], size, noise)
    return images, labels
