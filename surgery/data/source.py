"""The recipe's data section made real: image folders (``data.root``) or labels CSV files (``data.train_csv`` and
``data.val_csv``), checked before training into one :class:`~surgery.data.folders.FolderReport`.

Both sources give the same report (classes, labelled train/val samples, skipped images), so the trainer, the feature
cache and ``surgery plan`` never ask which one it was. Each file's errors are one line naming it (and its line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.data.folders import FolderReport, decode_errors, validate_image_folders
from surgery.data.labels import LabelsFile, read_labels_csv
from surgery.errors import DataError

__all__ = ["count_classes", "read_split_labels", "validate_data"]


def read_split_labels(
    data: Any, key: str, *, class_names: list[str] | None = None, require_all_classes: bool = True, check_files=True
) -> LabelsFile:
    """Read ``data.<key>`` (``train_csv``, ``val_csv``, ``test_csv``) with the section's target column and threshold.

    A file's own errors name it; this adds the recipe key to them, so the user knows which setting to fix.
    """
    path = getattr(data, key)
    try:
        return read_labels_csv(
            path,
            class_names=class_names,
            target_column=data.target_column,
            label_threshold=data.label_threshold,
            require_all_classes=require_all_classes,
            check_files=check_files,
        )
    except DataError as err:
        raise DataError(f"data.{key}: {err}") from None


def validate_data(recipe: Any) -> FolderReport:
    """Check the recipe's training data before any model is built: class folders or labels files.

    Raises :class:`~surgery.errors.DataError` (one line) when neither is set, and for every problem
    :func:`~surgery.data.folders.validate_image_folders` and :func:`~surgery.data.labels.read_labels_csv` find
    (missing files, unknown labels, empty classes...); for labels files also when train and val classes differ and for
    undecodable images (unless ``data.skip_bad_images``).
    """
    data = recipe.data
    if data.train_csv is not None:
        return _validate_labels(data)
    if data.root is None:
        raise DataError(
            f"{recipe.where('data', 'root')}: no training data: set data.root to a folder with train/ and val/ (one "
            "subfolder per class), or data.train_csv and data.val_csv to labels files, or pass train_data in the "
            "Python API"
        )
    return validate_image_folders(
        data.root, train_dir=data.train_dir, val_dir=data.val_dir, skip_bad_images=data.skip_bad_images
    )


def _validate_labels(data: Any) -> FolderReport:
    if Path(data.train_csv).resolve() == Path(data.val_csv).resolve():
        raise DataError(f"data.val_csv: {data.val_csv} is data.train_csv too; give validation its own held-out images")
    train = read_split_labels(data, "train_csv")
    # val is read with training's classes: a label train never had is an unknown label, a class val lacks is an error
    val = read_split_labels(data, "val_csv", class_names=train.class_names)
    files = [p for p, _ in train.samples] + [p for p, _ in val.samples]
    errors = decode_errors(files, skip_bad_images=data.skip_bad_images)
    skipped = [f for f in files if errors[f] is not None]
    report = FolderReport(
        root=train.root,
        train_dir=train.root,
        val_dir=val.root,
        class_names=list(train.class_names),
        train=[s for s in train.samples if errors[s[0]] is None],
        val=[s for s in val.samples if errors[s[0]] is None],
        skipped=skipped,
        origin="data.train_csv",
    )
    for key, samples in (("train_csv", report.train), ("val_csv", report.val)):
        present = {t for _, t in samples}
        empty = [n for i, n in enumerate(report.class_names) if i not in present]
        if empty:
            raise DataError(
                f"data.{key}: class '{empty[0]}' has no decodable images left (undecodable ones skipped); "
                "add images of it or remove its rows"
            )
    return report


def validate_test_labels(data: Any, class_names: list[str]) -> FolderReport:
    """``data.test_csv`` read with training's classes and checked as val is: a report whose ``train`` list is the test
    split (the trainer evaluates it once at the end of training)."""
    test = read_split_labels(data, "test_csv", class_names=class_names, require_all_classes=False)
    errors = decode_errors(test.paths, skip_bad_images=data.skip_bad_images)
    samples = [s for s in test.samples if errors[s[0]] is None]
    if not samples:
        raise DataError(f"data.test_csv: {data.test_csv} has no decodable images; add rows or remove data.test_csv")
    return FolderReport(
        root=test.root,
        train_dir=test.root,
        val_dir=test.root,
        class_names=list(class_names),
        train=samples,
        val=[],
        skipped=[f for f in test.paths if errors[f] is not None],
        origin="data.test_csv",
    )


def count_classes(recipe: Any) -> tuple[int, str] | None:
    """The class count of the recipe's training data as training will find it, and the key it comes from; None when
    the data is not there yet (for ``surgery plan``, which reads labels but opens no image)."""
    from surgery.data.folders import class_names

    data = recipe.data
    if data.train_csv is not None:
        if not Path(data.train_csv).is_file():
            return None
        return len(read_split_labels(data, "train_csv", check_files=False).class_names), "data.train_csv"
    if not data.root:
        return None
    train = Path(data.root) / data.train_dir
    if not train.is_dir():
        return None
    return len(class_names(train)), "data.root"
