"""Every built-in recipe plans and applies on many architectures, and one optimizer step moves exactly what the plan
says trains: no frozen parameter and no frozen BatchNorm statistic moves (timm's flat, parametrized style)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import surgery
from surgery.recipe import builtin_recipes

# (timm name, create_model kwargs, input size). Small configs keep the whole table fast on two CPU cores.
ZOO: list[tuple[str, dict, int]] = [
    ("test_byobnet", {}, 64),
    ("test_coatnet", {}, 160),
    ("test_convnext", {}, 64),
    ("test_convnext2", {}, 64),
    ("test_convnext3", {}, 64),
    ("test_efficientnet", {}, 64),
    ("test_efficientnet_gn", {}, 64),
    ("test_efficientnet_ln", {}, 64),
    ("test_efficientnet_evos", {}, 64),
    ("test_maxvit", {"img_size": 64}, 64),
    ("test_nfnet", {}, 64),
    ("test_resnet", {}, 64),
    ("test_vit", {"img_size": 64}, 64),
    ("test_vit2", {"img_size": 64}, 64),
    ("test_vit3", {"img_size": 64}, 64),
    ("test_vit_relpos", {"img_size": 64}, 64),
    ("test_mambaout", {}, 64),
    ("resnet18", {}, 64),
    ("resnet50d", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32),
    ("convnext_atto", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("regnetx_002", {}, 64),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2, "depths": (1, 1, 1, 1)}, 64),
    ("maxvit_nano_rw_256", {"img_size": 64}, 64),
    ("coatnet_nano_rw_224", {"img_size": 64}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    ("eva02_tiny_patch14_224", {"img_size": 28}, 28),
    ("beit_base_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 96, "num_heads": 2}, 32),
    ("mobilevitv2_050", {}, 64),
    ("ghostnet_050", {}, 64),
    ("repvgg_a0", {}, 64),
    ("fastvit_t8", {}, 64),
]
RECIPES = sorted(builtin_recipes())


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buf}": getattr(m, buf).detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        for buf in ("running_mean", "running_var")
    }


def _frozen_bn_paths(plan: surgery.Plan) -> set[str]:
    return {n.path for n in plan.norms}


def one_step(model: nn.Module, plan: surgery.Plan, size: int, *, classes: int = 10, inputs=None) -> None:
    """Apply one AdamW step on random data and check what moved against the plan."""
    torch.manual_seed(0)
    inputs = torch.randn(4, 3, size, size) if inputs is None else inputs
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = _bn_stats(model)
    fixed = _frozen_bn_paths(plan)
    optimizer = torch.optim.AdamW(plan.param_groups(model))
    # Every optimizer group carries the plan's real lr: no lr_scale indirection.
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert plan[name].lr == group["lr"] and plan[name].weight_decay == group["weight_decay"]
    model.train()
    out = model(inputs)
    assert out.shape == (len(inputs), classes)
    nn.functional.cross_entropy(out, torch.arange(len(inputs)) % classes).backward()
    optimizer.step()

    trainable = set(plan.trainable_names)
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if name not in trainable:
            assert not moved, f"frozen parameter {name} moved"
            assert p.grad is None, f"frozen parameter {name} got a gradient"
        elif p.grad is not None and p.grad.abs().max() > 1e-6:  # Adam barely moves on vanishing gradients
            assert moved, f"trainable parameter {name} did not move"
    stats_after = _bn_stats(model)
    for key, value in stats_before.items():
        module = key.rsplit(".", 1)[0]
        if module in fixed:
            assert torch.equal(value, stats_after[key]), f"fixed BatchNorm statistic {key} moved"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("name", "kwargs", "size"), ZOO, ids=[z[0] for z in ZOO])
def test_builtin_recipe_on_timm_model(name: str, kwargs: dict, size: int, recipe: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    plan = surgery.apply(model, recipe, num_classes=10)
    assert plan.trainable_params > 0
    if getattr(model, "num_classes", None) is not None:
        assert model.num_classes == 10, "timm's num_classes must stay truthful after the head is replaced"
    if recipe == "linear-probe":
        assert set(plan.trainable_names) == {n for h in plan.heads for n in h.params}
        # every BatchNorm in the frozen backbone keeps its statistics fixed
        assert all(n.action == "eval" for n in plan.norms)
    if recipe == "bn-frozen":
        assert plan.frozen_params == 0
    one_step(model, plan, size)


def test_layer_decay_and_partial_match_timm_groups() -> None:
    model = timm.create_model("test_vit", pretrained=False)
    partial = surgery.plan(model, "partial", num_classes=10)
    n = len(partial.layers)
    frozen_layers = {p.layer for p in partial.parameters if not p.trainable}
    assert frozen_layers == set(range(round(n / 2))), "partial freezes exactly the first half of the layers"


TORCHVISION_FC = {"extends": "linear-probe", "surgery": {"heads": {"_replace_": {"fc": {"num_classes": 10}}}}}


@pytest.mark.parametrize("recipe", RECIPES)
def test_builtin_recipe_on_torchvision_resnet18(recipe: str) -> None:
    model = torchvision.models.resnet18(weights=None)
    spec = {"extends": recipe, "surgery": {"heads": {"_replace_": {"fc": {"num_classes": 10}}}}}
    plan = surgery.apply(model, spec)
    fc = model.fc.modules_to_save["default"] if recipe == "lora" else model.fc  # lora: the head is PEFT's to save
    assert isinstance(fc, nn.Linear) and fc.out_features == 10
    one_step(model, plan, 64)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 1))


@pytest.mark.parametrize("recipe", RECIPES)
def test_builtin_recipe_on_plain_mlp(recipe: str) -> None:
    model = mlp()
    spec = {"extends": recipe, "surgery": {"heads": {"_replace_": {"5": {"num_classes": 3}}}}}
    plan = surgery.apply(model, spec)
    assert [la.name for la in plan.layers] == ["0", "2", "3", "5"]
    one_step(model, plan, 0, classes=3, inputs=torch.randn(8, 2))
