"""Optimizer and learning-rate schedule from a plan, both built by name through timm.

The plan's ``param_groups()`` carry each group's real ``lr`` and ``weight_decay``; they go to
``timm.optim.create_optimizer_v2`` as they are (no timm grouping, no ``lr_scale``). timm's schedulers keep one base
value per group (the group's ``initial_lr``) and multiply by ``lr_scale`` only when a group has that key, so groups
with absolute learning rates, such as ours, follow the schedule correctly.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from surgery.errors import RecipeError
from surgery.recipe import OptimSpec, TrainSpec


def build_optimizer(groups: list[dict[str, Any]], spec: OptimSpec, *, where: str = "optim") -> torch.optim.Optimizer:
    """A timm optimizer (``spec.name``) over ``groups`` (a plan's ``param_groups()``), their lr/wd left as they are."""
    name = spec.name.lower()
    if name not in list_optimizers() and name.split("_")[-1] not in list_optimizers():
        known = ", ".join(
            n for n in ("adamw", "sgd", "lamb", "lion", "adan", "adopt", "rmsprop") if n in list_optimizers()
        )
        raise RecipeError(f"{where}.name: timm has no optimizer {spec.name!r}; e.g. {known}")
    kwargs = dict(spec.kwargs)
    if spec.momentum is not None or spec.nesterov is not None:
        info = get_optimizer_info(name)
        if not info.has_momentum:
            key = "momentum" if spec.momentum is not None else "nesterov"
            raise RecipeError(f"{where}.{key}: optimizer {spec.name!r} has no momentum; remove the key or use sgd")
        if spec.momentum is not None:
            kwargs["momentum"] = spec.momentum
        if spec.nesterov is not None:
            kwargs["nesterov"] = spec.nesterov
        elif spec.momentum == 0:
            kwargs["nesterov"] = False  # torch refuses Nesterov without momentum; timm's sgd defaults it on
    if kwargs.get("nesterov") and kwargs.get("momentum", 0.9) == 0:
        raise RecipeError(f"{where}.nesterov: Nesterov momentum needs optim.momentum > 0")
    try:
        # lr/weight_decay here are only defaults for keys a group lacks; every plan group sets both.
        return create_optimizer_v2(
            [dict(g) for g in groups], opt=name, lr=spec.lr, weight_decay=spec.weight_decay, **kwargs
        )
    except TypeError as err:
        raise RecipeError(f"{where}.kwargs: optimizer {spec.name!r} does not accept these arguments: {err}") from None


_FLAGS = {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}


def describe_optimizer(spec: OptimSpec, *, where: str = "optim") -> str:
    """The optimizer the recipe makes, with every argument it resolves to, e.g.
    ``SGD(lr=0.05, momentum=0.9, dampening=0, weight_decay=0.0001, nesterov=True)``.

    Built for real by :func:`build_optimizer` over one dummy parameter, so what is shown is what timm builds, defaults
    included (implementation switches such as ``foreach`` are left out). ``optim.layer_decay`` follows when set.
    """
    probe = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(
        [{"params": [probe], "lr": spec.lr, "weight_decay": spec.weight_decay}], spec, where=where
    )
    args = [
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value!r}"
        for key, value in optimizer.defaults.items()
        if key not in _FLAGS and value is not None
    ]
    text = f"{type(optimizer).__name__}({', '.join(args)})"
    if spec.layer_decay is not None:
        text += f", layer_decay={spec.layer_decay:g}"
    return text


def set_param_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> tuple[int, int]:
    """Give ``optimizer`` exactly ``groups`` (a new stage's plan), keeping the state of parameters already training.

    Existing groups are replaced by ``add_param_group`` calls, so every group gets the optimizer's defaults for the
    keys it lacks (betas, momentum...). The per-parameter state (moments, step counts) is keyed by the tensor, so a
    parameter that keeps training keeps it; frozen parameters' state is dropped. Returns (added, kept) parameter counts.
    """
    before = {id(p) for g in optimizer.param_groups for p in g["params"]}
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(dict(group))
    after = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    for p in list(optimizer.state):
        if id(p) not in after:
            del optimizer.state[p]
    kept = sum(1 for i in after if i in before)
    return len(after) - kept, kept


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec, *, epochs: int, updates_per_epoch: int
) -> Scheduler | None:
    """A timm schedule over ``epochs`` epochs stepped per update (``step_update``); None for ``sched: none``.

    Each group's current ``lr`` becomes its base value (``initial_lr``), so call this right after the groups are set.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    if spec.sched == "none":
        return None
    updates_per_epoch = max(1, updates_per_epoch)
    warmup_epochs = spec.warmup_epochs if spec.warmup_steps is None else spec.warmup_steps / updates_per_epoch
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=spec.sched,
        num_epochs=max(1, epochs),
        decay_epochs=spec.decay_epochs,
        decay_milestones=list(spec.decay_milestones),
        decay_rate=spec.decay_rate,
        min_lr=spec.min_lr,
        warmup_lr=spec.warmup_lr,
        warmup_epochs=warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The lr of every group, in order."""
    return [float(g["lr"]) for g in optimizer.param_groups]
