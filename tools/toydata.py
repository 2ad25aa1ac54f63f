"""Data that ships with the package or is generated on the spot, for tests, examples and the demo. No downloads.

- :func:`write_digits_folders`: scikit-learn's bundled 8x8 digits as ``train/`` + ``val/`` PNG image folders.
- :func:`write_synthetic_folders`: tiny coloured-shape images a small CNN learns in a few steps.
- :func:`make_xor`: the noisy four-blob XOR point cloud, as tensors.
"""

from __future__ import annotations

import colorsys
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from surgery.errors import DataError

__all__ = ["make_xor", "write_digits_folders", "write_synthetic_folders"]

SPLITS = ("train", "val")


def _prepare(root: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``root``; refuse to mix with existing split folders unless ``overwrite`` (which removes only those)."""
    root = Path(root).expanduser()
    for split in (*SPLITS, "test"):
        path = root / split
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise DataError(f"'{path}' already holds files; pick an empty folder or pass overwrite=True")
            shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_digits_folders(
    root: str | os.PathLike,
    *,
    classes: Iterable[int] = range(10),
    shots_per_class: int | None = None,
    val_per_class: int | None = None,
    test_split: float = 0.25,
    seed: int = 0,
    size: int = 32,
    overwrite: bool = False,
) -> Path:
    """Write scikit-learn's digits (1797 8x8 images, ~180 per digit, bundled, no download) as image folders.

    Layout: ``root/train/<digit>/<index>.png`` and ``root/val/<digit>/<index>.png``, where ``<digit>`` is the label
    as a string ("0".."9") and ``<index>`` the row in ``load_digits()`` (unique, so splits can be compared by name).
    Images are upscaled to ``size`` x ``size`` and saved as RGB PNG (white ink on black), which every timm
    transform accepts. Per digit, a seeded shuffle puts the first ``val_per_class`` images (default:
    ``round(test_split * n)``) in val and the next ``shots_per_class`` (default: all the rest) in train, so the
    splits are disjoint and the same seed always gives the same files. Returns ``root``.
    """
    from sklearn.datasets import load_digits  # lazy: scikit-learn is a dev/demo dependency only

    classes = sorted(set(classes))
    if not classes or any(c not in range(10) for c in classes):
        raise DataError(f"classes must be digits 0-9, got {classes}; e.g. classes=range(10)")
    if val_per_class is None and not 0 < test_split < 1:
        raise DataError(f"test_split must be between 0 and 1, got {test_split}; or set val_per_class")
    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    plan = {}
    for digit in classes:
        rows = np.flatnonzero(digits.target == digit)
        rows = np.random.default_rng([seed, digit]).permutation(rows)  # per-digit stream: independent of `classes`
        n_val = round(test_split * len(rows)) if val_per_class is None else val_per_class
        n_train = len(rows) - n_val if shots_per_class is None else shots_per_class
        if n_val < 1 or n_train < 1 or n_val + n_train > len(rows):
            raise DataError(
                f"digit {digit} has {len(rows)} images, cannot give {n_train} train + {n_val} val; "
                "lower shots_per_class/val_per_class (both >= 1)"
            )
        plan[digit] = {"val": rows[:n_val], "train": rows[n_val : n_val + n_train]}

    root = _prepare(root, overwrite)
    for digit, split_rows in plan.items():
        for split, rows in split_rows.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in rows:
                img = Image.fromarray(images[row]).resize((size, size), Image.Resampling.BILINEAR)
                img.convert("RGB").save(folder / f"{row:04d}.png")
    return root


def _shape_image(rng: np.random.Generator, label: int, classes: int, size: int) -> Image.Image:
    """One image of class ``label``: a shape whose colour (hue) and kind depend on the class, jittered."""
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    r, g, b = colorsys.hsv_to_rgb(label / classes, 1.0, 1.0)
    color = tuple(int(v * rng.uniform(180, 255)) for v in (r, g, b))
    half = size * rng.uniform(0.22, 0.34)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(img)
    kind = label % 4
    if kind == 0:
        draw.ellipse(box, fill=color)
    elif kind == 1:
        draw.rectangle(box, fill=color)
    elif kind == 2:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=color)
    else:
        width = max(1, int(half / 2))
        draw.line([(box[0], box[1]), (box[2], box[3])], fill=color, width=width)
        draw.line([(box[0], box[3]), (box[2], box[1])], fill=color, width=width)
    return img


def write_synthetic_folders(
    root: str | os.PathLike,
    *,
    classes: int = 3,
    per_class: int = 8,
    size: int = 32,
    seed: int = 0,
    val_per_class: int | None = None,
    overwrite: bool = False,
    train_counts: Sequence[int] | None = None,
    test_per_class: int | None = None,
) -> Path:
    """Write tiny generated RGB PNG folders ``root/{train,val}/class_<k>/*.png`` for fast tests.

    Class ``k`` is a shape (circle, square, triangle, cross; cycling) in its own hue on a dark noisy background,
    with random position, size and brightness, so a small CNN separates classes quickly. Class folder names are
    zero-padded (``class_0``.. or ``class_00``..) so sorted order equals ``k``. ``per_class`` train images and
    ``val_per_class`` (default ``per_class``) val images per class; deterministic for a given seed. Returns ``root``.
    ``train_counts`` gives each class its own number of train images (imbalanced data); ``test_per_class`` also
    writes a ``test/`` split.
    """
    if train_counts is not None and (len(train_counts) != classes or min(train_counts) < 1):
        raise DataError(f"train_counts needs {classes} counts >= 1, got {list(train_counts)}")
    if classes < 1 or per_class < 1 or (val_per_class is not None and val_per_class < 1):
        raise DataError(f"need classes >= 1 and >= 1 image per class, got classes={classes}, per_class={per_class}")
    root = _prepare(root, overwrite)
    rng = np.random.default_rng(seed)
    width = len(str(classes - 1))
    counts = {"train": per_class, "val": per_class if val_per_class is None else val_per_class}
    splits = SPLITS
    if test_per_class is not None:
        counts["test"], splits = test_per_class, (*SPLITS, "test")
    for split in splits:
        for label in range(classes):
            folder = root / split / f"class_{label:0{width}d}"
            folder.mkdir(parents=True, exist_ok=True)
            n = train_counts[label] if split == "train" and train_counts is not None else counts[split]
            for i in range(n):
                _shape_image(rng, label, classes, size).save(folder / f"{i:03d}.png")
    return root


def make_xor(n: int, *, seed: int = 0, noise: float = 0.7, center: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy XOR: four isotropic Gaussian blobs at ``(+-center, +-center)`` with per-coordinate std ``noise``.

    Blobs in the x*y > 0 quadrants, (1, 1) and (-1, -1), get label 1; blobs (-1, 1) and (1, -1) get label 0.
    Blobs are equally sized (``n // 4``, remainder spread), so labels are exactly balanced for even ``n``; the
    order is shuffled. The defaults match the reference data (``xor_complex_{small,medium,large}``, labels 1/2,
    100k points in the large file): per-label Gaussian-mixture fits give centres (+-1.00, +-1.00) and per-coordinate
    variance 0.48-0.50 (std 0.7) with no x/y correlation inside a blob, 50/50 label balance, overall coordinate
    std ~1.22 (= sqrt(1 + 0.49)), and the file's label 1 is the x*y > 0 pair (returned here as 1, its label 2 as 0).
    Because blobs overlap the axes, sign(x*y) agrees with the label only ~85.7% of the time (both there and here),
    which is the ceiling for any classifier. Returns ``x`` float32 [n, 2] and ``y`` float32 [n] of 0/1.
    """
    if n < 1 or noise < 0:
        raise DataError(f"make_xor needs n >= 1 and noise >= 0, got n={n}, noise={noise}")
    gen = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]) * center
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    counts = torch.tensor([n // 4 + (i < n % 4) for i in range(4)])
    blob = torch.repeat_interleave(torch.arange(4), counts)
    blob = blob[torch.randperm(n, generator=gen)]
    x = centers[blob] + noise * torch.randn(n, 2, generator=gen)
    return x, labels[blob]
