"""Saving an adapter: exactly the tensors a recipe changed, and ``surgery.json`` describing them and their base."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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
    is_commit,
    parse_config,
)
from surgery.errors import AdapterError, RecipeError, SurgeryError
from surgery.io import atomic_write, sha256_file, write_text
from surgery.norms import StatsFixed
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
        if isinstance(module, _BatchNorm) and module.track_running_stats and not isinstance(module, StatsFixed):
            for buffer in STAT_BUFFERS:
                name = f"{path}.{buffer}" if path else buffer
                if name in state and name not in required:
                    optional.add(name)
    return required, optional


def replay(model: nn.Module, recipe: Any) -> list[Plan]:
    """Apply every stage of ``recipe`` to a base ``model`` through :func:`surgery.stages.plan_stages` (the one stage
    replay), without touching the caller's random number generator (new heads are initialized, then overwritten)."""
    from surgery.stages import plan_stages

    with torch.random.fork_rng(devices=[]):
        return [p for _, p in plan_stages(model, recipe)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.device == b.device:
        return False  # the "base" is the trained tensor itself: it cannot tell what changed, so keep it
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())


# ------------------------------------------------------------------------------------------------- base models


def checkpoint_path(recipe: Any) -> Path | None:
    """The absolute path of a recipe's ``model.checkpoint`` (relative to the recipe file, else the working folder)."""
    spec = recipe.model
    if spec is None or not spec.checkpoint:
        return None
    path = Path(spec.checkpoint).expanduser()
    if not path.is_absolute():
        source = Path(getattr(recipe, "source", "") or "")
        path = (source.parent if source.is_file() else Path.cwd()) / path
    return path.resolve()


def base_ref(recipe: Any, *, token: str | None) -> dict[str, Any]:
    """``surgery.json: base`` (without the fingerprint) for a recipe's ``model:`` section.

    A hub base is recorded with the commit its revision resolves to now. A local checkpoint is recorded by file name
    and sha256, never by its path: the path means nothing on another machine and tells strangers about this one.
    """
    from surgery.hub import client as hub

    spec = recipe.model
    checkpoint = checkpoint_path(recipe)
    revision = None
    if spec.name.startswith(HF_HUB):
        repo_id, rev = hub.parse_ref(spec.name)
        if is_commit(rev):
            revision = rev
        else:
            try:
                revision = hub.resolve_revision(repo_id, rev, token=token, retries=1)
            except SurgeryError:
                revision = None  # offline: the fingerprint still pins the weights
    ref: dict[str, Any] = {
        "model": spec.name,
        "revision": revision,
        "pretrained": spec.pretrained,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "kwargs": dict(spec.kwargs),
        "reproducible": bool(spec.pretrained or spec.checkpoint),
    }
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise AdapterError(f"save_adapter: model.checkpoint {checkpoint} does not exist; the base is unknown")
        ref["checkpoint"] = checkpoint.name
        ref["checkpoint_sha256"] = sha256_file(checkpoint)
    return ref


def warn_local_base(base: Mapping[str, Any], *, when: str) -> None:
    """A base that is a local checkpoint cannot be rebuilt elsewhere: say so (at save and at push time)."""
    if base.get("checkpoint"):
        warnings.warn(
            f"{when}: the base is {base.get('model')} + the local checkpoint {base['checkpoint']} (sha256 "
            f"{str(base.get('checkpoint_sha256'))[:12]}...); whoever loads this adapter needs that file: "
            f"surgery load ADAPTER --base {base['checkpoint']}, or publish the base on a hub and train from hf-hub:",
            UserWarning,
            stacklevel=3,
        )


def build_base(
    base: Mapping[str, Any], *, checkpoint: Path | None = None, token: str | None = None, where: str = CONFIG_FILE
) -> nn.Module:
    """Build the base an adapter records, through :func:`surgery.models.build_model` only (its kwargs allow-list).

    ``hf-hub:`` bases come through this package's hub client, pinned to the recorded commit, safetensors only, and are
    built by timm from that folder. A local checkpoint is ``checkpoint`` (a file the caller names). Every failure is
    an :class:`AdapterError` or :class:`~surgery.errors.ModelError`.
    """
    from surgery.hub import client as hub
    from surgery.models import build_model
    from surgery.schema import ModelSpec

    name = str(base["model"])
    pretrained = bool(base.get("pretrained"))
    if base.get("checkpoint") and checkpoint is None:
        raise AdapterError(
            f"{where}: the base is {name} + the local checkpoint {base['checkpoint']}, which is not here; pass it: "
            f"surgery load ADAPTER --base PATH/{base['checkpoint']}, or surgery.load(ref, base=model)"
        )
    if checkpoint is not None and base.get("checkpoint_sha256"):
        if not checkpoint.is_file():
            raise AdapterError(f"--base {checkpoint}: no such file")
        got = sha256_file(checkpoint)
        if got != base["checkpoint_sha256"]:
            raise AdapterError(
                f"wrong base model: {checkpoint} has sha256 {got[:12]}..., the adapter was made on "
                f"{base['checkpoint']} with sha256 {str(base['checkpoint_sha256'])[:12]}...; pass the original file"
            )
    if name.startswith(HF_HUB):
        repo_id, rev = hub.parse_ref(name)
        rev = base.get("revision") or rev
        patterns = ["config.json", "model.safetensors"] if pretrained else ["config.json"]
        folder = hub.download(f"{HF_HUB}{repo_id}" + (f"@{rev}" if rev else ""), allow_patterns=patterns, token=token)
        if not (folder / "config.json").is_file():
            raise AdapterError(f"base {name}: the repo has no config.json, so timm cannot build it")
        if pretrained and not (folder / "model.safetensors").is_file():
            raise AdapterError(
                f"base {name}: the repo has no model.safetensors; only safetensors weights are loaded (never pickle)"
            )
        name = f"local-dir:{folder}"
    try:
        spec = ModelSpec(
            name=name,
            pretrained=pretrained,
            checkpoint=str(checkpoint) if checkpoint else None,
            kwargs=dict(base.get("kwargs") or {}),
        )
    except ValueError as err:
        raise AdapterError(f"{where}: base: {err}") from None
    try:
        return build_model(spec, where=f"{where}: base")
    except SurgeryError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever timm raises on a hostile or broken base becomes one line
        raise AdapterError(
            f"{where}: base {base.get('model')}: cannot build it ({type(err).__name__}: {err})"
        ) from None


def base_model_id(model: nn.Module | None, base: Mapping[str, Any]) -> str | None:
    """The hub id for the model card's ``base_model``, when there is one."""
    from surgery.hub import client as hub

    name = str(base.get("model") or "")
    if name.startswith(HF_HUB):
        return hub.parse_ref(name)[0]
    if not base.get("pretrained") or base.get("checkpoint") or not name:
        return None
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if cfg is None:  # no model at hand (push): timm's registry knows the pretrained config of a name
        import timm.models

        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - an unknown name simply has no hub id
            return None
        cfg = cfg.to_dict() if cfg is not None else {}
    return (cfg or {}).get("hf_hub_id") or None


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


def _recipe_data(recipe: Any, base: Mapping[str, Any] | None) -> dict[str, Any]:
    from surgery.recipe import load_recipe, resolved_data

    try:
        data = resolved_data(recipe)
    except RecipeError as err:
        raise AdapterError(f"cannot write {CONFIG_FILE}: {err}") from None
    if data.get("model"):  # the checkpoint by name only, as in base (no path of this machine)
        if base is not None and base.get("checkpoint"):
            data["model"]["checkpoint"] = base["checkpoint"]
        else:
            data["model"].pop("checkpoint", None)
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
    ref = base_ref(located, token=token) if located.model is not None else None
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
        from surgery.models import build_model

        if ref is not None and str(ref["model"]).startswith(HF_HUB):  # timm's own hub download would bypass ours
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
        if num_classes is not None and len(class_names) != num_classes:
            raise AdapterError(
                f"save_adapter: {len(class_names)} class names for a {num_classes}-class head; pass one name per class"
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
        "recipe": _recipe_data(recipe, ref),
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
    write_config(folder, config)
    write_card(folder / CARD_FILE, config, base_model_id=base_model_id(base_model or model, raw["base"]))
    log.info("saved adapter %s (%d tensors)", folder, len(tensors))
    return folder


def write_config(folder: Path, config: AdapterConfig) -> None:
    """Write ``surgery.json`` atomically."""
    import json

    write_text(folder / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
