"""surgery eval (surgery.evaluate): a run folder, an adapter folder and a hub reference scored on class folders and
labels CSV files with the training's data config and classes; the numbers agree with the run's own metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import save_file

import surgery
from surgery.cli import main
from surgery.data.transforms import resolve_data_cfg
from surgery.errors import AdapterError, DataError, SurgeryError
from surgery.evaluation import CONFUSION_PNG, METRICS_JSON, PREDICTIONS_CSV, EvalModel, evaluate, load_for_eval
from surgery.metrics import EvalResult, read_predictions_csv
from surgery.recipe import load_recipe
from surgery.train import train
from tools.toydata import write_synthetic_folders

ADAPTER_FILES = ("adapter.safetensors", "surgery.json", "README.md")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_synthetic_folders(tmp_path_factory.mktemp("shapes") / "data", classes=3, per_class=8, val_per_class=4)
    write_synthetic_folders(root / "more", classes=3, per_class=1, val_per_class=3, seed=5)
    shutil.move(root / "more" / "val", root / "test")  # a held-out test split of other images
    shutil.rmtree(root / "more")
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def run(data: Path, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    recipe = {
        "model": {"name": "test_resnet", "checkpoint": str(base)},
        "surgery": {"heads": {"classifier": {}}},
        "optim": {"lr": 3e-3},
        "data": {"root": str(data), "img_size": 40},
        "train": {"epochs": 2, "batch_size": 8, "seed": 1},
    }
    with pytest.warns(UserWarning, match="local checkpoint"):
        train(recipe, output_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def adapter(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "ad"
    folder.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(run / name, folder / name)
    return folder


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _labels_csv(folder: Path, split: Path, name: str = "labels.csv", *, index: bool = False) -> Path:
    classes = sorted(p.name for p in split.iterdir())
    rows = ["path,label"]
    for i, cls in enumerate(classes):
        for img in sorted((split / cls).iterdir()):
            rows.append(f"{img.relative_to(folder)},{i if index else cls}")
    path = folder / name
    path.write_text("\n".join(rows) + "\n")
    return path


def test_eval_json_on_a_run_folder_prints_the_top1_of_its_metrics_json(run: Path, data: Path, tmp_path, capsys) -> None:
    for extra in (["--data", str(data)], []):  # the data root's val/, or the split the run's recipe names
        assert main(["eval", str(run), *extra, "--json", "--out", str(tmp_path / "out")]) == 0
        printed = json.loads(capsys.readouterr().out)
        # the same images right: the trainer averages in float32, hence the tolerance
        assert printed["top1"] == pytest.approx(_metrics(run)["val_top1"], abs=1e-6)
        assert round(printed["top1"] * 12) == round(_metrics(run)["val_top1"] * 12)
        assert printed["loss"] == pytest.approx(_metrics(run)["val_loss"], rel=1e-5)
        assert printed["num_samples"] == 12 and printed["class_names"] == ["class_0", "class_1", "class_2"]
        assert printed["top5"] is None  # 3 classes: top-5 is not reported
    out = tmp_path / "out"
    rows = read_predictions_csv(out / PREDICTIONS_CSV)
    assert len(rows) == 12 and rows[0].path == "class_0/000.png"
    assert sum(r.correct for r in rows) / 12 == pytest.approx(printed["top1"])
    assert Image.open(out / CONFUSION_PNG).size[0] > 100
    assert json.loads((out / METRICS_JSON).read_text())["top1"] == printed["top1"]
    assert sum(map(sum, printed["confusion"])) == 12


def test_eval_table_and_the_test_split(run: Path, data: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(run), "--data", str(data), "--split", "test", "--out", str(tmp_path / "t")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("9 images, 3 classes\ntop-1 ")
    assert "macro-F1" in text and "balanced accuracy" in text and "class_2" in text
    result = evaluate(run, data / "test")  # the class folders themselves
    assert isinstance(result, EvalResult) and result.num_samples == 9 and result.support == [3, 3, 3]
    assert f"top-1 {result.top1:.4f}" in text


def test_the_api_uses_the_training_data_config_and_classes(run: Path) -> None:
    trained = load_for_eval(run)
    assert trained.data_config["input_size"] == (3, 40, 40)  # data.img_size of training, not the model's default
    assert trained.class_names == ["class_0", "class_1", "class_2"]
    assert trained.channels_last  # a convnet trains channels-last (train.channels_last: auto): eval does too
    assert isinstance(surgery.evaluate, type(evaluate)) and surgery.EvalResult is EvalResult


def test_adapter_folder_and_labels_csv_give_the_same_numbers(run: Path, adapter: Path, data: Path, base: Path) -> None:
    want = evaluate(run, data)
    got = evaluate(adapter, data, base=base)
    assert got.top1 == want.top1 and got.confusion == want.confusion
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    for index in (False, True):  # labels as class names, or as indices of the model's classes
        csv = _labels_csv(data, data / "val", index=index)
        assert evaluate(run, csv).confusion == want.confusion
    with pytest.raises(AdapterError, match="--base"):
        evaluate(adapter, data)  # the base checkpoint is needed, as for surgery load


def test_a_hub_reference_is_evaluated(
    adapter: Path, run: Path, data: Path, base: Path, hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery.adapter import push

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", hub_server.tokens["alice"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.warns(UserWarning, match="local checkpoint"):
        pushed = push(adapter, "alice/eval-net", progress=False)
    got = evaluate(pushed.ref, data, base=base)
    assert got.top1 == evaluate(run, data).top1
    monkeypatch.chdir(tmp_path)  # the default --out folder is output/eval/...
    assert main(["eval", "hf-hub:alice/eval-net", "--data", str(data), "--base", str(base), "--json"]) == 0
    assert list((tmp_path / "output" / "eval").glob(f"*/{PREDICTIONS_CSV}"))


def _extra_class(data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    shutil.copytree(data / "val", root / "val")
    shutil.copytree(data / "val" / "class_0", root / "val" / "zebra")
    return root


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("extra-class", r"class folder '.*zebra' is not one of the model's 3 classes \(class_0, class_1, class_2\)"),
        ("csv-unknown", r"labels.csv:2: unknown label 'zebra'; use one of the classes class_0, class_1, class_2"),
        ("empty-class", r"class folder '.*class_1' has no images; add images or remove the folder"),
        ("no-split", r"evaluation folder '.*nothing' does not exist"),
        ("not-a-model", r"neither a run folder \(recipe.yaml \+ model.safetensors\) nor an adapter folder"),
        ("no-source", r"no such folder; give a run folder"),
        ("broken-image", r"cannot decode image '.*000.png'"),
    ],
)
def test_data_or_model_that_does_not_fit_is_refused_in_one_line(
    run: Path, data: Path, tmp_path: Path, capsys, case: str, match: str
) -> None:
    source, target = str(run), str(data)
    if case == "extra-class":
        target = str(_extra_class(data, tmp_path))
    elif case == "csv-unknown":
        (tmp_path / "a.png").write_bytes((data / "val" / "class_0" / "000.png").read_bytes())
        (tmp_path / "labels.csv").write_text("path,label\na.png,zebra\n")
        target = str(tmp_path / "labels.csv")
    elif case == "empty-class":
        shutil.copytree(data / "val", tmp_path / "v")
        shutil.rmtree(tmp_path / "v" / "class_1")
        (tmp_path / "v" / "class_1").mkdir()
        target = str(tmp_path / "v")
    elif case == "no-split":
        target = str(tmp_path / "nothing")
    elif case == "not-a-model":
        source = str(data)
    elif case == "no-source":
        source = str(tmp_path / "missing")
    elif case == "broken-image":
        shutil.copytree(data / "val", tmp_path / "v")
        (tmp_path / "v" / "class_2" / "000.png").write_bytes(b"not a png")
        target = str(tmp_path / "v")
    with pytest.raises(SurgeryError, match=match):
        evaluate(source, target)
    assert main(["eval", source, "--data", target, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("surgery: error: ")


def test_a_subset_of_classes_is_scored_with_the_models_class_indices(run: Path, data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "val" / "class_2", tmp_path / "only" / "class_2")
    result = evaluate(run, tmp_path / "only")
    assert result.support == [0, 0, 4] and result.num_classes == 3
    full = evaluate(run, data)
    assert result.confusion[2] == full.confusion[2]  # same rows for the images of class_2


def test_a_one_logit_binary_run_is_scored_with_binary_cross_entropy(data: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    for split in ("val", "test"):
        for cls in ("class_0", "class_1"):
            shutil.copytree(data / split / cls, two / split / cls)
    shutil.copytree(two / "val", two / "train")
    recipe = {
        "model": {"name": "test_resnet", "kwargs": {"num_classes": 1}},  # one logit on two classes: loss auto = bce
        "data": {"root": str(two), "img_size": 32},
        "train": {"epochs": 1, "batch_size": 4},
    }
    run = train(recipe, output_dir=tmp_path / "run", progress=False)
    trained = EvalModel(
        model=run.model,
        class_names=run.class_names,
        data_config=resolve_data_cfg(run.model, img_size=32),
        recipe=load_recipe(recipe),
        channels_last=True,
        name="binary",
    )
    result = evaluate(trained, two)
    assert result.binary and result.num_classes == 2 and result.class_names == ["class_0", "class_1"]
    assert result.top1 == pytest.approx(run.metrics["val_top1"], abs=1e-6)
    assert result.loss == pytest.approx(run.metrics["val_loss"], rel=1e-5)
    # the run folder's adapter names both classes of its one logit; eval of the folder scores the same
    saved = json.loads((tmp_path / "run" / "surgery.json").read_text())
    assert saved["class_names"] == ["class_0", "class_1"]
    assert evaluate(tmp_path / "run", two).top1 == pytest.approx(run.metrics["val_top1"], abs=1e-6)


def test_default_data_is_the_runs_own_split_and_adapters_need_data(run: Path, adapter: Path, base: Path) -> None:
    assert evaluate(run, split="test").num_samples == 9  # data.root/test of the run's recipe
    with pytest.raises(DataError, match=r"an adapter names no data of this machine; pass --data"):
        evaluate(adapter, base=base)
