"""Image folders for training: fail-fast validation and its report, and the timm datasets over them.

Layout: ``<root>/<train_dir>/<class>/*.png|jpg|jpeg`` and the same class folders under ``<root>/<val_dir>/``.
Everything heavy is timm's: the preprocessing comes from the model's ``pretrained_cfg`` through
``timm.data.resolve_data_config`` + ``timm.data.create_transform``, and the datasets are ``timm.data.ImageDataset``.
This module only adds the checks a user needs *before* a run starts and a stable class order.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader

from surgery.data.transforms import build_transforms, resolve_data_cfg
from surgery.errors import DataError

__all__ = [
    "FolderReport",
    "SampleListReader",
    "build_image_datasets",
    "decode_errors",
    "scan_eval_folder",
    "validate_image_folders",
]

Sample = tuple[Path, int]


@dataclass
class FolderReport:
    """What :func:`validate_image_folders` found: classes (sorted), labelled files per split, skipped files."""

    root: Path
    train_dir: Path
    val_dir: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[Path] = field(default_factory=list)
    origin: str = "data.root"  # the recipe key the classes come from, for messages ("data.train_csv")

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Class name -> label index (index order = sorted class names, identical for both splits)."""
        return {name: i for i, name in enumerate(self.class_names)}

    @property
    def classes_source(self) -> str:
        """Where the classes come from, for messages: ``data.root (3 class folders)``, ``data.train_csv (3 classes)``"""
        n = len(self.class_names)
        return f"{self.origin} ({n} {'class folders' if self.origin == 'data.root' else 'classes'})"

    @property
    def train_counts(self) -> dict[str, int]:
        """Images per class in the train split."""
        return self._counts(self.train)

    @property
    def val_counts(self) -> dict[str, int]:
        """Images per class in the val split."""
        return self._counts(self.val)

    @property
    def num_skipped(self) -> int:
        """How many undecodable images were left out (only non-zero with ``skip_bad_images=True``)."""
        return len(self.skipped)

    def summary(self) -> str:
        """One line for logs: class count, split sizes and skipped images."""
        line = f"{len(self.class_names)} classes, {len(self.train)} train / {len(self.val)} val images"
        return line + (f", {self.num_skipped} undecodable skipped" if self.skipped else "")

    def _counts(self, samples: list[Sample]) -> dict[str, int]:
        counts = dict.fromkeys(self.class_names, 0)
        for _, label in samples:
            counts[self.class_names[label]] += 1
        return counts


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _decode_error(path: Path) -> str | None:
    """Fully decode ``path`` (``verify()`` misses truncated data); return the reason it fails, or None."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads the whole stream
            img.load()
            img.convert("RGB")  # the conversion timm's ImageDataset performs
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return _one_line(exc)
    return None


def decode_errors(files: list[Path], *, skip_bad_images: bool = False) -> dict[Path, str | None]:
    """Decode every file fully (in threads: PIL decodes without the GIL); file -> why it fails, or None.

    Raises :class:`~surgery.errors.DataError` for the first undecodable file unless ``skip_bad_images``.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = dict(zip(files, pool.map(_decode_error, files), strict=True))
    bad = [f for f in files if errors[f] is not None]
    if bad and not skip_bad_images:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"cannot decode image '{bad[0]}'{more}: {errors[bad[0]]}; "
            "delete or replace it, or pass skip_bad_images=True (data.skip_bad_images) to leave undecodable images out"
        )
    return errors


def _split_dir(root: Path, name: str, which: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise DataError(
            f"{which} folder '{path}' does not exist; create it with one subfolder per class "
            f"(e.g. {path}/<class_name>/img.png) or set {which}_dir to the folder that holds them"
        )
    return path


def class_names(split: Path) -> list[str]:
    """The class folder names of a split, as training lists them (for planning before any image is read)."""
    from timm.data import get_img_extensions

    return list(_class_files(split, get_img_extensions(as_set=True)))


def _class_files(split: Path, exts: set[str]) -> dict[str, list[Path]]:
    """Class folder name -> sorted image files below it (recursive; hidden entries ignored)."""
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"'{split}' has no class subfolders; put the images in {split}/<class_name>/ (one folder per class)"
        )
    stray = sorted(p.name for p in split.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if stray:
        raise DataError(
            f"'{split}' holds {len(stray)} image(s) outside any class folder (e.g. '{split / stray[0]}'); "
            f"move them into {split}/<class_name>/"
        )
    files = {}
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(split / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in exts]
        files[name] = sorted(found)
    return files


def validate_image_folders(
    root: str | os.PathLike,
    train_dir: str = "train",
    val_dir: str = "val",
    skip_bad_images: bool = False,
) -> FolderReport:
    """Check an image-folder dataset before training and list its labelled files.

    Raises :class:`~surgery.errors.DataError` (one line naming the path and a fix) for a missing root/train/val
    folder, a split without class subfolders, images outside class folders, an empty class folder, train and val
    class sets that differ, or an image PIL cannot fully decode. With ``skip_bad_images=True`` undecodable images
    are left out and listed in ``FolderReport.skipped`` instead. Only ``.png/.jpg/.jpeg`` (timm's image
    extensions) count as images; other files and hidden entries are ignored.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data root '{root}' {what}; point it at a folder holding {train_dir}/ and {val_dir}/")
    exts = get_img_extensions(as_set=True)
    train_path, val_path = _split_dir(root, train_dir, "train"), _split_dir(root, val_dir, "val")
    if train_path.resolve() == val_path.resolve():
        raise DataError(f"train and val are the same folder '{train_path}'; give val_dir its own held-out images")
    splits = {train_path: _class_files(train_path, exts), val_path: _class_files(val_path, exts)}
    train_classes, val_classes = set(splits[train_path]), set(splits[val_path])
    if train_classes != val_classes:
        raise DataError(
            f"class folders differ between '{train_path}' and '{val_path}': "
            f"missing in {val_dir}: {sorted(train_classes - val_classes)}, "
            f"missing in {train_dir}: {sorted(val_classes - train_classes)}; "
            "add or remove class folders so both splits have the same classes"
        )
    class_names = sorted(train_classes)

    def no_images(folder: Path, why: str) -> DataError:
        return DataError(
            f"class folder '{folder}' has {why}; add {'/'.join(sorted(exts))} images to it "
            f"or remove the class from both {train_dir}/ and {val_dir}/"
        )

    for split, files in splits.items():
        for name in class_names:
            if not files[name]:
                raise no_images(split / name, "no images")

    all_files = [f for files in splits.values() for name in class_names for f in files[name]]
    errors = decode_errors(all_files, skip_bad_images=skip_bad_images)
    bad = [f for f in all_files if errors[f] is not None]

    samples: dict[Path, list[Sample]] = {}
    for split, files in splits.items():
        samples[split] = []
        for label, name in enumerate(class_names):
            good = [f for f in files[name] if errors[f] is None]
            if not good:
                raise no_images(split / name, f"only undecodable images ({len(files[name])} skipped)")
            samples[split] += [(f, label) for f in good]
    return FolderReport(
        root=root,
        train_dir=train_path,
        val_dir=val_path,
        class_names=class_names,
        train=samples[train_path],
        val=samples[val_path],
        skipped=bad,
    )


def scan_eval_folder(split: str | os.PathLike, class_names: list[str]) -> list[Sample]:
    """The labelled images of one class-folder split, labelled by the model's ``class_names`` (for evaluation).

    Every class folder must be one of the model's classes (a model cannot be scored on a class it does not know);
    the model's classes the folder lacks just have no samples. Raises :class:`~surgery.errors.DataError` for a
    missing folder, an unknown or empty class folder, or an undecodable image.
    """
    path = Path(split).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"evaluation folder '{path}' {what}; give a folder with one subfolder per class")
    files = _class_files(path, get_img_extensions(as_set=True))
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in files if name not in index]
    if unknown:
        n = len(class_names)
        known = ", ".join(class_names[:10]) + (f", ... ({n} classes)" if n > 10 else "")
        raise DataError(
            f"class folder '{path / unknown[0]}' is not one of the model's {n} classes ({known}); the data's classes "
            "must be the training's: rename or remove the folder, or evaluate the model trained on these classes"
        )
    for name, found in files.items():
        if not found:
            raise DataError(f"class folder '{path / name}' has no images; add images or remove the folder")
    samples = [(f, index[name]) for name, found in files.items() for f in found]
    decode_errors([f for f, _ in samples])
    return samples


class SampleListReader(Reader):
    """timm Reader over an already-checked (path, label) list: validated image folders (skipped files stay out) and
    labels CSV files both use it."""

    def __init__(self, root: Path, samples: list[Sample]) -> None:
        super().__init__()
        self.root = root
        self.samples = samples

    def __getitem__(self, index: int) -> tuple[str, int]:
        path, target = self.samples[index]
        return str(path), target  # ImageDataset calls Image.open(path); PIL then closes the file itself

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        if basename:
            return path.name
        return str(path.absolute()) if absolute else os.path.relpath(path, self.root)


def build_image_datasets(
    root: str | os.PathLike,
    model: Any,
    *,
    img_size: int | tuple[int, int] | None = None,
    augment: str = "light",
    train_dir: str = "train",
    val_dir: str = "val",
    skip_bad_images: bool = False,
    report: FolderReport | None = None,
) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """Validate ``root`` and build timm ``ImageDataset`` s yielding ``(tensor, int label)``.

    ``model`` is whatever :func:`build_transforms` accepts. Labels index the sorted class names, identical in
    train and val. Pass the ``report`` of an earlier :func:`validate_image_folders` call to skip re-validating.
    The train transform uses ``augment``; val always gets the model's eval transform. Check whether the train
    pipeline is random with ``is_deterministic_transform(train_ds.transform)``.
    """
    if report is None:
        report = validate_image_folders(root, train_dir=train_dir, val_dir=val_dir, skip_bad_images=skip_bad_images)
    cfg = resolve_data_cfg(model, img_size=img_size)
    img_mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    datasets = []
    for samples, split, training in ((report.train, report.train_dir, True), (report.val, report.val_dir, False)):
        transform = build_transforms(cfg, augment=augment, is_training=training)
        reader = SampleListReader(split, samples)
        datasets.append(ImageDataset(str(split), reader=reader, input_img_mode=img_mode, transform=transform))
    return datasets[0], datasets[1], list(report.class_names)
