"""BatchNorm conversions (surgery.norms): static classes, so a model after surgery.apply pickles and deep-copies under
every norm policy, and ``stats_move`` is the one test of moving statistics."""

from __future__ import annotations

import copy
import io
import typing

import pytest
import timm
import torch
from torch import nn

import surgery
from surgery.norms import StatsFixed, stats_move
from surgery.recipe import SurgerySpec

POLICIES = typing.get_args(SurgerySpec.model_fields["norm"].annotation)


def _bn1d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8), nn.BatchNorm1d(8),
        nn.Linear(8, 2),
    )  # fmt: skip


MODELS = {
    "test_resnet": lambda: timm.create_model("test_resnet", pretrained=False),
    "test_efficientnet": lambda: timm.create_model("test_efficientnet", pretrained=False),  # BatchNormAct2d
    "test_vit": lambda: timm.create_model("test_vit", pretrained=False),  # no BatchNorm
    "sequential-bn1d": _bn1d_model,
}


def _input(name: str) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8) + 1 if name == "sequential-bn1d" else torch.randn(2, 3, 32, 32) + 1


def test_policies_are_the_schema_values() -> None:
    assert set(POLICIES) == {"auto", "frozen", "eval", "train"}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_after_apply_pickles_and_deep_copies(name: str, policy: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    recipe = {"surgery": {"norm": policy, "rules": [{"freeze": "*"}, {"unfreeze": {"from": -1}}]}}
    surgery.apply(model, recipe)
    if policy in ("auto", "eval") and name != "test_vit":
        assert any(isinstance(m, StatsFixed) for m in model.modules()), "the policy converted something"
    buffer = io.BytesIO()
    torch.save(model, buffer)  # PicklingError before the classes were static
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)
    for other in (loaded, copied):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        assert [stats_move(m) for m in other.modules()] == [stats_move(m) for m in model.modules()]
    # the same statistics behaviour in training: the same buffers move, by the same amount
    x = _input(name)
    outputs = []
    for m in (model, loaded, copied):
        m.train()
        outputs.append(m(x))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.state_dict().values(), copied.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("policy", POLICIES)
def test_stats_move_is_what_training_does(policy: str) -> None:
    """For every BatchNorm, ``stats_move`` says exactly whether a training step changes its running statistics."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    surgery.apply(model, {"surgery": {"norm": policy, "rules": [{"freeze": "*"}, {"unfreeze": "layer4"}]}})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 3, 32, 32) * 2 + 1)
    after = model.state_dict()
    for path, module in model.named_modules():
        key = f"{path}.running_mean"
        if key in before:
            assert stats_move(module) == (not torch.equal(before[key], after[key])), (policy, path)
    moving = [p for p, m in model.named_modules() if stats_move(m)]
    if policy == "train":
        assert "bn1" in moving
    elif policy == "eval":
        assert moving == [], "norm: eval fixes every BatchNorm's statistics"
    else:
        assert "bn1" not in moving and any(p.startswith("layer4") for p in moving)


class _CustomBatchNorm(nn.BatchNorm2d):
    """A BatchNorm class of someone else's: no stats-fixed form is defined for it."""


def test_a_batchnorm_class_without_a_stats_fixed_form_is_named_not_converted_at_run_time() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _CustomBatchNorm(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    p = surgery.apply(model, {"surgery": {"rules": [{"freeze": "*"}, {"unfreeze": "4"}]}})
    assert any("1: _CustomBatchNorm has no stats-fixed form" in w for w in p.warnings), p.warnings
    assert type(model[1]) is _CustomBatchNorm and stats_move(model[1]), "left as it is, and said so"
    frozen = surgery.apply(
        copy.deepcopy(model), {"surgery": {"norm": "frozen", "rules": [{"freeze": "*"}, {"unfreeze": "4"}]}}
    )
    assert [n.becomes for n in frozen.norms] == ["FrozenBatchNorm2d"], "norm: frozen still converts a BatchNorm2d"
