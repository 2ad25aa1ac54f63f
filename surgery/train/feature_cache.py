"""The linear-probe feature cache: when only the head trains and nothing before it is random, the backbone's output
is the same every epoch, so it is computed once and the head trains on the stored features.

:func:`feature_cache_reason` is the pure part (plan + recipe; ``surgery plan`` prints it). :func:`runtime_reason`
checks the built model itself (timm's ``forward_features``/``forward_head``, no active dropout or drifting BatchNorm
outside the head, and the cached path computing the same logits as the model on a probe batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from surgery.norms import stats_move
from surgery.plan import Plan
from surgery.recipe import Recipe


def head_path(plan: Plan) -> str | None:
    """The one new head every trainable parameter belongs to, or None."""
    if len(plan.heads) != 1:
        return None
    path = plan.heads[0].path
    if all(p.name.startswith(path + ".") for p in plan.parameters if p.trainable):
        return path
    return None


def feature_cache_reason(plan: Plan, recipe: Recipe, *, custom_data: bool = False) -> str | None:
    """Why the feature cache cannot be used for ``plan`` (one line), or None when it applies (pure, no model run).

    With stages, each stage is checked with its own plan; ``surgery plan`` shows the first stage's.
    """
    if recipe.train.feature_cache == "off":
        return "train.feature_cache is off"
    if plan.lora is not None:
        return "surgery.lora adds layers inside the backbone, so its features change in training"
    if len(plan.heads) != 1:
        return "it needs exactly one new head (surgery.heads) as the only trainable part"
    path = plan.heads[0].path
    outside = [p.name for p in plan.parameters if p.trainable and not p.name.startswith(path + ".")]
    if outside:
        return f"{len(outside)} parameter tensor(s) outside the head train (e.g. {outside[0]!r})"
    if custom_data:
        return "the training data comes from the caller, whose input pipeline may be random"
    if recipe.train.mixup or recipe.train.cutmix:
        return "train.mixup/cutmix mix the images of each batch, so features change every epoch"
    if recipe.data.augment != "none":
        return f"data.augment is {recipe.data.augment!r}, which changes the inputs every epoch; set data.augment=none"
    if recipe.surgery.norm == "train":
        return "surgery.norm is train, so frozen BatchNorm statistics still change in training"
    if recipe.model is not None:
        for key in ("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate"):
            if float(recipe.model.kwargs.get(key) or 0) > 0:
                return f"model.kwargs.{key} > 0 makes the frozen part random in training"
    return None


def _random_modules(model: nn.Module, head: str) -> Iterable[str]:
    for name, m in model.named_modules():
        if name == head or name.startswith(head + "."):
            continue
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if p:
            yield f"{name or 'model'} ({type(m).__name__} p={p})"
        if stats_move(m):
            yield f"{name} (BatchNorm updating its statistics)"


def runtime_reason(model: nn.Module, head: str, sample: torch.Tensor) -> str | None:
    """Why the cache is unsafe for this built model, or None: checks the model, then runs one probe batch."""
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        return f"{type(model).__name__} has no forward_features/forward_head (timm models have them)"
    if float(getattr(model, "drop_rate", 0) or 0) > 0:
        return f"the model applies dropout before the head (drop_rate={model.drop_rate})"
    random = next(iter(_random_modules(model, head)), None)
    if random is not None:
        return f"{random} is random or drifting in training before the head"
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(sample)
            got = model.get_submodule(head)(pre_logits(model, sample))
    except Exception as err:  # noqa: BLE001 - any failure means the split does not hold for this model
        return f"the model cannot be split before its head ({type(err).__name__}: {err})"
    finally:
        model.train(was)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return "the head applied to forward_head(pre_logits=True) does not reproduce the model's output"
    return None


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's input: timm's ``forward_head(forward_features(x), pre_logits=True)``."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def compute_features(
    model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int, device: torch.device, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features and targets of every sample of ``dataset``, in order (the model in eval mode)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was = model.training
    model.eval()
    feats, targets = [], []
    try:
        for x, y in loader:
            feats.append(pre_logits(model, x.to(device)).float().cpu())
            targets.append(torch.as_tensor(y))
    finally:
        model.train(was)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(targets)


def cache_bytes(features: torch.Tensor) -> int:
    """Memory held by cached features."""
    return features.element_size() * math.prod(features.shape)
