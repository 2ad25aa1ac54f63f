"""Adapters: the few tensors a recipe changed, saved apart from the base model, reloaded exactly, merged for timm.

An adapter folder holds:

- ``adapter.safetensors``: exactly what differs from the base model: the trained parameters, the replaced heads
  (parameters and buffers) and the BatchNorm running statistics that training moved. Nothing else.
- ``surgery.json``: format version, the fully resolved recipe, the base model reference with its revision, a sha256
  fingerprint of the base weights, num_classes and class names, the list of tensors with shapes and the sha256 of
  ``adapter.safetensors``, library versions and final metrics.
- ``README.md``: a model card (``library_name: timm``, ``base_model``, the recipe, the metrics, how to load it).

:func:`load` rebuilds the base, checks its fingerprint, applies the recipe's structural changes (heads, norm
conversions) and loads the adapter strictly: its outputs equal the trained model's. :func:`merge` writes a plain timm
folder (``config.json`` + ``model.safetensors``) that ``timm.create_model("local-dir:...")`` or ``hf-hub:`` loads
without this package. Weights are only ever written and read as safetensors, never pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from surgery.errors import AdapterError, RecipeError, SurgeryError
from surgery.hub import client as hub_mod
from surgery.norms import FrozenBatchNorm1d, StatsFixed, release
from surgery.plan import Plan

FORMAT = "timm-surgery-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "surgery.json"
CARD_FILE = "README.md"
MERGED_WEIGHTS = "model.safetensors"
MERGED_CONFIG = "config.json"
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

__all__ = [
    "AdapterInfo",
    "describe",
    "fingerprint",
    "load",
    "merge",
    "plain_norms",
    "predict",
    "read_info",
    "save_adapter",
    "save_outputs",
    "verify_files",
]

AdapterInfo = dict[str, Any]
"""The parsed ``surgery.json`` (see the module docstring and ``docs/adapters.md`` for its keys)."""


# --------------------------------------------------------------------------------------------------- fingerprint


def fingerprint(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over a state dict: every tensor's name, dtype, shape and bytes, in sorted name order.

    Two models have the same fingerprint exactly when their state dicts are bit-identical, so an adapter can tell
    whether the base it is loaded onto is the one it was trained on.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_meta:
            raise AdapterError(f"fingerprint: {name!r} is on the meta device; build the base model with its weights")
        tensor = tensor.to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}\0{dtype}\0{list(tensor.shape)}\0{data.nbytes}\0".encode())
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- what is saved


def _expected(model: nn.Module, the_plan: Plan) -> tuple[dict[str, str], set[str]]:
    """(required, optional) tensor names of an adapter of ``model`` as ``the_plan`` applied it.

    Required: trainable parameters and everything in a replaced head. Optional: running statistics of BatchNorms
    whose statistics move in training (not stats-fixed, not frozen); saved only when they differ from the base.
    """
    state = model.state_dict()
    required = {p.name: "trainable" for p in the_plan.parameters if p.trainable}
    heads = tuple(h.path + "." for h in the_plan.heads)
    for name in state:
        if name.startswith(heads):
            required.setdefault(name, "head")
    optional: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and not isinstance(module, StatsFixed):
            for buffer in _STAT_BUFFERS:
                name = f"{path}.{buffer}" if path else buffer
                if name in state and name not in required:
                    optional.add(name)
    return required, optional


def _replay(model: nn.Module, recipe: Any) -> tuple[list[Plan], dict[str, str], set[str]]:
    """Apply ``recipe`` to a base ``model`` as training did, stage by stage (``train.stages``); returns the plans and
    the adapter's (required, optional) tensor names over all stages: whatever any stage trained or let move."""
    from surgery import stages as stages_mod
    from surgery.apply import apply_plan
    from surgery.plan import plan as make_plan

    stages = stages_mod.stage_specs(recipe.train)
    with torch.random.fork_rng(devices=[]):  # new heads are initialized, then overwritten: leave the caller's RNG
        first = apply_plan(model, make_plan(model, stages_mod.stage_recipe(recipe, stages, 0, None)))
        plans = [first]
        for index in range(1, len(stages)):
            plans.append(apply_plan(model, make_plan(model, stages_mod.stage_recipe(recipe, stages, index, first))))
    required: dict[str, str] = {}
    optional: set[str] = set()
    for the_plan in plans:
        more, maybe = _expected(model, the_plan)
        for name, kind in more.items():
            required.setdefault(name, kind)
        optional |= maybe
    return plans, required, optional - set(required)


def stages_of(recipe: Any) -> list[Any]:
    """The training stages a recipe runs (``train.stages``, or one stage)."""
    from surgery.stages import stage_specs

    return stage_specs(recipe.train)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.device == b.device:
        return False  # the "base" is the trained tensor itself: it cannot tell what changed, so keep it
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------- base models


def _recipe_dir(recipe: Any) -> Path:
    source = Path(getattr(recipe, "source", "") or "")
    return source.parent if source.is_file() else Path.cwd()


def _base_info(recipe: Any, *, token: str | None) -> dict[str, Any]:
    """The base reference of a recipe's ``model:`` section, with hub revisions resolved to a commit sha."""
    spec = recipe.model
    checkpoint = None
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        checkpoint = str((path if path.is_absolute() else _recipe_dir(recipe) / path).resolve())
    revision = None
    if spec.name.startswith(hub_mod.HF_HUB):
        repo_id, rev = hub_mod.parse_ref(spec.name)
        if rev and len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
            revision = rev
        else:
            try:
                revision = hub_mod.resolve_revision(repo_id, rev, token=token, retries=1)
            except SurgeryError:
                revision = None  # offline: the fingerprint still pins the weights
    return {
        "model": spec.name,
        "revision": revision,
        "pretrained": spec.pretrained,
        "checkpoint": checkpoint,
        "kwargs": dict(spec.kwargs),
        "reproducible": bool(spec.pretrained or spec.checkpoint),
    }


def _build_base(base: Mapping[str, Any], *, token: str | None = None) -> nn.Module:
    """Build the base model an adapter records. ``hf-hub:`` bases come through this package's hub client (honouring
    ``HF_ENDPOINT`` now, pinned to the recorded commit, safetensors only) and are built by timm from that folder."""
    from surgery.models import build_model
    from surgery.schema import ModelSpec

    name = str(base["model"])
    pretrained = bool(base.get("pretrained"))
    checkpoint = base.get("checkpoint")
    if checkpoint and not Path(checkpoint).is_file():
        raise AdapterError(
            f"base checkpoint {checkpoint} (recorded in {CONFIG_FILE}) does not exist here; copy it there, or pass "
            "the base model yourself: surgery.load(ref, base=model)"
        )
    if name.startswith(hub_mod.HF_HUB):
        repo_id, rev = hub_mod.parse_ref(name)
        rev = base.get("revision") or rev
        patterns = ["config.json", MERGED_WEIGHTS] if pretrained else ["config.json"]
        folder = hub_mod.download(
            f"{hub_mod.HF_HUB}{repo_id}" + (f"@{rev}" if rev else ""), allow_patterns=patterns, token=token
        )
        if not (folder / "config.json").is_file():
            raise AdapterError(f"base {name}: the repo has no config.json, so timm cannot build it")
        if pretrained and not (folder / MERGED_WEIGHTS).is_file():
            raise AdapterError(
                f"base {name}: the repo has no {MERGED_WEIGHTS}; only safetensors weights are loaded (never pickle)"
            )
        name = f"local-dir:{folder}"
    spec = ModelSpec(name=name, pretrained=pretrained, checkpoint=checkpoint, kwargs=dict(base.get("kwargs") or {}))
    return build_model(spec, where=f"{CONFIG_FILE}: base")


def _base_model_id(model: nn.Module, base: Mapping[str, Any]) -> str | None:
    """The hub id for the model card's ``base_model``, when there is one."""
    name = str(base["model"])
    if name.startswith(hub_mod.HF_HUB):
        return hub_mod.parse_ref(name)[0]
    if base.get("pretrained") and not base.get("checkpoint"):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return cfg.get("hf_hub_id") or None
    return None


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
    if base is not None and data.get("model") and base.get("checkpoint"):
        data["model"]["checkpoint"] = base["checkpoint"]
    try:
        load_recipe(data)  # what load() will read back must load
    except SurgeryError as err:
        raise AdapterError(f"the resolved recipe does not load back ({err}); please report this") from None
    return data


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(
    model: nn.Module,
    the_plan: Plan,
    folder: str | Path,
    *,
    base: nn.Module | Mapping[str, torch.Tensor] | str | None = None,
    class_names: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    recipe: Any = None,
    token: str | None = None,
) -> Path:
    """Write the adapter of a trained ``model`` (to which ``the_plan`` was applied) into ``folder``; returns it.

    ``base`` says what the model was before surgery and training: a fingerprint string from :func:`fingerprint`
    (cheapest: compute it right after building the model), the base model or its state dict, or ``None`` to rebuild
    it from the recipe's ``model:`` section. With base weights at hand, BatchNorm statistics that did not change are
    left out and a frozen tensor that changed anyway is refused (the adapter could not reproduce it).

    ``recipe`` is the recipe as written (default ``the_plan.recipe``). With several ``train.stages`` pass it, and
    ``the_plan`` may be any stage's: the adapter holds what any stage trained, and loading replays the stages.
    """
    from surgery.recipe import LoadedRecipe, load_recipe

    model = _unwrap(model)
    if recipe is None:
        recipe = the_plan.recipe
    elif not isinstance(recipe, LoadedRecipe):
        recipe = load_recipe(recipe)
    folder = Path(folder)
    # The model section is the same in every stage's recipe; the plan's knows where relative paths start.
    located = the_plan.recipe if the_plan.recipe.model is not None else recipe
    base_info = _base_info(located, token=token) if located.model is not None else None
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
        if base_info is None:
            raise AdapterError(
                "save_adapter: the recipe has no model: section, so the base cannot be rebuilt; pass "
                "base=surgery.adapter.fingerprint(model) computed before surgery.apply"
            )
        if not base_info["reproducible"]:
            raise AdapterError(
                f"save_adapter: the base {base_info['model']} has random weights (pretrained: false, no checkpoint), "
                "so it cannot be rebuilt to compare with; pass base=fingerprint(model) taken before training, or "
                "use model.checkpoint"
            )
        base_model = _build_base(base_info, token=token)
        base_state = base_model.state_dict()
        base_fp = fingerprint(base_state)

    state = model.state_dict()
    if len(stages_of(recipe)) > 1:
        if base_model is not None:
            layout_model = copy.deepcopy(base_model)
        elif base_info is not None:  # the structure only: random weights are enough to replay the stages
            layout_model = _build_base({**base_info, "pretrained": False, "checkpoint": None}, token=token)
        else:
            raise AdapterError(
                "save_adapter: a recipe with several train.stages needs the base to replay them; pass base=<the "
                "base model> or give the recipe a model: section"
            )
        plans, required, optional = _replay(layout_model, recipe)
        first = plans[0]
    else:
        required, optional = _expected(model, the_plan)
        first = the_plan
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

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    adapter_path = folder / ADAPTER_FILE
    _write_atomic(adapter_path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    info: AdapterInfo = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": {**(base_info or {"model": None, "reproducible": False}), "fingerprint": base_fp},
        "recipe": _recipe_data(recipe, base_info),
        "num_classes": num_classes,
        "class_names": class_names,
        "heads": heads,
        "tensors": {
            n: {"shape": list(t.shape), "dtype": _dtype_name(t), "kind": required.get(n, "buffer")}
            for n, t in tensors.items()
        },
        "adapter_sha256": _file_sha256(adapter_path),
        "adapter_bytes": adapter_path.stat().st_size,
        "trainable_params": sum(int(state[n].numel()) for n, kind in required.items() if kind == "trainable"),
        "total_params": sum(int(p.numel()) for p in model.parameters()),
        "versions": _versions(),
        "metrics": dict(metrics or {}),
    }
    _write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8"))
    _write_card(folder / CARD_FILE, info, base_model_id=_base_model_id(base_model or model, info["base"]))
    return folder


# -------------------------------------------------------------------------------------------------------- card


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    if not metrics:
        return "No metrics were recorded."
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def _write_card(path: Path, info: Mapping[str, Any], *, base_model_id: str | None, merged: bool = False) -> None:
    """README.md through huggingface_hub's ModelCard: metadata the Hub understands, then a readable body."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    base = info["base"]
    tags = ["image-classification", "timm", "timm-surgery", "merged" if merged else "adapter"]
    data = ModelCardData(library_name="timm", base_model=base_model_id, tags=tags, pipeline_tag="image-classification")
    recipe = yaml.safe_dump(info["recipe"], sort_keys=False, default_flow_style=None).strip()
    classes = info.get("class_names") or []
    shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
    repo = ((info.get("recipe") or {}).get("hub") or {}).get("repo") or "ORG/NAME"
    repo = "ORG/NAME" if merged else repo.removeprefix(hub_mod.HF_HUB)
    if merged:
        title = "timm model merged from a timm-surgery adapter"
        how = (
            f'```python\nimport timm\n\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True).eval()\n```\n\n'
            "A plain timm model: this package is not needed to load it."
        )
        size = ""
    else:
        title = "timm-surgery adapter"
        how = (
            f'```python\nimport surgery\n\nmodel = surgery.load("hf-hub:{repo}")  # or a local folder\n```\n\n'
            "`surgery.load` builds the base model, checks its sha256 fingerprint, applies the recipe's heads and "
            "norm conversions and loads `adapter.safetensors` strictly. `surgery merge ADAPTER OUT` writes a plain "
            "timm folder."
        )
        size = f"\n- Adapter: {info.get('adapter_bytes', 0):,} bytes ({len(info.get('tensors', {}))} tensors)"
    trainable, total = info.get("trainable_params"), info.get("total_params")
    share = f" ({100 * trainable / total:.2f}% of {total:,})" if trainable and total else ""
    body = f"""# {title}

- Base model: `{base.get("model")}` at revision `{base.get("revision") or "-"}`
- Base fingerprint: `{base.get("fingerprint")}`
- Classes: {info.get("num_classes")}{f" ({shown})" if shown else ""}
- Trained parameters: {f"{trainable:,}" if trainable else "-"}{share}{size}

## How to load

{how}

## Metrics

{_metrics_table(info.get("metrics") or {})}

## Recipe

```yaml
{recipe}
```
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path)


# -------------------------------------------------------------------------------------------------------- read


def _resolve(ref: str | Path, *, token: str | None) -> Path:
    """A local adapter folder, or the snapshot of ``hf-hub:org/name[@revision]`` (adapter files only)."""
    text = str(ref)
    if text.startswith(hub_mod.HF_HUB):
        return hub_mod.download(text, allow_patterns=[ADAPTER_FILE, CONFIG_FILE, CARD_FILE], token=token)
    folder = Path(text)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder; give a folder or hf-hub:ORG/NAME[@revision]")
    return folder


def read_info(ref: str | Path, *, token: str | None = None) -> AdapterInfo:
    """The parsed ``surgery.json`` of an adapter folder or ``hf-hub:`` reference."""
    return _read_info(_resolve(ref, token=token))


def _read_info(folder: Path) -> AdapterInfo:
    path = folder / CONFIG_FILE
    if not path.is_file():
        hint = " (it looks like a merged timm folder: load it with timm)" if (folder / MERGED_CONFIG).is_file() else ""
        raise AdapterError(f"{path}: missing; an adapter folder holds {CONFIG_FILE} and {ADAPTER_FILE}{hint}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(
            f"{path}: not readable JSON ({err}); the adapter is damaged, save or download it again"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a timm-surgery adapter description (format != {FORMAT!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(
            f"{path}: adapter format version {version} is newer than this timm-surgery understands "
            f"({FORMAT_VERSION}); upgrade timm-surgery"
        )
    for key in ("base", "recipe", "tensors", "adapter_sha256"):
        if key not in info:
            raise AdapterError(f"{path}: key {key!r} is missing; the adapter is damaged, save or download it again")
    return info


def _header(path: Path) -> dict[str, tuple[list[int], str]]:
    """Names, shapes and dtypes of a safetensors file, read from its header without loading the data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = f.get_slice(name)
                out[name] = (list(piece.get_shape()), _safetensors_dtype(piece.get_dtype()))
            return out
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise AdapterError(
            f"{path}: not a readable safetensors file ({type(err).__name__}); the file is damaged or tampered with, "
            "save or download the adapter again"
        ) from None


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


def _safetensors_dtype(code: str) -> str:
    return _ST_DTYPES.get(code, code.lower())


def verify_files(ref: str | Path, *, token: str | None = None) -> AdapterInfo:
    """Check an adapter's files against each other, without building a model: the tensors ``surgery.json`` lists
    (none missing, none extra, same shapes and dtypes) and the sha256 of ``adapter.safetensors``."""
    folder = _resolve(ref, token=token)
    info = _read_info(folder)
    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: missing; download or copy the whole adapter folder")
    header = _header(path)
    listed = info["tensors"]
    missing = [n for n in listed if n not in header]
    if missing:
        raise AdapterError(
            f"{path}: missing tensor {missing[0]!r} (listed in {CONFIG_FILE}; {len(missing)} missing in all); "
            "the file is incomplete: save or download the adapter again"
        )
    extra = [n for n in header if n not in listed]
    if extra:
        raise AdapterError(
            f"{path}: extra tensor {extra[0]!r} not listed in {CONFIG_FILE} ({len(extra)} in all); the file was "
            "changed after saving: save or download the adapter again"
        )
    for name, (shape, dtype) in header.items():
        want = listed[name]
        if list(want.get("shape", [])) != shape or want.get("dtype", dtype) != dtype:
            raise AdapterError(
                f"{path}: shape mismatch for {name!r}: {dtype}{shape} in the file, {want.get('dtype')}"
                f"{want.get('shape')} in {CONFIG_FILE}; the file comes from another adapter: use the matching pair"
            )
    if _file_sha256(path) != info["adapter_sha256"]:
        raise AdapterError(
            f"{path}: sha256 differs from the one recorded in {CONFIG_FILE}: the file was tampered with or damaged; "
            "save or download the adapter again"
        )
    return info


# -------------------------------------------------------------------------------------------------------- load


def _wrong_base(info: AdapterInfo, got: str, supplied: bool) -> AdapterError:
    base = info["base"]
    where = f"{base.get('model')}" + (f"@{base['revision'][:12]}" if base.get("revision") else "")
    if base.get("checkpoint"):
        where += f" + checkpoint {base['checkpoint']}"
    if supplied:
        why = "the base model you passed is not the one the adapter was trained on"
        fix = "pass the original base model, or load without base= to rebuild it from surgery.json"
    elif not base.get("reproducible", True):
        why = f"the base {where} has random weights (pretrained: false, no checkpoint), so it cannot be rebuilt"
        fix = "pass the original base model: surgery.load(ref, base=model)"
    else:
        why = f"the rebuilt base {where} is not the one the adapter was trained on"
        fix = "restore the original checkpoint/revision, or pass the original base model with base="
    return AdapterError(f"wrong base model: {why} (fingerprint {got[:19]}... != {base['fingerprint'][:19]}...); {fix}")


def _load_folder(
    folder: Path, *, base: nn.Module | None, token: str | None
) -> tuple[nn.Module, Plan, AdapterInfo, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from surgery.recipe import load_recipe

    info = verify_files(folder)
    path = folder / ADAPTER_FILE
    try:
        recipe = load_recipe(info["recipe"])
    except SurgeryError as err:
        raise AdapterError(f"{folder / CONFIG_FILE}: recipe: {err}") from None
    if base is not None:
        model = copy.deepcopy(base)
    elif info["base"].get("model"):
        model = _build_base(info["base"], token=token)
    else:
        raise AdapterError(f"{folder / CONFIG_FILE}: the base model is not recorded; pass it: load(ref, base=model)")
    got = fingerprint(model)
    if got != info["base"]["fingerprint"]:
        raise _wrong_base(info, got, supplied=base is not None)
    base_state = dict(model.state_dict())
    plans, required, optional = _replay(model, recipe)
    state = model.state_dict()
    header = _header(path)
    missing = [n for n in required if n not in header]
    if missing:
        raise AdapterError(
            f"{path}: missing tensor {missing[0]!r} ({required[missing[0]]}; {len(missing)} missing in all): the "
            "recipe trains it but the adapter lacks it; the adapter was saved from another recipe or edited"
        )
    for name, (shape, dtype) in header.items():
        if name not in state:
            raise AdapterError(
                f"{path}: extra tensor {name!r}: the model built from {CONFIG_FILE} has no such tensor; the adapter "
                "belongs to another model"
            )
        if name not in required and name not in optional:
            raise AdapterError(
                f"{path}: extra tensor {name!r}: the recipe keeps it frozen, so an adapter never changes it; "
                "the adapter was saved from another recipe or edited"
            )
        want = state[name]
        if list(want.shape) != shape or _dtype_name(want) != dtype:
            raise AdapterError(
                f"{path}: shape mismatch for {name!r}: {dtype}{shape} in the adapter, {_dtype_name(want)}"
                f"{list(want.shape)} in the model; the adapter was trained with another head size or model"
            )
    tensors = load_file(str(path))
    model.load_state_dict(tensors, strict=False)
    model.eval()
    _label(model, info)
    model.adapter_info = info  # type: ignore[assignment] - provenance for callers (surgery.json)
    return model, plans[0], info, base_state


def _label(model: nn.Module, info: AdapterInfo) -> None:
    """Keep timm's ``pretrained_cfg`` truthful about the new classes."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or info.get("num_classes") is None:
        return
    cfg = dict(cfg)
    if cfg.get("num_classes") != info["num_classes"]:
        for key in ("label_names", "label_descriptions", "label_offset"):
            cfg.pop(key, None)
    cfg["num_classes"] = info["num_classes"]
    if info.get("class_names"):
        cfg["label_names"] = list(info["class_names"])
    model.pretrained_cfg = cfg


def load(ref: str | Path, *, base: nn.Module | None = None, token: str | None = None) -> nn.Module:
    """The trained model of an adapter (folder or ``hf-hub:org/name[@revision]``), in eval mode.

    Builds the base from ``surgery.json`` (or uses a copy of ``base``), verifies its fingerprint, applies the recipe's
    heads and norm conversions and loads ``adapter.safetensors`` strictly: outputs equal the trained model's. A wrong
    base, a missing or extra tensor, a shape mismatch or a tampered file raises :class:`AdapterError`. The model's
    ``adapter_info`` attribute holds the parsed ``surgery.json``.
    """
    model, _, _, _ = _load_folder(_resolve(ref, token=token), base=base, token=token)
    return model


# ------------------------------------------------------------------------------------------------------- merge


def plain_norms(model: nn.Module, base_state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Turn stats-fixed and frozen BatchNorms back into the plain classes, in place (same outputs in eval mode).

    A frozen BatchNorm keeps no step counter; ``num_batches_tracked`` is taken from ``base_state`` when given.
    """
    from timm.layers import FrozenBatchNormAct2d
    from timm.layers.norm_act import unfreeze_batch_norm_2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    for path, module in list(model.named_modules()):
        new: nn.Module | None = None
        if isinstance(module, StatsFixed):
            new = release(module)
        elif isinstance(module, FrozenBatchNorm2d | FrozenBatchNormAct2d):
            new = unfreeze_batch_norm_2d(module).to(module.running_mean.device)
        elif isinstance(module, FrozenBatchNorm1d):
            new = nn.BatchNorm1d(module.num_features, eps=module.eps).to(module.running_mean.device)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, name).copy_(getattr(module, name))
        if new is None:
            continue
        if not isinstance(module, StatsFixed):
            new.weight.requires_grad_(False)
            new.bias.requires_grad_(False)
            counter = (base_state or {}).get(f"{path}.num_batches_tracked")
            if counter is not None and getattr(new, "num_batches_tracked", None) is not None:
                new.num_batches_tracked.copy_(counter)
        new.train(module.training)
        if path:
            model.set_submodule(path, new)
        else:
            return new
    return model


def _mergeable(model: nn.Module, the_plan: Plan, info: AdapterInfo) -> None:
    """Refuse what timm's config.json cannot express, with the reason and what to do instead."""
    name = str(info["base"].get("model") or "")
    cfg = getattr(model, "pretrained_cfg", None)
    if name.startswith("torchvision:") or not isinstance(cfg, dict) or not cfg.get("architecture"):
        raise AdapterError(
            f"merge: the base {name or type(model).__name__} is not a timm model, so no timm config.json can "
            "describe it; keep the adapter and load it with surgery.load"
        )
    classifier = cfg.get("classifier")
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for head in the_plan.heads:
        if head.spec.type != "linear":
            raise AdapterError(
                f"merge: heads.{head.key} is an {head.spec.type} head ({head.new}); timm builds a linear classifier "
                "from num_classes and cannot express it, so a merged folder would load wrong weights. Keep the "
                "adapter (surgery.load) or train with a linear head"
            )
        if head.path not in classifiers:
            raise AdapterError(
                f"merge: heads.{head.key} replaces {head.path!r}, which is not timm's classifier "
                f"({', '.join(classifiers) or 'none'}); timm cannot rebuild it from num_classes. Keep the adapter"
            )
    replaced = {h.path for h in the_plan.heads}
    if replaced and replaced != set(classifiers):
        left = sorted(set(classifiers) - replaced)
        raise AdapterError(
            f"merge: only part of the classifier is replaced ({left[0]!r} keeps its old size); timm sets every "
            "classifier from one num_classes. Replace all of them (heads.classifier) or keep the adapter"
        )
    if len({h.num_classes for h in the_plan.heads}) > 1:
        raise AdapterError("merge: the new heads have different num_classes; timm has one. Keep the adapter")


def _probe(model: nn.Module) -> torch.Tensor:
    """A fixed random batch of the model's current input size (timm's own view of it, after img_size changes)."""
    from timm.models._input import get_model_input_config

    try:
        size = tuple(get_model_input_config(model)["input_size"])
    except Exception:  # noqa: BLE001 - fall back to the recorded config
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, *size), generator=generator)


def merge(ref: str | Path, out: str | Path, *, token: str | None = None, check: bool = True) -> Path:
    """Write the adapter merged into its base as a timm folder (``config.json``, ``model.safetensors``, README.md).

    ``timm.create_model("local-dir:OUT", pretrained=True)`` (or ``hf-hub:`` after a push) then loads it without this
    package. With ``check`` (default) the folder is loaded back with timm and its outputs compared with the adapter's;
    a mismatch removes the written files and raises. Heads timm cannot build from ``num_classes`` (an MLP head, a
    module that is not the classifier) are refused before anything is written.
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    folder = _resolve(ref, token=token)
    model, the_plan, info, base_state = _load_folder(folder, base=None, token=token)
    _mergeable(model, the_plan, info)
    probe = _probe(model)
    with torch.no_grad():
        expected = model(probe)
    model = plain_norms(model, base_state).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / MERGED_WEIGHTS, out / MERGED_CONFIG, out / CARD_FILE]
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    try:
        _write_atomic(out / MERGED_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        config = {"label_names": list(info["class_names"])} if info.get("class_names") else None
        try:
            save_config_for_hf(model, str(out / MERGED_CONFIG), model_config=config)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise AdapterError(
                f"merge: timm cannot describe this model in config.json ({err}); keep the adapter"
            ) from None
        card = {**info, "tensors": {}}
        _write_card(out / CARD_FILE, card, base_model_id=_base_model_id(model, info["base"]), merged=True)
        if check:
            _check_merged(out, probe, expected)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return out


def _check_merged(out: Path, probe: torch.Tensor, expected: torch.Tensor) -> None:
    import timm

    try:
        merged = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    except Exception as err:  # noqa: BLE001 - any failure here means timm cannot load what we wrote
        raise AdapterError(
            f"merge: timm cannot load the merged folder ({type(err).__name__}: {err}); keep the adapter"
        ) from None
    with torch.no_grad():
        got = merged(probe)
    if got.shape != expected.shape or not torch.equal(got, expected):  # merged exports are exact, not "close"
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
        raise AdapterError(
            f"merge: timm's model from the merged folder gives different outputs (max difference {diff:.3g}); "
            "keep the adapter and load it with surgery.load"
        )


# ---------------------------------------------------------------------------------------------------- describe


def describe(info: AdapterInfo) -> str:
    """A few lines about a loaded adapter (``surgery load``)."""
    base = info["base"]
    revision = f"@{base['revision'][:12]}" if base.get("revision") else ""
    classes = info.get("class_names") or []
    lines = [
        f"Adapter verified: base {base.get('model')}{revision}, fingerprint {base['fingerprint'][:19]}... matches",
        f"  {len(info['tensors'])} tensors, {info.get('adapter_bytes', 0):,} bytes; "
        f"{info.get('num_classes')} classes" + (f": {', '.join(classes[:10])}" if classes else ""),
    ]
    for key, value in (info.get("metrics") or {}).items():
        lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return "\n".join(lines)


def predict(model: nn.Module, images: Sequence[str | Path], *, top: int = 3) -> list[str]:
    """``path: class (prob), ...`` for each image, with timm's eval transform for the model."""
    if not images:
        return []
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    names = (getattr(model, "adapter_info", None) or {}).get("class_names") or []
    lines = []
    for image in images:
        try:
            with Image.open(image) as img:
                x = transform(img.convert("RGB")).unsqueeze(0)
        except OSError as err:
            raise AdapterError(f"{image}: cannot read the image ({err})") from None
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        values, indices = probs.topk(min(top, probs.numel()))
        shown = [
            f"{names[i] if i < len(names) else i} ({v:.3f})"
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        lines.append(f"{image}: {', '.join(shown)}")
    return lines


# ------------------------------------------------------------------------------------------------ train's hook


def save_outputs(
    model: nn.Module,
    the_plan: Plan,
    folder: str | Path,
    *,
    base: nn.Module | Mapping[str, torch.Tensor] | str | None = None,
    recipe: Any = None,
    class_names: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path | None:
    """`surgery train`'s hook: write the adapter into its output folder, next to what training wrote.

    Reads what is not given from that folder: the recipe as written (``recipe.yaml``), ``classes.json`` and the
    scalar entries of ``metrics.json``. Without ``base`` the base is rebuilt from the recipe; a base with random weights
    (no checkpoint, not pretrained) cannot be, so then no adapter is written and a warning says why.
    """
    import sys

    from surgery.recipe import load_recipe

    folder = Path(folder)
    if recipe is None and (folder / "recipe.yaml").is_file():
        recipe = load_recipe(folder / "recipe.yaml")
    if class_names is None and (folder / "classes.json").is_file():
        class_names = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    if metrics is None and (folder / "metrics.json").is_file():
        found = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        metrics = {k: v for k, v in found.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    spec = the_plan.recipe.model
    if base is None and (spec is None or not (spec.pretrained or spec.checkpoint)):
        print(
            "surgery: no adapter written: the base model has random weights (pretrained: false, no checkpoint), so "
            "it could never be rebuilt to load the adapter; set model.checkpoint or model.pretrained",
            file=sys.stderr,
        )
        return None
    return save_adapter(model, the_plan, folder, base=base, recipe=recipe, class_names=class_names, metrics=metrics)
