"""The plan: every parameter's fate (trainable or frozen, lr, weight decay, the rule that decided it), the head
replacements and the BatchNorm conversions, resolved from a model and a recipe.

:func:`plan` is pure: it reads parameter names, shapes and ``requires_grad`` and never changes the model, so it runs on
a meta-device model of any size. Everything downstream (the applied model, the optimizer's param groups, the printed
table, the JSON, the adapter) reads the same :class:`Plan`, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from surgery import heads as heads_mod
from surgery import norms as norms_mod
from surgery.errors import HeadError, NothingTrainableError, RecipeError, SurgeryError
from surgery.layers import Layer, layer_of, layers_from_names
from surgery.recipe import HeadSpec, LoadedRecipe, LoraSpec, Recipe, load_recipe, with_num_classes
from surgery.select import describe, select

RecipeLike = Recipe | Mapping[str, Any] | str | Path


@dataclass(frozen=True)
class ParamPlan:
    """The fate of one parameter."""

    name: str
    shape: tuple[int, ...]
    layer: int
    layer_name: str
    trainable: bool
    lr: float | None
    weight_decay: float | None
    rule: str
    new: bool = False
    lora: bool = False
    """A LoRA weight (``<module>.lora_A.<adapter>.weight``, ``lora_B``, DoRA's magnitude), added by ``surgery.lora``."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class HeadChange:
    """One module replaced by a new head."""

    key: str
    path: str
    old: str
    new: str
    in_features: int
    num_classes: int
    params: tuple[str, ...]
    spec: HeadSpec = field(repr=False)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class NormChange:
    """One BatchNorm layer whose behaviour the norm policy changes."""

    path: str
    kind: str
    action: Literal["eval", "frozen", "train"]
    becomes: str
    reason: str


@dataclass(frozen=True)
class LoraPlan:
    """LoRA (``surgery.lora``) as a plan makes it: the PEFT config's resolved parts, and whether applying injects."""

    spec: LoraSpec
    """The recipe's spec, with ``bias`` the one PEFT is given (``all`` when rules train base biases)."""
    targets: tuple[str, ...]
    """The adapted modules, exact names in model order."""
    modules_to_save: tuple[str, ...]
    """Modules PEFT trains and saves whole: the new heads."""
    inject: bool
    """True for the plan that adds the LoRA layers (stage 0); False when the model carries them already."""


@dataclass(frozen=True)
class Plan:
    """What the recipe does to the model. Build it with :func:`plan`; make it real with :func:`apply`."""

    model_name: str
    parameters: tuple[ParamPlan, ...]
    layers: tuple[Layer, ...]
    heads: tuple[HeadChange, ...]
    norms: tuple[NormChange, ...]
    warnings: tuple[str, ...]
    recipe: Recipe = field(repr=False)
    lora: LoraPlan | None = None
    _model: Any = field(default=None, repr=False, compare=False)

    # -------------------------------------------------------------------------------------------------- counts
    @property
    def trainable_params(self) -> int:
        """Number of trainable elements."""
        return sum(p.numel for p in self.parameters if p.trainable)

    @property
    def frozen_params(self) -> int:
        """Number of frozen elements."""
        return sum(p.numel for p in self.parameters if not p.trainable)

    @property
    def lora_params(self) -> int:
        """Number of LoRA elements (0 without ``surgery.lora``)."""
        return sum(p.numel for p in self.parameters if p.lora)

    @property
    def trainable_names(self) -> list[str]:
        """Names of the trainable parameters, in model order."""
        return [p.name for p in self.parameters if p.trainable]

    def __getitem__(self, name: str) -> ParamPlan:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    # ---------------------------------------------------------------------------------------------- optimizer
    def param_groups(self, model: nn.Module | None = None) -> list[dict[str, Any]]:
        """Optimizer param groups with the real ``lr`` and ``weight_decay`` of each group (no ``lr_scale``).

        Usable with any torch optimizer. Frozen parameters are in no group. ``model`` defaults to the model the plan
        was applied to.
        """
        if model is None:
            model = self._model() if self._model is not None else None
        if model is None:
            raise SurgeryError("param_groups() needs the model: call surgery.apply(model, recipe) first, or pass it")
        tensors = dict(model.named_parameters())
        groups: dict[tuple[float, float], dict[str, Any]] = {}
        for p in self.parameters:
            if not p.trainable:
                continue
            tensor = tensors.get(p.name)
            if tensor is None or not tensor.requires_grad or tuple(tensor.shape) != p.shape:
                raise SurgeryError(
                    f"parameter {p.name!r} is trainable in the plan but not in the model; apply the plan first "
                    "(surgery.apply(model, recipe))"
                )
            assert p.lr is not None and p.weight_decay is not None
            group = groups.setdefault(
                (p.lr, p.weight_decay), {"params": [], "param_names": [], "lr": p.lr, "weight_decay": p.weight_decay}
            )
            group["params"].append(tensor)
            group["param_names"].append(p.name)
        return list(groups.values())

    # ----------------------------------------------------------------------------------------------- printing
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``surgery plan --json``); see :func:`surgery.render.plan_dict`."""
        from surgery.render import plan_dict

        return plan_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A readable table grouped by layer; see :func:`surgery.render.plan_table`."""
        from surgery.render import plan_table

        return plan_table(self)


# ------------------------------------------------------------------------------------------------------ planning


def _as_recipe(recipe: RecipeLike) -> LoadedRecipe:
    if isinstance(recipe, LoadedRecipe):
        return recipe
    return load_recipe(recipe)


def _model_name(model: nn.Module, recipe: Recipe) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or (recipe.model.label if recipe.model else type(model).__name__)


def _no_weight_decay(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    try:
        return set(fn()) if callable(fn) else set()
    except Exception:  # noqa: BLE001 - a model's optional hook failing must not stop planning
        return set()


def _exempt(name: str, patterns: set[str]) -> bool:
    # timm's no_weight_decay() returns names or wildcard patterns; it matches them the same way.
    return name in patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(model: nn.Module, recipe: RecipeLike, *, num_classes: int | None = None) -> Plan:
    """Resolve ``recipe`` against ``model`` without changing the model. See :class:`Plan`.

    ``num_classes`` sizes the new heads that leave it unset (the built-in recipes do: the count comes from the data).
    """
    recipe = _as_recipe(recipe)
    if num_classes is not None:
        recipe = with_num_classes(recipe, num_classes)
    spec = recipe.surgery
    current = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    warnings: list[str] = []

    # Heads: what each replacement removes and adds (the new head is built on the meta device for its names).
    head_changes: list[HeadChange] = []
    replaced: dict[str, HeadChange] = {}
    for key, hspec in spec.heads.items():
        where = recipe.where("surgery", "heads", key)
        if hspec.num_classes is None:
            raise HeadError(
                f"{recipe.where('surgery', 'heads', key, 'num_classes')}: the new head's class count is not set; "
                "pass --num-classes N (CLI) or num_classes=N (Python), or let `surgery train` read it from the data"
            )
        for path in heads_mod.resolve_targets(model, key, where=where):
            if path in replaced:
                raise HeadError(f"{where}: {path!r} is already replaced by heads.{replaced[path].key}; keep one")
            nested = [p for p in replaced if path.startswith(p + ".") or p.startswith(path + ".")]
            if nested:
                raise HeadError(f"{where}: {path!r} overlaps heads.{replaced[nested[0]].key} ({nested[0]})")
            width = heads_mod.in_features(model, path, where=where)
            conv = heads_mod.is_conv_head(model, path)
            new = heads_mod.build_head(hspec, width, conv=conv, device="meta")
            old = model.get_submodule(path)
            change = HeadChange(
                key=key,
                path=path,
                old=_describe_module(old),
                new=_describe_module(new),
                in_features=width,
                num_classes=hspec.num_classes,
                params=tuple(f"{path}.{n}" for n, _ in new.named_parameters()),
                spec=hspec,
                shapes={f"{path}.{n}": tuple(p.shape) for n, p in new.named_parameters()},
            )
            head_changes.append(change)
            replaced[path] = change

    # The parameter list after replacement: new head parameters take the place of the old ones.
    entries: list[tuple[str, tuple[int, ...], bool, HeadChange | None]] = []
    inserted: set[str] = set()
    for name, shape, requires_grad in current:
        owner = next((c for p, c in replaced.items() if name.startswith(p + ".")), None)
        if owner is None:
            entries.append((name, shape, requires_grad, None))
        elif owner.path not in inserted:
            inserted.add(owner.path)
            entries += [(n, s, True, owner) for n, s in owner.shapes.items()]
    for path, change in replaced.items():
        if path not in inserted:  # replacing a parameter-less module (Identity): the new head goes last
            entries += [(n, s, True, change) for n, s in change.shapes.items()]
    if head_changes and _carries_lora(model):
        first = head_changes[0]
        raise RecipeError(
            f"{recipe.where('surgery', 'heads', first.key)}: the model carries LoRA layers already (model.adapter, or "
            f"an earlier stage) and PEFT trains its head {first.path!r} with them; continue without surgery.heads, or "
            "start from the base model (model.name) with surgery.lora for new classes"
        )
    if head_changes and getattr(model, "adapter_info", None) is not None:  # a loaded adapter (model.adapter)
        warnings += [
            f"heads.{c.key} replaces the head {c.path!r} the adapter trained (model.adapter); remove surgery.heads "
            "to keep training it"
            for c in head_changes
        ]
    lora_plan, lora_label = None, ""
    if spec.lora is not None or _carries_lora(model):
        entries, head_changes, lora_plan, lora_label = _lora_entries(model, recipe, entries, head_changes)
        replaced = {c.path: c for c in head_changes}
    names = [e[0] for e in entries]
    layers = layers_from_names(model, names)
    layer_index = layer_of(layers)

    # Fate: start from the model's requires_grad, apply the rules in order, then the heads.
    trainable = {e[0]: e[2] for e in entries}
    decided = {e[0]: "model default" if e[2] else "model default (frozen)" for e in entries}
    if lora_plan is not None and lora_plan.inject:  # what get_peft_model does: base frozen, LoRA weights trainable
        for name, _, requires_grad, _ in entries:
            decided[name] = lora_label if _is_lora(name) else "surgery.lora (base frozen)"
            if requires_grad and not _is_lora(name):
                decided[name] = f"surgery.lora.bias: {spec.lora.bias}"  # type: ignore[union-attr]
    lr_ops: dict[str, list[tuple[str, float]]] = {n: [] for n in names}
    wd_set: dict[str, float] = {}
    for i, rule in enumerate(spec.rules):
        label = rule.name or f"rules[{i}] {rule.action} {describe(rule.selector)}"
        where = rule._where or recipe.where("surgery", "rules", i, rule.action)
        chosen = select(rule.selector, names, layers, where=where)
        if rule.action in ("freeze", "unfreeze"):
            want = rule.action == "unfreeze"
            changed = sum(1 for n in chosen if trainable[n] != want)
            if changed == 0:
                state = "trainable" if want else "frozen"
                warnings.append(f"{label} changes nothing: all {len(chosen)} selected parameters were already {state}")
            for n in chosen:
                trainable[n] = want
                decided[n] = label
        for n in chosen:
            if rule.lr is not None:
                lr_ops[n].append(("set", rule.lr))
            if rule.lr_mult is not None:
                lr_ops[n].append(("mult", rule.lr_mult))
            if rule.weight_decay is not None:
                wd_set[n] = rule.weight_decay
    for change in head_changes:
        label = f"heads.{change.key} (new {change.spec.type} head, {change.num_classes} classes)"
        for n in change.params:
            trainable[n] = change.spec.trainable
            decided[n] = label
            if change.spec.lr is not None:
                lr_ops[n].append(("set", change.spec.lr))
            if change.spec.lr_mult is not None:
                lr_ops[n].append(("mult", change.spec.lr_mult))

    if lora_plan is not None:
        lora_plan = _check_lora(model, recipe, lora_plan, trainable, decided)

    # Norm policy.
    norm_changes = _plan_norms(model, spec.norm, trainable, decided, replaced, warnings, lora=lora_plan is not None)

    # Learning rate and weight decay of what trains.
    optim = recipe.optim
    num_layers = len(layers)
    if optim.layer_decay is not None and num_layers <= 1:
        warnings.append("optim.layer_decay has no effect: the model has a single layer")
    exempt = set() if optim.decay_norm_and_bias else _no_weight_decay(model)
    params: list[ParamPlan] = []
    for name, shape, _, owner in entries:
        li = layer_index[name]
        lr = wd = None
        if trainable[name]:
            lr = optim.lr
            if optim.layer_decay is not None:
                lr *= optim.layer_decay ** (num_layers - 1 - li)
            for op, value in lr_ops[name]:
                lr = value if op == "set" else lr * value
            if name in wd_set:
                wd = wd_set[name]
            elif not optim.decay_norm_and_bias and (len(shape) <= 1 or _exempt(name, exempt)):
                wd = 0.0
            else:
                wd = optim.weight_decay
        params.append(
            ParamPlan(
                name,
                shape,
                li,
                layers[li].name,
                trainable[name],
                lr,
                wd,
                decided[name],
                new=owner is not None,
                lora=_is_lora(name) if lora_plan is not None else False,
            )
        )

    if not any(p.trainable for p in params):
        raise NothingTrainableError(
            f"{recipe.source}: no parameter is trainable after surgery.rules and surgery.heads; unfreeze a part "
            "(e.g. a rule `unfreeze: {from: -1}`) or add a head (surgery.heads.classifier.num_classes=N)"
        )
    return Plan(
        model_name=_model_name(model, recipe),
        parameters=tuple(params),
        layers=tuple(layers),
        heads=tuple(head_changes),
        norms=tuple(norm_changes),
        warnings=tuple(warnings),
        recipe=recipe,
        lora=lora_plan,
    )


# ---------------------------------------------------------------------------------------------------------- LoRA

_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def _is_lora(name: str) -> bool:
    return any(part in name for part in _LORA_PARTS)


def _carries_lora(model: nn.Module) -> bool:
    from surgery.lora import peft_of

    return peft_of(model) is not None


def _lora_entries(
    model: nn.Module,
    recipe: LoadedRecipe,
    entries: list[tuple[str, tuple[int, ...], bool, HeadChange | None]],
    head_changes: list[HeadChange],
) -> tuple[list[tuple[str, tuple[int, ...], bool, HeadChange | None]], list[HeadChange], LoraPlan, str]:
    """The parameter list as it is after PEFT injects LoRA (real names: ``qkv.base_layer.weight``,
    ``qkv.lora_A.default.weight``, ``head.modules_to_save.default.weight``), computed on a weightless copy; the heads'
    parameter names follow. On a model that carries LoRA already (a later stage), the entries are its own."""
    from surgery import lora as lora_mod

    spec = recipe.surgery.lora
    peft_model = lora_mod.peft_of(model)
    if peft_model is not None:
        config = peft_model.peft_config[peft_model.active_adapter]
        targets = tuple(
            n for n, m in model.named_modules() if hasattr(m, "lora_A") and peft_model.active_adapter in m.lora_A
        )
        base_spec = spec or LoraSpec(targets=list(targets), rank=config.r, alpha=config.lora_alpha)
        spec_now = base_spec.model_copy(update={"bias": config.bias})
        saved = tuple(config.modules_to_save or ())
        return entries, head_changes, LoraPlan(spec_now, targets, saved, inject=False), ""
    assert spec is not None

    def where(*path: str | int) -> str:
        return recipe.where("surgery", "lora", *path)

    shadow = lora_mod.meta_copy(model)
    for change in head_changes:
        old = shadow.get_submodule(change.path)
        new = heads_mod.build_head(change.spec, change.in_features, conv=isinstance(old, nn.Conv2d), device="meta")
        heads_mod.replace_module(shadow, change.path, new)
    saved = tuple(c.path for c in head_changes)
    targets = tuple(lora_mod.resolve_targets(shadow, spec, modules_to_save=saved, where=where))
    injected = lora_mod.inject(shadow, spec, heads=saved, where=where)
    by_path = {c.path: c for c in head_changes}
    out: list[tuple[str, tuple[int, ...], bool, HeadChange | None]] = []
    params: dict[str, dict[str, tuple[int, ...]]] = {c.path: {} for c in head_changes}
    for name, tensor in injected.get_base_model().named_parameters():
        owner = next((c for p, c in by_path.items() if name.startswith(p + ".modules_to_save.")), None)
        if owner is not None:
            params[owner.path][name] = tuple(tensor.shape)
        out.append((name, tuple(tensor.shape), tensor.requires_grad, owner))
    changes = [dataclasses.replace(c, params=tuple(params[c.path]), shapes=params[c.path]) for c in head_changes]
    remap = {c.path: c for c in changes}
    out = [(n, sh, rg, remap[o.path] if o is not None else None) for n, sh, rg, o in out]
    alpha = spec.alpha if spec.alpha is not None else spec.rank
    label = f"surgery.lora (rank {spec.rank}, alpha {alpha:g})"
    return out, changes, LoraPlan(spec, targets, saved, inject=True), label


def _check_lora(
    model: nn.Module, recipe: LoadedRecipe, lora_plan: LoraPlan, trainable: dict[str, bool], decided: dict[str, str]
) -> LoraPlan:
    """What trains must fit in a PEFT adapter: LoRA weights, the heads (modules_to_save) and biases (PEFT ``bias``).

    PEFT keeps each saved head's original (``<head>.original_module.*``, used when the adapter is disabled): frozen.
    Rules that train base biases make PEFT save them (``bias: all``) when the recipe leaves ``lora.bias`` at none.
    """
    where = recipe.where("surgery", "lora")
    if recipe.surgery.norm == "train":
        raise RecipeError(
            f"{recipe.where('surgery', 'norm')}: norm: train changes BatchNorm statistics, which a LoRA (PEFT) adapter "
            "cannot carry; use norm: auto with surgery.lora"
        )
    saved = tuple(p + ".modules_to_save." for p in lora_plan.modules_to_save)
    biases: list[str] = []
    for name, on in trainable.items():
        if ".original_module." in name:
            trainable[name] = False
            decided[name] = "surgery.lora (PEFT's frozen copy of the original head)"
            continue
        if not on or _is_lora(name) or name.startswith(saved):
            continue
        if not name.endswith(".bias"):
            raise RecipeError(
                f"{where}: {decided[name]} makes {name!r} trainable, but a LoRA (PEFT) adapter carries only LoRA "
                "weights, new heads and biases; freeze it, add a LoRA target for its module, or drop surgery.lora "
                "to fine-tune it"
            )
        biases.append(name)
    bias = lora_plan.spec.bias
    if biases and bias == "none":
        if not lora_plan.inject:
            raise RecipeError(
                f"{where}: {decided[biases[0]]} trains {biases[0]!r}, but the LoRA adapter was created with bias: "
                "none and cannot carry it; set surgery.lora.bias: all"
            )
        bias = "all"
    if bias == "lora_only":
        outside = [b for b in biases if b.removesuffix(".bias").removesuffix(".base_layer") not in lora_plan.targets]
        if outside:
            raise RecipeError(
                f"{where}.bias: lora_only saves only the biases of adapted modules, but {decided[outside[0]]} trains "
                f"{outside[0]!r}; use bias: all"
            )
    if bias == lora_plan.spec.bias:
        return lora_plan
    return dataclasses.replace(lora_plan, spec=lora_plan.spec.model_copy(update={"bias": bias}))


def _plan_norms(
    model: nn.Module,
    policy: str,
    trainable: dict[str, bool],
    decided: dict[str, str],
    replaced: Mapping[str, HeadChange],
    warnings: list[str],
    *,
    lora: bool = False,
) -> list[NormChange]:
    """The BatchNorm conversions of ``policy``. With LoRA every BatchNorm's statistics stay fixed under ``auto``: a
    PEFT adapter carries no running statistics (a trained BatchNorm bias, BitFit, trains its affine only)."""
    changes: list[NormChange] = []
    drifting = 0
    for path, bn in norms_mod.batchnorms(model, include_fixed=True).items():
        if any(path == p or path.startswith(p + ".") for p in replaced):
            continue
        own = [f"{path}.weight", f"{path}.bias"] if bn.affine else []
        if own:
            frozen = not any(trainable[n] for n in own)
        else:  # no affine parameters: frozen when its siblings are
            frozen = not any(trainable[n] for n in _siblings(path, trainable))
        kind = type(bn).__name__
        if isinstance(bn, norms_mod.StatsFixed):  # fixed by an earlier plan (a previous training stage)
            if policy == "train" or (policy != "eval" and not frozen and not lora):
                base = norms_mod.released_class(type(bn)).__name__
                changes.append(NormChange(path, kind, "train", base, f"norm: {policy}, parameters trainable again"))
            continue
        fixable = norms_mod.stats_fixed_class(type(bn)) is not None
        if policy == "train":
            drifting += frozen
        elif (policy == "eval" or frozen or lora) and not fixable and not (policy == "frozen" and _freezable(bn)):
            warnings.append(  # a custom BatchNorm class: say so rather than build a class at run time
                f"{path}: {kind} has no stats-fixed form, so its running statistics keep updating in training; "
                "use a standard BatchNorm class, or surgery.norm=frozen for a BatchNorm2d subclass"
            )
        elif policy == "eval":
            reason = "norm: eval" if not frozen else "norm: eval, parameters frozen"
            changes.append(NormChange(path, kind, "eval", f"StatsFixed{kind}", reason))
        elif frozen and policy == "frozen" and _freezable(bn):
            changes.append(NormChange(path, kind, "frozen", norms_mod.frozen_class_name(bn), "norm: frozen"))
            for n in own:
                decided[n] = f"{decided[n]}; norm: frozen"
        elif lora and not frozen:
            changes.append(NormChange(path, kind, "eval", f"StatsFixed{kind}", f"norm: {policy}, LoRA"))
        elif frozen:
            if policy == "frozen":
                warnings.append(f"{path}: {kind} has no frozen form; its statistics are fixed instead (norm: eval)")
            changes.append(NormChange(path, kind, "eval", f"StatsFixed{kind}", f"norm: {policy}, parameters frozen"))
    thawed = [  # converted by norm: frozen in an earlier stage; a later stage trains the parameters around them
        path
        for path in norms_mod.frozen_batchnorms(model)
        if not any(path == p or path.startswith(p + ".") for p in replaced)
        and any(trainable[n] for n in _siblings(path, trainable))
    ]
    if thawed:
        warnings.append(
            f"{len(thawed)} FrozenBatchNorm layer(s), e.g. {thawed[0]}, stay frozen although the parameters around "
            "them train: they hold buffers, not parameters, so no rule unfreezes them; for BatchNorms a later stage "
            "can train, use surgery.norm=auto"
        )
    if drifting:
        warnings.append(
            f"norm: train: the running statistics of {drifting} frozen BatchNorm layer(s) will still change in "
            "training; use norm: auto to keep them fixed"
        )
    return changes


def _freezable(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d | nn.SyncBatchNorm)


def _siblings(path: str, trainable: Mapping[str, bool]) -> list[str]:
    """The parameters of the module that holds ``path`` (all of them for a top-level module)."""
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return [n for n in trainable if n.startswith(parent + ".")] if parent else list(trainable)


def _describe_module(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, nn.Conv2d):
        return f"Conv2d({module.in_channels}->{module.out_channels}, 1x1)"
    if isinstance(module, nn.Sequential):
        widths = [m for m in module if isinstance(m, nn.Linear)]
        if widths:
            return "MLP(" + "->".join([str(widths[0].in_features), *(str(m.out_features) for m in widths)]) + ")"
    return type(module).__name__
