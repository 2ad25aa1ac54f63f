"""surgery lr-find: the exponential sweep over the plan's param groups (ratios kept), the steepest-descent suggestion,
the plot, and nothing changed on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from surgery.cli import main
from surgery.errors import RecipeError
from surgery.train.lr_find import LrFindResult, lr_find, steepest
from tools.toydata import write_synthetic_folders


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe file with a base checkpoint, a head at 10x the backbone's lr and an output folder it must not create."""
    root = tmp_path_factory.mktemp("lrf")
    write_synthetic_folders(root / "data", classes=3, per_class=8, val_per_class=2)
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), str(root / "base.safetensors"))
    recipe = {
        "model": {"name": "test_resnet", "checkpoint": "base.safetensors"},
        "surgery": {"rules": [{"freeze": "*"}, {"unfreeze": "layer4"}], "heads": {"classifier": {"lr_mult": 10}}},
        "optim": {"name": "sgd", "lr": 0.01},
        "data": {"root": "data", "img_size": 32, "augment": "none"},
        "train": {"batch_size": 8, "output_dir": "run"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("center", [1e-4, 1e-2, 1.0])
def test_steepest_finds_where_the_loss_falls_fastest(center: float) -> None:
    lrs = np.logspace(-7, 1, 100)
    loss = 2 - np.tanh(2 * (np.log10(lrs) - np.log10(center)))  # falls fastest at `center`
    got = steepest(list(lrs), list(loss))
    assert got is not None and abs(np.log10(got) - np.log10(center)) < 0.1
    assert steepest(list(lrs[:7]), list(loss[:7])) is None  # too few steps left after the skips


def test_lr_find_sweeps_keeps_group_ratios_and_changes_nothing_on_disk(setup: Path, tmp_path: Path) -> None:
    before = _digests(setup)
    result = lr_find(setup / "recipe.yaml", start_lr=1e-5, end_lr=1.0, steps=12, plot=tmp_path / "lr.png")
    assert isinstance(result, LrFindResult)
    assert sorted(set(result.ratios)) == [1.0, 10.0]  # layer4 at optim.lr, the head at 10x
    assert result.lrs[0] == pytest.approx(1e-5) and len(result.lrs) == len(result.losses) == len(result.smoothed)
    assert np.allclose(np.diff(np.log(result.lrs)), np.log(10) * 5 / 11)  # exponential steps
    if not result.diverged:
        assert result.lrs[-1] == pytest.approx(1.0) and len(result.lrs) == 12
    assert result.suggestion is None or result.suggestion in result.lrs
    assert Image.open(tmp_path / "lr.png").size[0] > 100 and result.plot == tmp_path / "lr.png"
    assert _digests(setup) == before and not (setup / "run").exists()  # recipe, base and data untouched, no run


def test_lr_find_stops_when_the_loss_diverges(setup: Path) -> None:
    result = lr_find(setup / "recipe.yaml", ["optim.lr=1"], start_lr=1e-3, end_lr=1e8, steps=60)
    assert result.diverged and len(result.lrs) < 60 and result.key == "optim.lr"


def test_a_first_stage_lr_is_the_swept_key(setup: Path) -> None:
    stages = "train.stages=[{epochs: 1, lr: 0.001}, {epochs: 1, rules: [{unfreeze: '*'}]}]"
    result = lr_find(setup / "recipe.yaml", [stages], start_lr=1e-4, end_lr=1e-2, steps=6)
    assert result.key == "train.stages[0].lr" and sorted(set(result.ratios)) == [1.0, 10.0]


def test_cli_prints_the_suggestion_and_writes_the_plot(setup: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["lr-find", str(setup / "recipe.yaml"), "--steps", "30", "--start-lr", "1e-4", "--end-lr", "10"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "swept optim.lr from 1.00e-04" in text and "param groups keep their lr ratios: " in text
    assert "suggested lr: " in text and "optim.lr=" in text
    assert [p.name for p in (tmp_path / "output" / "lr-find").glob("*/*")] == ["lr_find.png"]
    assert main([*args, "--json", "--out", str(tmp_path / "p.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plot"] == str(tmp_path / "p.png") and len(printed["lrs"]) == len(printed["losses"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--start-lr", "1", "--end-lr", "0.1"], "need 0 < start lr < end lr, got 1 and 0.1"),
        (["--steps", "1"], "need at least 2 steps, got 1"),
    ],
)
def test_bad_sweeps_are_one_line_errors(setup: Path, capsys, extra: list[str], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        main(["--debug", "lr-find", str(setup / "recipe.yaml"), *extra])
    assert main(["lr-find", str(setup / "recipe.yaml"), *extra]) == 2
    assert capsys.readouterr().err.strip() == f"surgery: error: lr-find: {match}"
