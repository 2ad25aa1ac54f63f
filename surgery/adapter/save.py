"""Saving an adapter: exactly the tensors a recipe changed, and ``surgery.json`` describing them and their base."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from surgery.adapter.base import base_model_id, base_ref, build_base, checkpoint_path, warn_local_base
from surgery.adapter.format import (
    ADAPTER_FILE,
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    HF_HUB,
    AdapterConfig,
    DataConfig,
    dtype_name,
    fingerprint,
    first_error,
    parse_config,
)
from surgery.errors import AdapterError, RecipeError, SurgeryError
from surgery.io import atomic_write, sha256_file, write_text
from surgery.norms import stats_move
from surgery.plan import Plan

log = logging.getLogger(__name__)

STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# Numbers a run records that describe the run, not the model: left out of surgery.json and the card.
INTERNAL_METRICS = frozenset(
    {"epoch", "epochs", "step", "steps", "global_step", "processes", "images_per_s", "feature_cache_seconds",
     "trainable_params", "frozen_params", "seconds", "train_seconds"}
)  # fmt: skip


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile / DeepSpeed wrappers (accelerate knows them all)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def meaningful_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
    """The finite numbers of ``metrics`` that say how good the model is (no lists, nulls, flags or counters)."""
    out: dict[str, float | int] = {}
    for key, value in (metrics or {}).items():
        if key in INTERNAL_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[str(key)] = value
    return out


def expected_tensors(model: nn.Module, plans: Sequence[Plan]) -> tuple[dict[str, str], set[str]]:
    """(required, optional) tensor names of an adapter of ``model`` after ``plans`` (one per stage) were applied.

    Required (name -> kind): trainable parameters and everything in a replaced head. Optional: running statistics of
    BatchNorms whose statistics move in training (not stats-fixed, not frozen); saved only when they differ from the
    base. Over several stages: whatever any stage trained or let move.
    """
    state = model.state_dict()
    required: dict[str, str] = {}
    for the_plan in plans:
        for p in the_plan.parameters:
            if p.trainable:
                required.setdefault(p.name, "trainable")
        heads = tuple(h.path + "." for h in the_plan.heads)
        for name in state:
            if heads and name.startswith(heads):
                required.setdefault(name, "head")
    optional: set[str] = set()
    for path, module in model.named_modules():
        if stats_move(module):
            for buffer in STAT_BUFFERS:
                name = f"{path}.{buffer}" if path else buffer
                if name in state and name not in required:
                    optional.add(name)
    return required, optional


def replay(model: nn.Module, recipe: Any) -> list[Plan]:
    """Apply every stage of ``recipe`` to a base ``model`` through :func:`surgery.stages.plan_stages` (the one stage
    replay), without touching the caller's random number generator (new heads are initialized, then overwritten)."""
    from surgery import stages  # looked up at call time: stages.plan_stages calls stages.plan_stage, the one replay

    with torch.random.fork_rng(devices=[]):
        return [p for _, p in stages.plan_stages(model, recipe)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.device == b.device:
        return False  # the "base" is the trained tensor itself: it cannot tell what changed, so keep it
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())


# -------------------------------------------------------------------------------------------------------- save


def _versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import timm

    from surgery import __version__

    return {
        "surgery": __version__,
        "timm": timm.__version__,
        "torch": torch.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
    }


def _recipe_data(recipe: Any) -> dict[str, Any]:
    from surgery.recipe import load_recipe, resolved_data

    try:
        data = resolved_data(recipe)
    except RecipeError as err:
        raise AdapterError(f"cannot write {CONFIG_FILE}: {err}") from None
    if data.get("model"):  # base.checkpoint(_sha256) names it; a path of this machine means nothing elsewhere
        data["model"].pop("checkpoint", None)
    if data.get("data"):  # where the training images were on this machine: no use elsewhere, and private
        data["data"].pop("root", None)
    try:
        load_recipe(data)  # what load() will read back must load
    except SurgeryError as err:
        raise AdapterError(f"the resolved recipe does not load back ({err}); please report this") from None
    return data


def _data_config(data_config: Mapping[str, Any] | None) -> DataConfig | None:
    if data_config is None:
        return None
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    try:
        return DataConfig.model_validate({k: data_config[k] for k in keys if data_config.get(k) is not None})
    except ValidationError as err:
        raise AdapterError(f"save_adapter: data_config.{first_error(err)}; pass timm's data config") from None


def save_adapter(
    model: nn.Module,
    the_plan: Plan,
    folder: str | Path,
    *,
    base: nn.Module | Mapping[str, torch.Tensor] | str | None = None,
    class_names: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    recipe: Any = None,
    data_config: Mapping[str, Any] | None = None,
    token: str | None = None,
) -> Path:
    """Write the adapter of a trained ``model`` (to which ``the_plan`` was applied) into ``folder``; returns it.

    ``base`` says what the model was before surgery and training: a fingerprint string from :func:`fingerprint`
    (cheapest: the trainer takes it at step 0), the base model or its state dict, or ``None`` to rebuild it from the
    recipe's ``model:`` section. With base weights at hand, BatchNorm statistics that did not change are left out and a
    frozen tensor that changed anyway is refused (the adapter could not reproduce it).

    ``recipe`` is the recipe as written (default ``the_plan.recipe``); with several ``train.stages`` the adapter holds
    what any stage trained, and loading replays the stages. ``data_config`` is timm's data config of training
    (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``): loading, merging and
    predicting use it. ``metrics`` keeps only finite numbers that describe the model.
    """
    from surgery.adapter.card import write_card
    from surgery.recipe import LoadedRecipe, load_recipe

    model = unwrap(model)
    if recipe is None:
        recipe = the_plan.recipe
    elif not isinstance(recipe, LoadedRecipe):
        recipe = load_recipe(recipe)
    folder = Path(folder)
    # The model section is the same in every stage's recipe; the plan's knows where relative paths start.
    located = the_plan.recipe if the_plan.recipe.model is not None else recipe
    started = getattr(model, "adapter_info", None)  # model.adapter: what training started from, as it was loaded
    ref = base_ref(located, token=token, loaded=started) if located.model is not None else None
    base_state: Mapping[str, torch.Tensor] | None = None
    base_model: nn.Module | None = None
    if isinstance(base, str):
        if not base.startswith("sha256:"):
            raise AdapterError(
                f"base={base[:20]!r}: expected a fingerprint 'sha256:...' from surgery.adapter.fingerprint"
            )
        base_fp = base
    elif base is not None:
        base_model = base if isinstance(base, nn.Module) else None
        base_state = base.state_dict() if isinstance(base, nn.Module) else base
        base_fp = fingerprint(base_state)
    else:
        if ref is None:
            raise AdapterError(
                "save_adapter: the recipe has no model: section, so the base cannot be rebuilt; pass "
                "base=surgery.adapter.fingerprint(model) computed before surgery.apply"
            )
        if not ref["reproducible"]:
            raise AdapterError(
                f"save_adapter: the base {ref['model']} has random weights (pretrained: false, no checkpoint), "
                "so it cannot be rebuilt to compare with; pass base=fingerprint(model) taken before training, or "
                "use model.checkpoint"
            )
        base_model = build_base(ref, checkpoint=checkpoint_path(located), token=token, where="save_adapter")
        base_state = base_model.state_dict()
        base_fp = fingerprint(base_state)
    if ref is not None:
        warn_local_base(ref, when="save_adapter")

    from surgery.stages import stage_specs

    state = model.state_dict()
    if len(stage_specs(recipe.train)) > 1:
        if located.model is None:
            raise AdapterError(
                "save_adapter: a recipe with several train.stages needs the base to replay them; give the recipe a "
                "model: section"
            )
        from surgery.models import build_model, build_recipe_model

        if located.model.adapter is not None:  # continued from an adapter: loading it gives the structure
            layout = build_recipe_model(located.model, where="save_adapter: model")
        elif ref is not None and str(ref["model"]).startswith(HF_HUB):  # timm's own hub download would bypass ours
            layout = build_base({**ref, "pretrained": False, "checkpoint": None}, token=token, where="save_adapter")
        else:
            layout = build_model(located.model, meta=True)  # the structure only: the meta device is enough
        plans = replay(layout, recipe)
        required, optional = expected_tensors(layout, plans)
        first = plans[0]
    else:
        required, optional = expected_tensors(model, [the_plan])
        first = the_plan
    optional -= set(required)
    absent = [n for n in required if n not in state]
    if absent:
        raise AdapterError(
            f"save_adapter: the model has no tensor {absent[0]!r} that the plan trains; pass the model the plan "
            "was applied to (surgery.apply(model, recipe))"
        )
    names = list(required)
    for name in sorted(optional):
        if base_state is None or name not in base_state or not _same(state[name], base_state[name]):
            names.append(name)
    if base_state is not None:
        for name, tensor in state.items():
            if name in required or name in optional or name not in base_state:
                continue
            if not _same(tensor, base_state[name]) and tensor.data_ptr() != base_state[name].data_ptr():
                raise AdapterError(
                    f"save_adapter: {name!r} is frozen in the plan but differs from the base model, so the adapter "
                    "cannot reproduce it; check that the optimizer got plan.param_groups() only"
                )
    order = {n: i for i, n in enumerate(state)}
    names.sort(key=lambda n: order[n])
    tensors = {n: state[n].detach().to("cpu").contiguous().clone() for n in names}

    heads = [
        {"key": h.key, "path": h.path, "type": h.spec.type, "num_classes": h.num_classes, "module": h.new}
        for h in first.heads
    ]
    widths = {h.num_classes for h in first.heads}
    num_classes = widths.pop() if len(widths) == 1 else getattr(model, "num_classes", None)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        # a one-logit (binary cross-entropy) head scores two classes: names for the negative and the positive one
        if num_classes is not None and len(class_names) != num_classes and (num_classes, len(class_names)) != (1, 2):
            raise AdapterError(
                f"save_adapter: {len(class_names)} class names for a {num_classes}-class head; pass one name per class "
                "(two for a one-logit binary head)"
            )
    data = _data_config(data_config)

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    adapter_path = folder / ADAPTER_FILE
    atomic_write(adapter_path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    raw = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": {**(ref or {"model": None, "reproducible": False}), "fingerprint": base_fp},
        "recipe": _recipe_data(recipe),
        "num_classes": num_classes,
        "class_names": class_names,
        "heads": heads,
        "tensors": {
            n: {"shape": list(t.shape), "dtype": dtype_name(t), "kind": required.get(n, "buffer")}
            for n, t in tensors.items()
        },
        "adapter_sha256": sha256_file(adapter_path),
        "adapter_bytes": adapter_path.stat().st_size,
        "trainable_params": sum(int(state[n].numel()) for n, kind in required.items() if kind == "trainable"),
        "total_params": sum(int(p.numel()) for p in model.parameters()),
        "versions": _versions(),
        "metrics": meaningful_metrics(metrics),
        "data_config": data.model_dump() if data else None,
    }
    config = parse_config(raw, where=f"save_adapter: {folder / CONFIG_FILE}")  # what we write must read back
    _save_peft(model, folder, ref)
    write_config(folder, config)
    write_card(folder / CARD_FILE, config, base_model_id=base_model_id(base_model or model, raw["base"]))
    log.info("saved adapter %s (%d tensors)", folder, len(tensors))
    return folder


def _save_peft(model: nn.Module, folder: Path, ref: Mapping[str, Any] | None) -> None:
    """With LoRA, PEFT's own files next to ours, so ``PeftModel.from_pretrained(timm.create_model(BASE,
    num_classes=N), folder)`` loads the adapter without this package (its README.md is replaced by our card)."""
    from surgery import lora

    peft_model = lora.peft_of(model)
    if peft_model is None:
        return
    if ref is None or not ref.get("model"):
        raise AdapterError(
            "save_adapter: a LoRA adapter names its base (PEFT's base_model_name_or_path); give the "
            "recipe a model: section"
        )
    lora.save_peft(peft_model, folder, str(ref["model"]))


def write_config(folder: Path, config: AdapterConfig) -> None:
    """Write ``surgery.json`` atomically."""
    import json

    write_text(folder / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
