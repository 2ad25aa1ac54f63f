"""Labels files: a CSV that lists images and their classes (``data.train_csv`` / ``val_csv`` / ``test_csv``).

Format: UTF-8 text, a header line naming the columns, then one row per image::

    path,label
    images/0001.png,cat
    images/0002.png,dog

- ``path`` is relative to the CSV file's folder. Absolute paths and paths that climb out of that folder with ``..``
  are refused unless ``allow_outside_paths=True``: a recipe from somewhere else must not make the trainer read
  arbitrary files. The check is on the text of the path; symbolic links inside the folder are followed, as image
  folders do (creating one needs write access to the folder, which the file's author does not have).
- ``label`` is a class name or a class index. With ``class_names`` (the classes of training) a label that is one of
  the names is that class, otherwise an integer is its index. Without ``class_names``: when every label is an
  integer they are indices and the classes are ``"0" .. "N-1"``; otherwise every label is a name and the classes are
  the sorted names, the same order as image folders, so a CSV and a folder with the same classes agree.
- With ``target_column`` and ``label_threshold`` (always together) the class comes from a float column instead:
  ``1`` when the value is >= the threshold, else ``0``; the label column is then not needed (and ignored).

Every problem raises :class:`~surgery.errors.DataError` with one line ``<file>:<line>: <what>; <fix>`` (no line
number for problems of the whole file): missing/empty/binary/non-UTF-8 file, missing header or column, a row with
the wrong number of fields, empty cells, outside paths, duplicate images, unknown labels, non-numeric targets,
classes without rows and images that do not exist.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from PIL import Image
from timm.data import ImageDataset

from surgery.data.folders import SampleListReader
from surgery.errors import DataError

__all__ = ["LabelsDataset", "LabelsFile", "read_labels_csv"]

_INT = re.compile(r"[+-]?\d+")
_SHOW = 3  # how many offending paths an error names


@dataclass(frozen=True)
class LabelsFile:
    """What :func:`read_labels_csv` found: the labelled images in file order and the classes, in class-index order."""

    csv_path: Path
    class_names: list[str]
    samples: list[tuple[Path, int]]  # (absolute image path, class index), same shape as image folders' samples
    lines: list[int]  # the CSV line of each sample, for messages

    @property
    def root(self) -> Path:
        """The folder the paths are relative to: the CSV file's folder."""
        return self.csv_path.parent

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    @property
    def counts(self) -> dict[str, int]:
        """Rows per class, in class order (what ``surgery.metrics.class_weights`` takes)."""
        counts = dict.fromkeys(self.class_names, 0)
        for _, t in self.samples:
            counts[self.class_names[t]] += 1
        return counts

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> str:
        """One line for logs."""
        return f"{self.csv_path.name}: {len(self.samples)} images in {len(self.class_names)} classes"


@dataclass
class _Row:
    line: int
    rel: str  # normalised relative (or, when allowed, absolute) path text
    label: str
    target: float | None


def _fail(where: str, message: str) -> DataError:
    return DataError(f"{where}: {' '.join(message.split())}")


def _decode(raw: bytes, name: str) -> str:
    if not raw.strip():
        raise _fail(name, "file is empty; write a header line such as 'path,label' and one row per image")
    if b"\x00" in raw:
        raise _fail(name, "binary data (a NUL byte), not a CSV text file; check that the path names the labels CSV")
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark, as Excel writes, is fine
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _fail(
            f"{name}:{line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file with UTF-8 encoding"
        ) from None


def _check_path(text: str, where: str, allow_outside: bool) -> str:
    """The normalised path text, or a DataError for an absolute or escaping path (unless allowed)."""
    if not text:
        raise _fail(where, "empty path; give each image's path relative to the CSV's folder")
    absolute = os.path.isabs(text) or bool(PureWindowsPath(text).anchor)
    norm = os.path.normpath(text)
    if not allow_outside:
        if absolute:
            raise _fail(
                where,
                f"absolute path '{text}' is not allowed; write it relative to the CSV's folder "
                "(or allow outside paths for a labels file you trust)",
            )
        if norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise _fail(
                where,
                f"path '{text}' leaves the CSV's folder; keep the images below it "
                "(or allow outside paths for a labels file you trust)",
            )
    return norm


def _header(rows: Any, name: str, required: list[str]) -> tuple[dict[str, int], int]:
    """Column name -> position, and the number of header cells, from the first non-blank line."""
    for row in rows:
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        line = rows.line_num
        seen: dict[str, int] = {}
        for i, cell in enumerate(cells):
            if cell in seen and cell in required:
                raise _fail(f"{name}:{line}", f"column '{cell}' appears twice in the header; rename one of them")
            seen.setdefault(cell, i)
        missing = [c for c in required if c not in seen]
        if missing:
            found = ", ".join(f"'{c}'" for c in cells)
            raise _fail(
                f"{name}:{line}",
                f"the header has no '{missing[0]}' column (found {found}); "
                f"the first line must name the columns, e.g. '{','.join(required)}'",
            )
        return seen, len(cells)
    raise _fail(name, "file is empty; write a header line such as 'path,label' and one row per image")


def _class_of(
    row: _Row, name: str, class_names: list[str] | None, index: dict[str, int], as_indices: bool
) -> int:  # the class index of one row's label
    where = f"{name}:{row.line}"
    if class_names is not None and row.label in index:
        return index[row.label]
    if _INT.fullmatch(row.label) and (class_names is not None or as_indices):
        value = int(row.label)
        if value < 0:
            raise _fail(where, f"label index {value} is negative; class indices start at 0")
        if class_names is not None and value >= len(class_names):
            n = len(class_names)
            raise _fail(where, f"label index {value} is out of range for {n} classes (0..{n - 1}); use a valid index")
        return value
    assert class_names is not None  # without class names, non-integer labels are names and handled by the caller
    n = len(class_names)
    shown = ", ".join(class_names[:10]) + (f", ... ({n} classes)" if n > 10 else "")
    raise _fail(where, f"unknown label '{row.label}'; use one of the classes {shown} or an index 0..{n - 1}")


def read_labels_csv(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    target_column: str | None = None,
    label_threshold: float | None = None,
    allow_outside_paths: bool = False,
    require_all_classes: bool = True,
    check_files: bool = True,
) -> LabelsFile:
    """Read and check a labels CSV (format and rules in the module docstring).

    ``class_names`` are the classes of training (for a val/test file, or to fix the order); without them the classes
    come from the file. ``require_all_classes=False`` accepts classes without rows (an evaluation set may lack some).
    ``check_files=False`` skips the existence check of every image (for a quick look at a huge file). Images are not
    decoded here.
    """
    csv_path = Path(path).expanduser().absolute()
    name = str(path)
    if label_threshold is not None and target_column is None:
        raise _fail(
            name,
            f"label_threshold {label_threshold} needs a float column; name it (target_column) or drop the threshold",
        )
    if target_column is not None and label_threshold is None:
        raise _fail(
            name,
            f"target column '{target_column}' needs a label_threshold to turn its values into classes 0/1; "
            "set the threshold or drop the target column",
        )
    if label_threshold is not None and not math.isfinite(label_threshold):
        raise _fail(name, f"label_threshold must be a finite number, got {label_threshold}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ValueError(f"class_names must be distinct and non-empty, got {class_names}")
        if target_column is not None and len(class_names) != 2:
            raise _fail(name, f"a label_threshold makes 2 classes, but {len(class_names)} class names were given")
    if not csv_path.is_file():
        what = "is not a file" if csv_path.exists() else "does not exist"
        raise _fail(name, f"labels file {what}; check the path (relative paths start at the recipe's folder)")

    folder = csv_path.parent
    text = _decode(csv_path.read_bytes(), name)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    label_col = target_column if target_column is not None else label_column
    required = [path_column, label_col]
    rows: list[_Row] = []
    first_line: dict[str, int] = {}
    try:
        columns, width = _header(reader, name, required)
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue  # blank lines are allowed
            line = reader.line_num
            where = f"{name}:{line}"
            if len(cells) != width:
                raise _fail(
                    where,
                    f"{len(cells)} fields, but the header has {width} columns; quote a path that holds a comma",
                )
            rel = _check_path(cells[columns[path_column]], where, allow_outside_paths)
            value = cells[columns[label_col]]
            if not value:
                raise _fail(where, f"empty '{label_col}' for '{rel}'; give every image a {label_col}")
            target = None
            if target_column is not None:
                try:
                    target = float(value)
                except ValueError:
                    raise _fail(
                        where, f"'{value}' in column '{target_column}' is not a number; write a number such as 0.75"
                    ) from None
                if not math.isfinite(target):
                    raise _fail(where, f"'{value}' in column '{target_column}' is not a finite number")
            key = os.path.normpath(folder / rel)  # one image, however its path is spelled
            if key in first_line:
                raise _fail(where, f"'{rel}' is listed again (first on line {first_line[key]}); list each image once")
            first_line[key] = line
            rows.append(_Row(line, rel, value, target))
    except csv.Error as exc:
        raise _fail(f"{name}:{reader.line_num}", f"malformed CSV ({exc}); check the quotes on this line") from None
    if not rows:
        raise _fail(name, f"no rows after the header; add one line per image: {','.join(required)}")

    # classes
    if target_column is not None:
        assert label_threshold is not None
        names = class_names if class_names is not None else ["0", "1"]
        targets = [int(r.target >= label_threshold) for r in rows]  # type: ignore[operator]
    else:
        as_indices = class_names is None and all(_INT.fullmatch(r.label) for r in rows)
        if class_names is not None:
            names = class_names
        elif as_indices:
            top = max(rows, key=lambda r: int(r.label))
            if int(top.label) >= len(rows):  # some index below it has no row; refuse before listing them all
                raise _fail(
                    f"{name}:{top.line}",
                    f"label index {int(top.label)} but only {len(rows)} rows, so classes 0..{int(top.label)} cannot "
                    "all have images; index labels must number the classes from 0 without gaps, or use class names",
                )
            names = [str(i) for i in range(int(top.label) + 1)]
        else:
            names = sorted({r.label for r in rows})
        index = {n: i for i, n in enumerate(names)}
        if class_names is None and not as_indices:
            targets = [index[r.label] for r in rows]
        else:
            targets = [_class_of(r, name, class_names, index, as_indices) for r in rows]

    samples = [(Path(os.path.normpath(folder / r.rel)), t) for r, t in zip(rows, targets, strict=True)]
    if check_files:
        missing = [(r, p) for r, (p, _) in zip(rows, samples, strict=True) if not p.is_file()]
        if missing:
            shown = ", ".join(f"'{r.rel}' (line {r.line})" for r, _ in missing[:_SHOW])
            more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
            raise _fail(
                f"{name}:{missing[0][0].line}",
                f"{len(missing)} listed image(s) do not exist: {shown}{more}; paths are relative to '{folder}' "
                "(the CSV's folder); fix them or remove the rows",
            )
    if require_all_classes:
        present = set(targets)
        empty = [i for i in range(len(names)) if i not in present]
        if empty:
            i = empty[0]
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            if target_column is not None:
                side = ">=" if i == 1 else "<"
                fix = f"no '{target_column}' value is {side} {label_threshold}; change label_threshold or add rows"
            elif class_names is None and _INT.fullmatch(names[i]):
                fix = "index labels must number the classes from 0 without gaps; renumber them or use class names"
            else:
                fix = "add images of it, or leave the class out of the classes"
            raise _fail(name, f"class '{names[i]}' (index {i}) has no rows{more}; {fix}")
    return LabelsFile(csv_path=csv_path, class_names=list(names), samples=samples, lines=[r.line for r in rows])


class LabelsDataset(ImageDataset):
    """A timm ``ImageDataset`` over a :class:`LabelsFile`: ``(transform(PIL image), class index)`` per row.

    Images open with PIL and convert to ``img_mode`` ("RGB", or "L" for one-channel models) before ``transform``
    (e.g. ``timm.data.create_transform(...)``), exactly as timm's own datasets; ``filename(i)`` is relative to the
    CSV's folder.
    """

    def __init__(
        self,
        labels: LabelsFile,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        img_mode: str = "RGB",
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        super().__init__(
            str(labels.root),
            reader=SampleListReader(labels.root, labels.samples),
            input_img_mode=img_mode,
            transform=transform,
            target_transform=target_transform,
        )
        self.labels = labels
        self.class_names = list(labels.class_names)
