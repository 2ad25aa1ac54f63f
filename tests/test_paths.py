"""The one path rule (surgery.paths): a relative path is relative to the recipe file that wrote it, through
``extends:`` too; mappings and command-line overrides are relative to the working folder; loaded paths are absolute."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import surgery
from surgery.paths import path_keys
from tools.toydata import write_synthetic_folders


def test_the_schema_marks_its_path_keys() -> None:
    assert {("model", "checkpoint"), ("data", "root"), ("train", "output_dir")} <= set(path_keys())


def test_paths_are_relative_to_the_recipe_file_that_wrote_them(tmp_path: Path, monkeypatch) -> None:
    parent_dir, child_dir, cwd = tmp_path / "shared", tmp_path / "project" / "exp", tmp_path / "elsewhere"
    for d in (parent_dir, child_dir, cwd):
        d.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    (parent_dir / "base.yaml").write_text(
        "model: {name: test_resnet, checkpoint: weights/w.safetensors}\ndata: {root: ../imgs}\n"
    )
    (child_dir / "child.yaml").write_text("extends: ../../shared/base.yaml\ntrain: {output_dir: out}\n")
    recipe = surgery.load_recipe(child_dir / "child.yaml")
    assert recipe.model.checkpoint == str(parent_dir / "weights" / "w.safetensors"), "from the parent's folder"
    assert recipe.data.root == str(tmp_path / "imgs"), "from the parent's folder, through extends"
    assert recipe.train.output_dir == str(child_dir / "out"), "from the child's folder"

    # the child overrides data.root: now its own folder counts
    (child_dir / "child.yaml").write_text("extends: ../../shared/base.yaml\ndata: {root: imgs}\n")
    assert surgery.load_recipe(child_dir / "child.yaml").data.root == str(child_dir / "imgs")

    # command-line overrides and mappings: the working folder
    overridden = surgery.load_recipe(child_dir / "child.yaml", ["data.root=mine", "model.checkpoint=~/w.safetensors"])
    assert overridden.data.root == str(cwd / "mine")
    assert overridden.model.checkpoint == str(Path("~/w.safetensors").expanduser())
    assert surgery.load_recipe({"data": {"root": "d"}}).data.root == str(cwd / "d")
    whole = surgery.load_recipe(child_dir / "child.yaml", ["data={root: x}"])
    assert whole.data.root == str(cwd / "x"), "an override of the whole section is the working folder's too"
    local = surgery.load_recipe(child_dir / "child.yaml", ["model.name=local-dir:m"])
    assert local.model.name == f"local-dir:{cwd / 'm'}"


def test_a_relative_checkpoint_and_data_root_train_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    """The recipe lives in one folder, its checkpoint and data next to it, and the run starts somewhere else."""
    folder = tmp_path / "recipes"
    write_synthetic_folders(folder / "data", classes=2, per_class=4, val_per_class=2, size=32)
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=2)
    save_file(source.state_dict(), str(folder / "w.safetensors"))
    (folder / "r.yaml").write_text(
        "model: {name: test_resnet, checkpoint: w.safetensors, kwargs: {num_classes: 2}}\n"
        "data: {root: data, img_size: 32}\nsurgery: {rules: [{freeze: '*'}, {unfreeze: fc}]}\n"
        "train: {epochs: 1, batch_size: 4}\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = surgery.load_recipe(folder / "r.yaml")
    model = surgery.build_model(recipe.model)
    assert torch.equal(model.fc.weight, source.fc.weight)
    result = surgery.train(recipe, output_dir=tmp_path / "out", progress=False)
    assert result.class_names == ["class_0", "class_1"]


@pytest.mark.parametrize("name", ["linear-probe", "full-finetune"])
def test_builtin_recipes_hold_no_relative_paths(name: str) -> None:
    recipe = surgery.load_recipe(name, ["data.root=x"])
    assert Path(recipe.data.root).is_absolute()
