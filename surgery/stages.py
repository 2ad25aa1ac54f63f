"""Training stages: each stage is the recipe plus the stage's own rules, planned on the model as it is.

Stage 0 is planned like any recipe (heads replaced, then its rules). Later stages must not replace the heads again, so
the heads become rules (unfreeze/freeze the head, its ``lr``/``lr_mult``) placed where the heads act in a plan: after
``surgery.rules``, before the stage's rules. Everything downstream reads the stage's :class:`~surgery.plan.Plan`.
"""

from __future__ import annotations

from torch import nn

from surgery.apply import apply_plan
from surgery.layers import layers_from_names
from surgery.plan import Plan, plan
from surgery.recipe import LoadedRecipe, Rule, StageSpec, TrainSpec
from surgery.select import select


def stage_specs(spec: TrainSpec) -> list[StageSpec]:
    """The stages to run: ``train.stages``, or one stage of ``train.epochs`` (none when it is 0)."""
    if spec.stages:
        return list(spec.stages)
    return [StageSpec(epochs=spec.epochs)] if spec.epochs > 0 else []


def stage_name(stages: list[StageSpec], index: int) -> str:
    """A stage's label."""
    return stages[index].name or f"stage{index}" if index < len(stages) else f"stage{index}"


def head_rules(first: Plan) -> list[Rule]:
    """The heads of the first plan as rules, so a re-plan keeps them trainable (or frozen) at their lr."""
    rules: list[Rule] = []
    for h in first.heads:
        label = f"heads.{h.key}"
        if h.spec.trainable:
            rules.append(Rule(unfreeze=h.path, name=label))
        else:
            rules.append(Rule(freeze=h.path, name=label))
        if h.spec.lr is not None or h.spec.lr_mult is not None:
            rules.append(Rule(select=h.path, lr=h.spec.lr, lr_mult=h.spec.lr_mult, name=f"{label} lr"))
    return rules


def check_stage_rules(model: nn.Module, recipe: LoadedRecipe, index: int) -> None:
    """Resolve a stage's selectors against the model now, so a bad pattern is reported at its own file and line.

    Stage 0 is planned at once, together with the new heads its rules may select (its errors are located by
    :func:`stage_recipe`), so only later stages are checked ahead.
    """
    if index == 0:
        return
    names = [n for n, _ in model.named_parameters()]
    layers = layers_from_names(model, names)
    for j, rule in enumerate(recipe.train.stages[index].rules):
        select(rule.selector, names, layers, where=recipe.where("train", "stages", index, "rules", j, rule.action))


def stage_recipe(recipe: LoadedRecipe, stages: list[StageSpec], index: int, first: Plan | None) -> LoadedRecipe:
    """The recipe that plans stage ``index``: ``first`` is stage 0's plan (None when planning stage 0 itself)."""
    stage = stages[index] if index < len(stages) else StageSpec(epochs=1)
    labelled = []
    for j, rule in enumerate(stage.rules):
        if not rule.name:
            rule = rule.model_copy(update={"name": f"{stage_name(stages, index)}.rules[{j}] {rule.action}"})
        if recipe.train.stages and index < len(recipe.train.stages):  # errors name where the rule is written
            rule = rule.model_copy()
            rule._where = recipe.where("train", "stages", index, "rules", j, rule.action)
        labelled.append(rule)
    surgery = recipe.surgery
    if first is None:
        surgery = surgery.model_copy(update={"rules": [*surgery.rules, *labelled]})
    else:
        surgery = surgery.model_copy(update={"rules": [*surgery.rules, *head_rules(first), *labelled], "heads": {}})
    optim = recipe.optim if stage.lr is None else recipe.optim.model_copy(update={"lr": stage.lr})
    return recipe.model_copy(update={"surgery": surgery, "optim": optim})


def plan_stage(model: nn.Module, recipe: LoadedRecipe, index: int, first: Plan | None) -> Plan:
    """Plan stage ``index`` on ``model`` as it is now and apply it; ``first`` is stage 0's plan (None for stage 0).

    The one place a stage is replayed: ``surgery plan`` (on a meta model), the trainer (on the live model, at each stage
    boundary and when resuming) and :func:`surgery.load` (on the base, to rebuild the trained structure) all call it.
    """
    stages = stage_specs(recipe.train) or [StageSpec(epochs=1)]
    if index > 0 or recipe.train.stages:
        check_stage_rules(model, recipe, index)
    return apply_plan(model, plan(model, stage_recipe(recipe, stages, index, first)))


def plan_stages(model: nn.Module, recipe: LoadedRecipe) -> list[tuple[StageSpec, Plan]]:
    """The plan of every stage, in order, as the trainer will make them. Applies each stage's plan to ``model`` on
    the way (later stages are planned on the model the earlier ones left), so pass a throwaway, e.g. a meta-device
    model: ``surgery plan`` does."""
    stages = stage_specs(recipe.train) or [StageSpec(epochs=1)]
    out: list[tuple[StageSpec, Plan]] = []
    first: Plan | None = None
    for index, stage in enumerate(stages):
        current = plan_stage(model, recipe, index, first)
        first = first or current
        out.append((stage, current))
    return out
