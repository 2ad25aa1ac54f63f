"""Stages (contract C-stages): `surgery plan`, training and `surgery.load` get their stage plans from one function,
``surgery.stages.plan_stage``; stage rule errors are located where they are written, through ``extends:`` too."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch

import surgery
import surgery.stages
from surgery.adapter import save_adapter
from surgery.errors import NoMatchingParameterError, SurgeryError
from surgery.recipe import Rule, load_recipe
from tools.toydata import write_synthetic_folders

PATCHED = "patched: conv1 frozen"


@pytest.fixture
def patched_plan_stage(monkeypatch) -> list[int]:
    """``stages.plan_stage`` wrapped: it records the stage index and freezes the stem (``conv1.*``) last in every stage
    (the recipes here have ``train.stages``)."""
    calls: list[int] = []
    real = surgery.stages.plan_stage

    def wrapper(model, recipe, index, first):  # noqa: ANN001, ANN202
        calls.append(index)
        stages = list(recipe.train.stages)
        stage = stages[index]
        stages[index] = stage.model_copy(update={"rules": [*stage.rules, Rule(freeze="conv1.*", name=PATCHED)]})
        patched = recipe.model_copy(update={"train": recipe.train.model_copy(update={"stages": stages})})
        patched._origins, patched._source = recipe._origins, recipe._source
        return real(model, patched, index, first)

    monkeypatch.setattr(surgery.stages, "plan_stage", wrapper)
    return calls


def _recipe(root: Path | None = None) -> dict:
    recipe = {
        "model": {"name": "test_resnet"},
        "surgery": {"heads": {"fc": {"num_classes": 2}}},
        "train": {"stages": [{"epochs": 1}, {"epochs": 1, "rules": [{"unfreeze": "*"}]}], "batch_size": 4},
    }
    if root is not None:
        recipe["data"] = {"root": str(root), "img_size": 32}
    return recipe


def _stem_frozen(model: torch.nn.Module) -> bool:
    return not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("conv1."))


def test_plan_train_and_load_read_one_stage_function(patched_plan_stage: list[int], tmp_path: Path) -> None:
    # surgery plan
    described = surgery.plan_recipe(_recipe())
    assert patched_plan_stage == [0, 1]
    assert all(p[name].rule == PATCHED for _, p in described.stages for name in ("conv1.0.weight",))
    assert not described.stages[-1][1]["conv1.0.weight"].trainable

    # surgery.load: the adapter of a model staged through the patched function, loaded again through it
    patched_plan_stage.clear()
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    base = copy.deepcopy(model)
    plans = [p for _, p in surgery.stages.plan_stages(model, load_recipe(_recipe()))]
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    save_adapter(model.eval(), plans[-1], tmp_path / "ad", base=base, recipe=load_recipe(_recipe()))
    patched_plan_stage.clear()
    loaded = surgery.load(tmp_path / "ad", base=copy.deepcopy(base))
    assert patched_plan_stage, "surgery.load replays the stages through stages.plan_stage"
    assert _stem_frozen(loaded if isinstance(loaded, torch.nn.Module) else loaded.model)

    # training: a tiny run on generated folders
    patched_plan_stage.clear()
    write_synthetic_folders(tmp_path / "data", classes=2, per_class=4, val_per_class=2, size=32)
    result = surgery.train(_recipe(tmp_path / "data"), progress=False)
    assert patched_plan_stage[:2] == [0, 1], "training plans each stage through stages.plan_stage"
    assert _stem_frozen(result.model)


def test_stage_rule_errors_are_located_where_written_through_extends(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "model: test_resnet\n"
        "surgery:\n"
        "  rules: [{freeze: '*'}, {unfreeze: 'fc.*'}]\n"
        "train:\n"
        "  stages:\n"
        "    - epochs: 1\n"
        "    - epochs: 1\n"
        "      rules:\n"
        "        - unfreeze: '*'\n"
        "        - unfreeze: nosuchlayer\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: shared/base.yaml\noptim: {lr: 0.1}\n")
    with pytest.raises(
        NoMatchingParameterError, match=r"shared/base\.yaml:10: train\.stages\[1\]\.rules\[1\]\.unfreeze"
    ):
        surgery.plan_recipe(child)
    (tmp_path / "shared" / "base.yaml").write_text(
        (tmp_path / "shared" / "base.yaml").read_text().replace("unfreeze: nosuchlayer", "unfreeze: {from: 99}")
    )
    with pytest.raises(SurgeryError, match=r"shared/base\.yaml:10: train\.stages\[1\]\.rules\[1\]\.unfreeze\.from"):
        surgery.plan_recipe(child)
    # a rule the child adds to the parent's stage: the child's file and line
    child.write_text(
        "extends: shared/base.yaml\ntrain:\n  stages:\n    _replace_:\n      - epochs: 1\n"
        "        rules: [{select: zzz, lr: 1}]\n"
    )
    with pytest.raises(NoMatchingParameterError, match=r"child\.yaml:6: train\.stages\[0\]\.rules\[0\]\.select"):
        surgery.plan_recipe(child)


def test_a_first_stage_rule_may_select_the_new_head_and_its_typos_are_located(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    text = (
        "model: test_resnet\n"
        "surgery:\n"
        "  rules: [{freeze: '*'}]\n"
        "  heads: {fc: {num_classes: 3, type: mlp, hidden: [16]}}\n"
        "train:\n"
        "  stages:\n"
        "    - epochs: 1\n"
        "      rules: [{select: 'fc.0.*', weight_decay: 0.5}]\n"
    )
    recipe.write_text(text)
    first = surgery.plan_recipe(recipe).plan
    assert first["fc.0.weight"].trainable and first["fc.0.weight"].weight_decay == 0.5
    recipe.write_text(text.replace("fc.0.*", "fcc.0.*"))
    with pytest.raises(NoMatchingParameterError, match=r"r\.yaml:8: train\.stages\[0\]\.rules\[0\]\.select"):
        surgery.plan_recipe(recipe)
