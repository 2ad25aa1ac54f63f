"""surgery.data.labels: labels CSV files, their one-line errors, class order, and the dataset over them."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from surgery.data.labels import LabelsDataset, LabelsFile, read_labels_csv
from surgery.errors import DataError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A CSV folder with imgs/a.png .. imgs/d.png (different sizes and colours) and one image outside it."""
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    for i, stem in enumerate("abcd"):
        Image.new("RGB", (8 + i, 6 + i), (40 * i, 10, 200)).save(tmp_path / "data" / "imgs" / f"{stem}.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    return tmp_path / "data"


def _write(folder: Path, content: str | bytes, name: str = "labels.csv") -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


GOOD = "imgs/a.png,cat\nimgs/b.png,dog\n"

# (id, file content, read_labels_csv kwargs, expected message after "<file>")
MALFORMED = [
    ("empty", "", {}, ": file is empty; write a header line such as 'path,label' and one row per image"),
    (
        "blank-lines-only",
        "\n \n",
        {},
        ": file is empty; write a header line such as 'path,label' and one row per image",
    ),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, ": binary data (a NUL byte), not a CSV text file;"),
    ("latin-1", "path,label\nimgs/a.png,café\n".encode("latin-1"), {}, ":2: not UTF-8 text (byte 0xe9); save the"),
    (
        "no-header",
        GOOD,
        {},
        ":1: the header has no 'path' column (found 'imgs/a.png', 'cat'); the first line must name the columns, "
        "e.g. 'path,label'",
    ),
    ("no-label-column", "path,class\n" + GOOD, {}, ":1: the header has no 'label' column (found 'path', 'class');"),
    ("duplicate-column", "path,path,label\n", {}, ":1: column 'path' appears twice in the header; rename one of them"),
    ("header-only", "path,label\n\n", {}, ": no rows after the header; add one line per image: path,label"),
    (
        "extra-field",
        "path,label\nimgs/a.png,cat\nimgs/b,x.png,dog\n",
        {},
        ":3: 3 fields, but the header has 2 columns; quote a path that holds a comma",
    ),
    (
        "unclosed-quote",
        'path,label\n"imgs/a.png,cat\n',
        {},
        ":2: malformed CSV (unexpected end of data); check the quotes on this line",
    ),
    ("empty-label", "path,label\nimgs/a.png, \n", {}, ":2: empty 'label' for 'imgs/a.png'; give every image a label"),
    ("empty-path", "path,label\n,cat\n", {}, ":2: empty path; give each image's path relative to the CSV's folder"),
    (
        "absolute-path",
        "path,label\n{outside},cat\n",
        {},
        ":2: absolute path '{outside}' is not allowed; write it relative to the CSV's folder "
        "(or allow outside paths for a labels file you trust)",
    ),
    ("windows-absolute", "path,label\nC:\\imgs\\a.png,cat\n", {}, ":2: absolute path 'C:\\imgs\\a.png' is not allowed"),
    ("dot-dot", "path,label\nimgs/a.png,cat\n../outside.png,dog\n", {}, ":3: path '../outside.png' leaves the CSV's"),
    ("dot-dot-inside", "path,label\nimgs/../../outside.png,dog\n", {}, ":2: path 'imgs/../../outside.png' leaves"),
    (
        "duplicate-row",
        "path,label\nimgs/a.png,cat\nimgs/b.png,dog\n./imgs//a.png,dog\n",
        {},
        ":4: 'imgs/a.png' is listed again (first on line 2); list each image once",
    ),
    (
        "unknown-label",
        "path,label\nimgs/a.png,cat\nimgs/b.png,bird\n",
        {"class_names": ["cat", "dog"]},
        ":3: unknown label 'bird'; use one of the classes cat, dog or an index 0..1",
    ),
    (
        "index-out-of-range",
        "path,label\nimgs/a.png,0\nimgs/b.png,5\n",
        {"class_names": ["cat", "dog"]},
        ":3: label index 5 is out of range for 2 classes (0..1); use a valid index",
    ),
    ("negative-index", "path,label\nimgs/a.png,-1\nimgs/b.png,0\n", {}, ":2: label index -1 is negative;"),
    (
        "empty-class",
        "path,label\n" + GOOD,
        {"class_names": ["cat", "dog", "bird"]},
        ": class 'bird' (index 2) has no rows; add images of it, or leave the class out of the classes",
    ),
    (
        "index-gap",
        "path,label\nimgs/a.png,0\nimgs/b.png,2\nimgs/c.png,2\n",
        {},
        ": class '1' (index 1) has no rows; index labels must number the classes from 0 without gaps;",
    ),
    (
        "huge-index",
        "path,label\nimgs/a.png,0\nimgs/b.png,99999999999\n",
        {},
        ":3: label index 99999999999 but only 2 rows, so classes 0..99999999999 cannot all have images;",
    ),
    (
        "missing-images",
        "path,label\nimgs/a.png,cat\nimgs/x1.png,cat\nimgs/x2.png,dog\nimgs/x3.png,dog\nimgs/x4.png,dog\n",
        {},
        ":3: 4 listed image(s) do not exist: 'imgs/x1.png' (line 3), 'imgs/x2.png' (line 4), 'imgs/x3.png' (line 5) "
        "and 1 more; paths are relative to '{folder}' (the CSV's folder); fix them or remove the rows",
    ),
    ("folder-not-image", "path,label\nimgs,cat\nimgs/a.png,dog\n", {}, ":2: 1 listed image(s) do not exist: 'imgs'"),
    (
        "threshold-without-column",
        "path,label\n" + GOOD,
        {"label_threshold": 0.5},
        ": label_threshold 0.5 needs a float column; name it (target_column) or drop the threshold",
    ),
    (
        "column-without-threshold",
        "path,score\nimgs/a.png,0.3\n",
        {"target_column": "score"},
        ": target column 'score' needs a label_threshold to turn its values into classes 0/1;",
    ),
    (
        "threshold-column-missing",
        "path,label\n" + GOOD,
        {"target_column": "score", "label_threshold": 0.5},
        ":1: the header has no 'score' column (found 'path', 'label'); the first line must name the columns, "
        "e.g. 'path,score'",
    ),
    (
        "non-numeric-target",
        "path,score\nimgs/a.png,0.2\nimgs/b.png,high\n",
        {"target_column": "score", "label_threshold": 0.5},
        ":3: 'high' in column 'score' is not a number; write a number such as 0.75",
    ),
    (
        "nan-target",
        "path,score\nimgs/a.png,nan\n",
        {"target_column": "score", "label_threshold": 0.5},
        ":2: 'nan' in column 'score' is not a finite number",
    ),
    (
        "threshold-one-class",
        "path,score\nimgs/a.png,0.1\nimgs/b.png,0.4\n",
        {"target_column": "score", "label_threshold": 0.5},
        ": class '1' (index 1) has no rows; no 'score' value is >= 0.5; change label_threshold or add rows",
    ),
]


@pytest.mark.parametrize(("content", "kwargs", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_labels_file(folder: Path, content, kwargs, expected: str) -> None:
    outside = str(folder.parent / "outside.png")
    if isinstance(content, str):
        content = content.replace("{outside}", outside)
    path = _write(folder, content)
    with pytest.raises(DataError) as info:
        read_labels_csv(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    expected = str(path) + expected.replace("{outside}", outside).replace("{folder}", str(folder))
    assert message.startswith(expected), message


def test_missing_and_folder_paths(folder: Path) -> None:
    with pytest.raises(DataError, match=r"labels.csv: labels file does not exist; check the path"):
        read_labels_csv(folder / "labels.csv")
    with pytest.raises(DataError, match=r"imgs: labels file is not a file;"):
        read_labels_csv(folder / "imgs")


def test_names_sorted_and_paths_resolved(folder: Path) -> None:
    path = _write(folder, "path,label\nimgs/b.png,dog\nimgs/a.png,cat\nimgs/c.png,dog\n")
    got = read_labels_csv(path)
    assert isinstance(got, LabelsFile)
    assert got.class_names == ["cat", "dog"]
    assert got.samples == [(folder / "imgs/b.png", 1), (folder / "imgs/a.png", 0), (folder / "imgs/c.png", 1)]
    assert got.lines == [2, 3, 4]
    assert got.counts == {"cat": 1, "dog": 2} and got.class_to_idx == {"cat": 0, "dog": 1}
    assert got.root == folder and len(got) == 3
    assert got.summary() == "labels.csv: 3 images in 2 classes"


def test_class_order_is_deterministic(folder: Path) -> None:
    """Sorted names (as image folders), whatever the row order: each shuffle of the rows gives the same classes."""
    rows = [f"imgs/{s}.png,{c}" for s, c in zip("abcd", ["zebra", "Ant", "élan", "_misc"], strict=True)]
    seen = set()
    for seed in range(5):
        random.Random(seed).shuffle(rows)
        got = read_labels_csv(_write(folder, "path,label\n" + "\n".join(rows) + "\n"))
        seen.add(tuple(got.class_names))
        assert {p.name: got.class_names[t] for p, t in got.samples}["a.png"] == "zebra"
    assert seen == {("Ant", "_misc", "zebra", "élan")}


def test_index_labels(folder: Path) -> None:
    got = read_labels_csv(_write(folder, "path,label\nimgs/a.png,1\nimgs/b.png,0\nimgs/c.png,2\n"))
    assert got.class_names == ["0", "1", "2"] and got.targets == [1, 0, 2]


def test_training_class_names_take_names_and_indices(folder: Path) -> None:
    got = read_labels_csv(
        _write(folder, "path,label\nimgs/a.png,dog\nimgs/b.png,0\nimgs/c.png,1\n"), class_names=["cat", "dog"]
    )
    assert got.class_names == ["cat", "dog"] and got.targets == [1, 0, 1]
    # a class named like a number is that class, not an index
    got = read_labels_csv(_write(folder, "path,label\nimgs/a.png,1\nimgs/b.png,0\n"), class_names=["1", "0"])
    assert got.targets == [0, 1]
    # an evaluation set may lack a class when asked to allow it
    got = read_labels_csv(
        _write(folder, "path,label\nimgs/a.png,dog\n"), class_names=["cat", "dog"], require_all_classes=False
    )
    assert got.counts == {"cat": 0, "dog": 1}


def test_mixed_labels_without_class_names_are_names(folder: Path) -> None:
    got = read_labels_csv(_write(folder, "path,label\nimgs/a.png,10\nimgs/b.png,9\nimgs/c.png,cat\n"))
    assert got.class_names == ["10", "9", "cat"] and got.targets == [0, 1, 2]


def test_threshold(folder: Path) -> None:
    text = "path,score,label\nimgs/a.png,0.1,x\nimgs/b.png,0.5,\nimgs/c.png,0.9,x\nimgs/d.png,-3e-1,x\n"
    got = read_labels_csv(_write(folder, text), target_column="score", label_threshold=0.5)
    assert got.class_names == ["0", "1"] and got.targets == [0, 1, 1, 0]  # >= threshold is class 1
    got = read_labels_csv(
        _write(folder, text), target_column="score", label_threshold=0.5, class_names=["ok", "defect"]
    )
    assert got.counts == {"ok": 2, "defect": 2}
    with pytest.raises(DataError, match="a label_threshold makes 2 classes, but 3 class names were given"):
        read_labels_csv(_write(folder, text), target_column="score", label_threshold=0.5, class_names=["a", "b", "c"])


def test_tolerant_formatting(folder: Path) -> None:
    """Excel-style files: byte-order mark, CRLF, blank lines, spaces, quoted paths with commas, other columns."""
    Image.new("RGB", (5, 5)).save(folder / "imgs" / "x, y.png")
    text = '\ufeffid , path , label\r\n\r\n1, imgs/a.png , cat\r\n2,"imgs/x, y.png",dog\r\n'
    got = read_labels_csv(_write(folder, text))
    assert [p.name for p in got.paths] == ["a.png", "x, y.png"] and got.class_names == ["cat", "dog"]
    assert got.lines == [3, 4]


def test_custom_columns_and_no_file_check(folder: Path) -> None:
    text = "file;class\n"  # not our delimiter: still one column, so the header error names it
    with pytest.raises(DataError, match=r"the header has no 'file' column \(found 'file;class'\)"):
        read_labels_csv(_write(folder, text), path_column="file", label_column="class")
    got = read_labels_csv(
        _write(folder, "class,file\ncat,imgs/nope.png\ndog,imgs/a.png\n"),
        path_column="file",
        label_column="class",
        check_files=False,
    )
    assert got.targets == [0, 1]


def test_outside_paths_only_when_allowed(folder: Path) -> None:
    outside = folder.parent / "outside.png"
    text = f"path,label\n{outside},cat\n../outside.png,cat\nimgs/a.png,dog\n"
    with pytest.raises(DataError, match="absolute path"):
        read_labels_csv(_write(folder, text))
    got = read_labels_csv(_write(folder, text.replace(f"{outside},cat\n", "")), allow_outside_paths=True)
    assert got.paths[0] == outside
    with pytest.raises(DataError, match=r"labels.csv:3: '../outside.png' is listed again \(first on line 2\)"):
        read_labels_csv(_write(folder, text), allow_outside_paths=True)


def test_dataset_loads_images(folder: Path) -> None:
    from timm.data import create_transform

    labels = read_labels_csv(_write(folder, "path,label\nimgs/a.png,cat\nimgs/d.png,dog\n"))
    transform = create_transform(input_size=(3, 16, 16), is_training=False, crop_pct=1.0)
    ds = LabelsDataset(labels, transform)
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"]
    x, y = ds[1]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16) and y == 1
    assert ds.filename(0) == "imgs/a.png" and ds.filename(1, absolute=True) == str(folder / "imgs/d.png")
    gray = LabelsDataset(labels, img_mode="L")
    img, _ = gray[0]
    assert img.mode == "L" and img.size == (8, 6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 16, 16) and batch[1].tolist() == [0, 1]


# ------------------------------------------------------------------------------------ recipes with labels files


def _labels_from_folders(data: Path, split: str, csv: Path, *, label=lambda cls, i: cls) -> Path:
    """A labels CSV listing ``data/<split>/<class>/*.png`` with paths relative to the CSV's folder."""
    rows = ["path,label"]
    for i, cls in enumerate(sorted(p.name for p in (data / split).iterdir())):
        for img in sorted((data / split / cls).iterdir()):
            rows.append(f"{os.path.relpath(img, csv.parent)},{label(cls, i)}")
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.toydata import write_synthetic_folders

    return write_synthetic_folders(tmp_path_factory.mktemp("shapes") / "data", classes=3, per_class=6, val_per_class=3)


def _csv_recipe(shapes: Path, folder: Path, **data: object) -> dict:
    """Labels files in ``folder/labels`` over a copy of the images below it (a labels file's images stay below it)."""
    import shutil

    shutil.copytree(shapes, folder / "labels" / "images")
    shapes = folder / "labels" / "images"
    train = _labels_from_folders(shapes, "train", folder / "labels" / "train.csv")
    val = _labels_from_folders(shapes, "val", folder / "labels" / "val.csv", label=lambda cls, i: i)  # indices
    return {
        "model": {"name": "test_resnet"},
        "surgery": {"heads": {"classifier": {}}},
        "data": {"train_csv": str(train), "val_csv": str(val), "img_size": 32, **data},
        "train": {"epochs": 1, "batch_size": 6},
    }


def test_training_run_from_labels_files_then_eval(shapes: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A recipe file names its CSVs relative to itself; the run trains, plans and evaluates from them."""
    import json

    import yaml

    from surgery.cli import main

    recipe = _csv_recipe(shapes, tmp_path)
    # relative to the recipe file; a test labels file (here: val's first two classes only) is scored at the end
    recipe["data"].update(train_csv="labels/train.csv", val_csv="labels/val.csv", test_csv="labels/test.csv")
    rows = (tmp_path / "labels" / "val.csv").read_text().splitlines()
    (tmp_path / "labels" / "test.csv").write_text("\n".join(r for r in rows if not r.endswith(",2")) + "\n")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["plan", str(tmp_path / "recipe.yaml")]) == 0
    assert "classes: 3 (from data.train_csv)" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["class_names"] == ["class_0", "class_1", "class_2"] and metrics["steps"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["data"]["val_csv"] == str(tmp_path / "labels" / "val.csv")  # absolute after loading (surgery.paths)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json", "--out", str(tmp_path / "eval")]) == 0  # the run's val_csv
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(metrics["val_top1"], abs=1e-6)
    assert [c["support"] for c in metrics["test_per_class"]] == [3, 3, 0]
    assert main(["eval", str(tmp_path / "run"), "--split", "test", "--json", "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(metrics["test_top1"], abs=1e-6)


def test_a_float_column_and_threshold_make_two_classes(shapes: Path, tmp_path: Path) -> None:
    from surgery.evaluation import evaluate
    from surgery.train import train

    def score(cls: str, i: int) -> str:
        return "0.9" if cls == "class_2" else f"0.{i + 1}"

    recipe = _csv_recipe(shapes, tmp_path, target_column="label", label_threshold=0.5)
    for split in ("train", "val"):
        _labels_from_folders(tmp_path / "labels" / "images", split, tmp_path / "labels" / f"{split}.csv", label=score)
    result = train(recipe, output_dir=tmp_path / "run", progress=False)
    assert result.class_names == ["0", "1"] and result.model.get_classifier().out_features == 2
    # eval reads a labels file with the training's target column and threshold: 3 of 9 validation images score >= 0.5
    scored = evaluate(tmp_path / "run", tmp_path / "labels" / "val.csv")
    assert scored.support == [6, 3] and scored.top1 == pytest.approx(result.metrics["val_top1"], abs=1e-6)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"root": "somewhere"}, "set either 'root' (class folders) or 'train_csv'/'val_csv' (labels files), not both"),
        ({"val_csv": None}, "'train_csv' needs 'val_csv' too: training reads both labels files"),
        ({"train_csv": None}, "'val_csv' needs 'train_csv' too"),
        ({"test_dir": "test", "test_csv": "t.csv"}, "set either 'test_dir' (a class folder) or 'test_csv'"),
        ({"label_threshold": 0.5}, "'target_column' and 'label_threshold' go together"),
        ({"target_column": "score"}, "'target_column' and 'label_threshold' go together"),
        ({"target_column": "s", "label_threshold": "nan"}, "data.label_threshold"),
    ],
)
def test_recipe_keys_of_labels_files_are_checked_at_load(shapes: Path, tmp_path: Path, data: dict, match: str) -> None:
    from surgery.errors import RecipeError
    from surgery.recipe import load_recipe

    recipe = _csv_recipe(shapes, tmp_path)
    recipe["data"].update(data)
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    with pytest.raises(RecipeError, match=re.escape(match)) as info:
        load_recipe(recipe)
    assert "\n" not in str(info.value)


def _break(case: str, recipe: dict, tmp_path: Path, shapes: Path) -> None:
    val = Path(recipe["data"]["val_csv"])
    if case == "missing-file":
        recipe["data"]["val_csv"] = str(tmp_path / "nope.csv")
    elif case == "unknown-val-label":
        val.write_text(val.read_text().replace(",2\n", ",7\n", 1))
    elif case == "val-lacks-a-class":
        val.write_text("".join(line for line in val.read_text().splitlines(True) if not line.endswith(",1\n")))
    elif case == "same-file":
        recipe["data"]["val_csv"] = recipe["data"]["train_csv"]
    elif case == "missing-image":
        (tmp_path / "labels" / "extra.png").unlink(missing_ok=True)
        val.write_text(val.read_text() + "extra.png,0\n")
    elif case == "undecodable":
        (tmp_path / "labels" / "bad.png").write_bytes(b"not an image")
        val.write_text(val.read_text() + "bad.png,0\n")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing-file", r"^data\.val_csv: .*nope\.csv: labels file does not exist; check the path"),
        ("unknown-val-label", r"^data\.val_csv: .*val\.csv:\d+: label index 7 is out of range for 3 classes"),
        ("val-lacks-a-class", r"^data\.val_csv: .*val\.csv: class 'class_1' \(index 1\) has no rows"),
        ("same-file", r"^data\.val_csv: .*train\.csv is data\.train_csv too; give validation its own held-out images"),
        ("missing-image", r"^data\.val_csv: .*val\.csv:11: 1 listed image\(s\) do not exist: 'extra\.png' \(line 11\)"),
        ("undecodable", r"^cannot decode image '.*bad\.png': .*data\.skip_bad_images"),
    ],
)
def test_bad_labels_data_is_reported_before_training(shapes: Path, tmp_path: Path, case: str, match: str) -> None:
    from surgery.train import train

    recipe = _csv_recipe(shapes, tmp_path)
    _break(case, recipe, tmp_path, shapes)
    with pytest.raises(DataError, match=match) as info:
        train(recipe, progress=False)
    assert "\n" not in str(info.value)


def test_undecodable_images_of_labels_files_can_be_skipped(shapes: Path, tmp_path: Path) -> None:
    from surgery.data.source import validate_data
    from surgery.recipe import load_recipe

    recipe = _csv_recipe(shapes, tmp_path, skip_bad_images=True)
    _break("undecodable", recipe, tmp_path, shapes)
    report = validate_data(load_recipe(recipe))
    assert [p.name for p in report.skipped] == ["bad.png"] and len(report.val) == 9 and len(report.train) == 18
    assert report.classes_source == "data.train_csv (3 classes)"
