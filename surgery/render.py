"""Describing a recipe's plan for people and programs: the table ``surgery plan`` prints and its JSON.

:func:`plan_recipe` does everything ``surgery plan`` shows, as an API: load the recipe (overrides, ``--model``,
``--num-classes``), take the class count from ``data.root`` (or ``data.train_csv``) when no head sets it, fit a
fixed-size model to ``data.img_size``, build the model on the meta device, replay every stage through
:func:`surgery.stages.plan_stage` (the one replay training and :func:`surgery.load` use too), decide the feature
cache and resolve the optimizer. The result, a :class:`RecipePlan`, renders as a table (:meth:`RecipePlan.table`)
or JSON (:meth:`RecipePlan.to_dict`); everything shown comes from the resolved recipe. :func:`plan_table` and
:func:`plan_dict` render one :class:`Plan`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import RecipeError
from surgery.plan import ParamPlan, Plan
from surgery.recipe import LoadedRecipe, Recipe, StageSpec, load_recipe, with_head_classes, with_num_classes


@dataclass(frozen=True)
class RecipePlan:
    """What a recipe will do, stage by stage, before any compute (:func:`plan_recipe`)."""

    recipe: LoadedRecipe
    """The resolved recipe every line of the description comes from (class count and input size filled)."""
    stages: tuple[tuple[StageSpec, Plan], ...]
    """Every training stage with its plan, in order (one stage when the recipe has no ``train.stages``)."""
    feature_cache: str | None
    """None when the linear-probe feature cache applies, else why not."""
    optimizer: str
    """The resolved optimizer with every argument, e.g. ``SGD(lr=0.05, momentum=0, ..., nesterov=False)``."""
    notes: tuple[str, ...] = ()
    """Values filled in while planning, and from where (``classes: 5 (from data.root)``)."""

    @property
    def plan(self) -> Plan:
        """The first stage's plan (the only one for a single-stage recipe)."""
        return self.stages[0][1]

    def to_dict(self) -> dict[str, Any]:
        """``surgery plan --json``: the first plan, the feature cache, the optimizer, notes and every stage."""
        out = plan_dict(self.plan)
        out["feature_cache"] = {"applies": self.feature_cache is None, "reason": self.feature_cache}
        out["optimizer"] = self.optimizer
        out["notes"] = list(self.notes)
        if len(self.stages) > 1:
            out["stages"] = [
                {"name": stage.name or f"stage{i}", "epochs": stage.epochs, **plan_dict(p)}
                for i, (stage, p) in enumerate(self.stages)
            ]
        return out

    def table(self) -> str:
        """``surgery plan``: each stage's table, then the optimizer, the feature cache and the notes."""
        lines: list[str] = []
        for i, (stage, p) in enumerate(self.stages):
            if len(self.stages) > 1:
                lr = f", lr {stage.lr:g}" if stage.lr is not None else ""
                lines.append(
                    f"{chr(10) if i else ''}== Stage {i} ({stage.name or f'stage{i}'}): {stage.epochs} epoch(s){lr}"
                )
            lines.append(plan_table(p))
        lines.append(f"Optimizer: {self.optimizer}")
        cache = (
            "applies: only the new head trains on a deterministic input pipeline"
            if self.feature_cache is None
            else f"off: {self.feature_cache}"
        )
        lines.append(f"Feature cache: {cache}")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_recipe(
    recipe_or_path: Recipe | Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    model: str | None = None,
    num_classes: int | None = None,
    num_classes_source: str = "num_classes",
) -> RecipePlan:
    """Plan a recipe as ``surgery plan`` does, without any compute: see the module docstring.

    ``model`` replaces ``model.name`` (``--model``); ``num_classes`` sizes every new head, adding
    ``heads.classifier`` when the recipe replaces none (``--num-classes``; ``num_classes_source`` names it in errors).
    Without it, a head with no class count takes the number of class folders under ``data.root`` (or of classes in
    ``data.train_csv``) when it exists; otherwise planning raises the :class:`~surgery.errors.HeadError` that names
    the head.
    """
    from surgery import stages
    from surgery.features import feature_cache_reason
    from surgery.models import build_recipe_model, fit_img_size
    from surgery.optim import describe_optimizer

    extra = [*overrides, *([f"model.name={model}"] if model else [])]
    if isinstance(recipe_or_path, LoadedRecipe) and not extra:
        recipe = recipe_or_path
    else:
        recipe = load_recipe(recipe_or_path, extra)
    notes: list[str] = []
    if num_classes is not None:
        recipe = with_head_classes(recipe, num_classes, source=num_classes_source)
    elif any(h.num_classes is None for h in recipe.surgery.heads.values()):
        from surgery.data.source import count_classes

        found = count_classes(recipe)
        if found is not None:
            counted, key = found
            kind = "class folders" if key == "data.root" else "classes"
            recipe = with_num_classes(recipe, counted, source=f"{key} ({counted} {kind})")
            notes.append(f"classes: {counted} (from {key})")
    if recipe.model is None:
        raise RecipeError(f"{recipe.source}: the recipe has no model: add model.name to it or pass --model NAME")
    recipe, note = fit_img_size(recipe)
    if note:
        notes.append(note)
    net = build_recipe_model(recipe.model, meta=True, where=recipe.where("model"))
    info = getattr(net, "adapter_info", None) if recipe.model.adapter is not None else None
    if info is not None:  # model.adapter: what training continues from, and the preprocessing it brings
        base = info["base"]
        at = (info.get("source") or {}).get("revision")
        data = info.get("data_config") or {}
        size = "x".join(map(str, (data.get("input_size") or [])[-2:]))
        notes.append(
            f"model: continues from the adapter {recipe.model.adapter}"
            + (f" at {at[:12]}" if at else "")
            + f" on {base.get('model')} (fingerprint checked), {info.get('num_classes')} classes"
            + (f", trained at {size} (its data config is used unless data.img_size is set)" if size else "")
        )
    planned = stages.plan_stages(net, recipe)
    return RecipePlan(
        recipe=recipe,
        stages=tuple(planned),
        feature_cache=feature_cache_reason(planned[0][1], recipe),
        optimizer=describe_optimizer(recipe.optim, where=recipe.where("optim")),
        notes=tuple(notes),
    )


def plan_dict(plan: Plan) -> dict[str, Any]:
    """A JSON-ready description of a plan (``Plan.to_dict()``, ``surgery plan --json``)."""
    total = plan.trainable_params + plan.frozen_params
    return {
        "model": plan.model_name,
        "trainable_params": plan.trainable_params,
        "frozen_params": plan.frozen_params,
        "total_params": total,
        "layers": [
            {
                "index": la.index,
                "name": la.name,
                "params": len(la.params),
                **(
                    {"lora_params": sum(p.numel for p in plan.parameters if p.lora and p.layer == la.index)}
                    if plan.lora is not None
                    else {}
                ),
            }
            for la in plan.layers
        ],
        "parameters": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "layer": p.layer,
                "trainable": p.trainable,
                "lr": p.lr,
                "weight_decay": p.weight_decay,
                "rule": p.rule,
                "new": p.new,
                "lora": p.lora,
            }
            for p in plan.parameters
        ],
        "lora": _lora_dict(plan),
        "heads": [
            {
                "key": h.key,
                "path": h.path,
                "old": h.old,
                "new": h.new,
                "in_features": h.in_features,
                "num_classes": h.num_classes,
                "params": list(h.params),
            }
            for h in plan.heads
        ],
        "norms": [
            {"path": n.path, "kind": n.kind, "action": n.action, "becomes": n.becomes, "reason": n.reason}
            for n in plan.norms
        ],
        "warnings": list(plan.warnings),
    }


def _lora_dict(plan: Plan) -> dict[str, Any] | None:
    lp = plan.lora
    if lp is None:
        return None
    spec = lp.spec
    return {
        "targets": list(lp.targets),
        "rank": spec.rank,
        "alpha": spec.alpha if spec.alpha is not None else float(spec.rank),
        "dropout": spec.dropout,
        "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora,
        "init": spec.init,
        "bias": spec.bias,
        "modules_to_save": list(lp.modules_to_save),
        "params": plan.lora_params,
        "trainable_params": sum(p.numel for p in plan.parameters if p.lora and p.trainable),
    }


def plan_table(plan: Plan) -> str:
    """A readable table of a plan grouped by layer, with totals, heads, norm changes and warnings.

    With ``surgery.lora`` a `lora` column gives each layer's LoRA parameters (counted in `params` too)."""
    lora = plan.lora is not None
    rows = [("#", "layer", "params", "trainable", "frozen", *(("lora",) if lora else ()), "lr", "wd", "rule")]
    by_layer: dict[int, list[ParamPlan]] = {}
    for p in plan.parameters:
        by_layer.setdefault(p.layer, []).append(p)
    for layer in plan.layers:
        ps = by_layer.get(layer.index, [])
        trainable = sum(p.numel for p in ps if p.trainable)
        frozen = sum(p.numel for p in ps if not p.trainable)
        lora_cell = (f"{sum(p.numel for p in ps if p.lora):,}",) if lora else ()
        lrs = sorted({p.lr for p in ps if p.lr is not None})
        wds = sorted({p.weight_decay for p in ps if p.weight_decay is not None})
        lr = "-" if not lrs else f"{lrs[0]:.2e}" if len(lrs) == 1 else f"{lrs[0]:.2e}..{lrs[-1]:.2e}"
        wd = "-" if not wds else "/".join(f"{w:g}" for w in wds)
        shown = [p for p in ps if p.trainable] if lora and any(p.trainable for p in ps) else ps  # LoRA: what trains
        rules = list(dict.fromkeys(p.rule for p in shown))
        rule = rules[0] if len(rules) == 1 else f"{rules[0]} (+{len(rules) - 1} more)"
        rows.append(
            (
                str(layer.index),
                layer.name,
                f"{trainable + frozen:,}",
                f"{trainable:,}",
                f"{frozen:,}",
                *lora_cell,
                lr,
                wd,
                rule,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 2, 3, 4, 5} if lora else {0, 2, 3, 4}
    lines = [f"Plan for {plan.model_name}"]
    if plan.recipe.description:
        lines.append(f"  {plan.recipe.description.strip()}")
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    total = plan.trainable_params + plan.frozen_params
    share = 100.0 * plan.trainable_params / total if total else 0.0
    lines.append(
        f"Total: {total:,} parameters: {plan.trainable_params:,} trainable ({share:.2f}%), "
        f"{plan.frozen_params:,} frozen, in {len(plan.layers)} layers"
    )
    if plan.lora is not None:
        spec, lp = plan.lora.spec, plan.lora
        alpha = spec.alpha if spec.alpha is not None else spec.rank
        shown = ", ".join(lp.targets[:3]) + (f", ... ({len(lp.targets)} modules)" if len(lp.targets) > 3 else "")
        extras = [k for k in ("use_dora", "use_rslora") if getattr(spec, k)]
        extras += [f"bias: {spec.bias}"] if spec.bias != "none" else []
        lines.append(
            f"LoRA: rank {spec.rank}, alpha {alpha:g}{''.join(', ' + e for e in extras)} on {shown}: "
            f"{plan.lora_params:,} parameters ({100.0 * plan.lora_params / total if total else 0.0:.2f}% of the model)"
            + (f"; saved whole: {', '.join(lp.modules_to_save)}" if lp.modules_to_save else "")
        )
    for h in plan.heads:
        state = "trainable" if h.spec.trainable else "frozen"
        lines.append(f"Head {h.key}: {h.path}: {h.old} -> {h.new} ({state})")
    if plan.norms:
        actions: dict[tuple[str, str], int] = {}
        for n in plan.norms:
            actions[(n.action, n.reason)] = actions.get((n.action, n.reason), 0) + 1
        for (action, reason), count in actions.items():
            what = {
                "eval": "running statistics fixed",
                "frozen": "converted to FrozenBatchNorm",
                "train": "running statistics updating again",
            }[action]
            lines.append(f"Norms: {count} BatchNorm layer(s) {what} ({reason})")
    for w in plan.warnings:
        lines.append(f"Warning: {w}")
    return "\n".join(lines)
