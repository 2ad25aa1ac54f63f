"""Applying a plan: the small, separate step that changes the model.

It replaces heads, sets ``requires_grad`` and converts BatchNorms exactly as the :class:`~surgery.plan.Plan` says,
then checks that the model now has exactly the parameters the plan lists.
"""

from __future__ import annotations

import weakref

from torch import nn

from surgery import heads as heads_mod
from surgery import norms as norms_mod
from surgery.errors import SurgeryError
from surgery.plan import Plan, RecipeLike, plan


def apply_plan(model: nn.Module, the_plan: Plan) -> Plan:
    """Make ``the_plan`` real on ``model``: replace heads, set ``requires_grad``, convert BatchNorms."""
    for change in the_plan.heads:
        old = model.get_submodule(change.path)
        ref = next(iter(old.parameters()), None)
        ref = ref if ref is not None else next(iter(model.parameters()), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        new = heads_mod.build_head(
            change.spec, change.in_features, conv=isinstance(old, nn.Conv2d), device=device, dtype=dtype
        )
        heads_mod.replace_module(model, change.path, new)
    if the_plan.lora is not None and the_plan.lora.inject:
        _inject(model, the_plan)
    fates = {p.name: p.trainable for p in the_plan.parameters}
    for name, tensor in model.named_parameters():
        if name not in fates:
            raise SurgeryError(f"the model has parameter {name!r} that the plan does not know; re-plan on this model")
        tensor.requires_grad_(fates[name])
    for change in the_plan.norms:
        module = model.get_submodule(change.path)
        model.set_submodule(
            change.path,
            {"frozen": norms_mod.freeze, "eval": norms_mod.fix_stats, "train": norms_mod.release}[change.action](
                module
            ),
        )
    present = {n for n, _ in model.named_parameters()}
    converted = {f"{n.path}.{s}" for n in the_plan.norms if n.action == "frozen" for s in ("weight", "bias")}
    missing = [p.name for p in the_plan.parameters if p.name not in present and p.name not in converted]
    if missing:
        raise SurgeryError(f"after applying, the model lacks planned parameter {missing[0]!r}; re-plan on this model")
    if model.training:
        model.train()  # let stats-fixed BatchNorms settle into eval mode
    object.__setattr__(the_plan, "_model", weakref.ref(model))
    return the_plan


def _inject(model: nn.Module, the_plan: Plan) -> None:
    """Add the plan's LoRA layers with PEFT, in place (the ``PeftModel`` is kept with :func:`surgery.lora.attach`)."""
    from surgery import lora

    assert the_plan.lora is not None
    if lora.peft_of(model) is not None:
        raise SurgeryError("the model carries LoRA layers already; plan on it again instead of applying this plan")
    recipe = the_plan.recipe
    where = recipe.where if hasattr(recipe, "where") else None
    peft_model = lora.inject(
        model,
        the_plan.lora.spec,
        heads=the_plan.lora.modules_to_save,
        where=(lambda *p: where("surgery", "lora", *p)) if where else "surgery.lora",
    )
    lora.attach(model, peft_model)


def apply(model: nn.Module, recipe: RecipeLike, *, num_classes: int | None = None) -> Plan:
    """Plan ``recipe`` on ``model`` and apply it; returns the plan (whose ``param_groups()`` feed an optimizer).

    ``num_classes`` sizes new heads that leave it unset, as the built-in recipes do.
    """
    return apply_plan(model, plan(model, recipe, num_classes=num_classes))


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts of a model as it is now."""
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    f = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return t, f
