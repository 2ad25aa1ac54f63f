"""`surgery plan` over the API (surgery.render.plan_recipe): everything shown comes from the resolved recipe, the
optimizer with every argument, the class count from data.root, fixed-size models fitted to data.img_size, and the
`surgery recipes` listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgery
import surgery.recipe
from surgery.cli import main
from surgery.errors import HeadError
from tools.toydata import write_synthetic_folders


def test_plan_recipe_is_what_surgery_plan_prints(capsys) -> None:
    described = surgery.plan_recipe("linear-probe", model="test_resnet", num_classes=4)
    assert isinstance(described, surgery.RecipePlan)
    assert main(["plan", "linear-probe", "--model", "test_resnet", "--num-classes", "4"]) == 0
    assert capsys.readouterr().out.strip() == described.table()
    assert main(["plan", "linear-probe", "--model", "test_resnet", "--num-classes", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(described.to_dict()))
    assert described.plan.heads[0].num_classes == 4


def test_num_classes_loads_the_recipe_once(monkeypatch, capsys) -> None:
    calls: list[str] = []
    real = surgery.recipe.load_recipe

    def counting(*args, **kwargs):
        calls.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery.recipe, "load_recipe", counting)
    assert main(["plan", "linear-probe", "--model", "test_resnet", "--num-classes", "3"]) == 0
    assert calls == ["linear-probe"]
    assert "classes)" in capsys.readouterr().out


def test_layer_decay_from_the_command_line_is_what_the_plan_prints(capsys) -> None:
    assert main(["plan", "llrd", "--model", "test_vit", "--num-classes", "3", "optim.layer_decay=0.65"]) == 0
    out = capsys.readouterr().out
    assert "layer_decay=0.65" in out
    assert "0.75" not in out, "every number shown comes from the resolved recipe"


def test_sgd_is_printed_with_every_argument_and_momentum_is_a_key(capsys) -> None:
    assert main(["plan", "linear-probe", "--model", "test_resnet", "--num-classes", "2", "optim.name=sgd"]) == 0
    out = capsys.readouterr().out
    assert "Optimizer: SGD(lr=0.001, momentum=0.9, dampening=0, weight_decay=0, nesterov=True)" in out
    described = surgery.plan_recipe(
        "linear-probe", ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0"], model="test_resnet", num_classes=2
    )
    assert described.optimizer == "SGD(lr=0.05, momentum=0, dampening=0, weight_decay=0, nesterov=False)"
    with pytest.raises(surgery.RecipeError, match="optim.momentum: optimizer 'adamw' has no momentum"):
        surgery.plan_recipe("linear-probe", ["optim.momentum=0.5"], model="test_resnet", num_classes=2)


def test_the_class_count_comes_from_data_root(tmp_path: Path, capsys) -> None:
    write_synthetic_folders(tmp_path / "d", classes=5, per_class=1, val_per_class=1, size=8)
    described = surgery.plan_recipe("linear-probe", [f"data.root={tmp_path / 'd'}"], model="test_resnet")
    assert described.plan.heads[0].num_classes == 5
    assert "Note: classes: 5 (from data.root)" in described.table()
    with pytest.raises(HeadError, match="class count is not set"):
        surgery.plan_recipe("linear-probe", [f"data.root={tmp_path / 'missing'}"], model="test_resnet")


def test_a_fixed_size_model_is_built_for_data_img_size() -> None:
    described = surgery.plan_recipe("linear-probe", ["data.img_size=32"], model="test_vit", num_classes=2)
    assert described.recipe.model.kwargs["img_size"] == 32
    assert any("model.kwargs.img_size: 32 (from data.img_size" in n for n in described.notes)
    model = surgery.build_model(described.recipe.model)
    surgery.apply(model, described.recipe)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2), "no AssertionError inside the model"
    same = surgery.plan_recipe("linear-probe", ["data.img_size=160"], model="test_vit", num_classes=2)
    assert "img_size" not in same.recipe.model.kwargs and not same.notes


def test_surgery_recipes_lists_and_prints(capsys) -> None:
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "linear-probe" in listing and "the backbone is frozen" in listing
    assert main(["recipes", "linear-probe"]) == 0
    text = capsys.readouterr().out
    assert text == surgery.builtin_recipes()["linear-probe"].read_text()
    assert main(["recipes", "nope"]) == 2
    assert "no built-in recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary\x89PNG", b"model: caf\xe9\n"])
def test_a_recipe_file_that_is_not_text_is_one_line(tmp_path: Path, capsys, content: bytes) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "Traceback" not in err and "internal error" not in err
