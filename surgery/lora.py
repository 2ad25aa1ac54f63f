"""LoRA adapters on timm models, in PEFT's own format: selecting targets, injecting, saving, loading, merging.

Everything that touches LoRA weights is PEFT's (``LoraConfig``, ``get_peft_model``, ``save_pretrained``,
``set_peft_model_state_dict``, ``merge_and_unload``, ``add_adapter``/``set_adapter``); this module adds what PEFT
leaves to its caller:

- targets chosen with this project's selectors (glob, ``re:``, ``!``, layer ranges) over the model's *module* names
  and written to the ``LoraConfig`` as exact names, so a typo is a located error with suggestions instead of PEFT's
  suffix match quietly adapting something else or nothing;
- a clear error for a module LoRA cannot adapt faithfully (norms, depthwise or "same"-padded convolutions, layers the
  model reads ``.weight`` from instead of calling, as BEiT/EVA ``qkv`` with ``q_bias``);
- untrusted adapter folders: ``adapter_config.json`` is checked key by key before PEFT sees it, weights come only from
  ``adapter_model.safetensors`` (never the pickle ``adapter_model.bin``), and nothing is fetched or imported.

A LoRA model is a ``peft.PeftModel`` around the timm model; :func:`merge` gives back a plain timm model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from surgery.errors import AdapterError, ModelError, NoMatchingParameterError, RecipeError
from surgery.layers import layer_of, layers_from_names
from surgery.recipe.schema import LayerRange, LoraSpec
from surgery.select import _closest, match_patterns, select_layers

if TYPE_CHECKING:  # peft (and the transformers it imports) loads on first use, not with `import surgery.lora`
    from peft import LoraConfig, PeftModel

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"  # PEFT's file names (peft.utils.CONFIG_NAME / SAFETENSORS_WEIGHTS_NAME)
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."  # what PeftModel puts before every module name of the wrapped model
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

Where = str | Callable[..., str]
"""Where errors point: a prefix such as ``"surgery.lora"``, or ``lambda *path: recipe.where("surgery", "lora",
*path)`` for ``file:line`` locations."""


def _at(where: Where, *path: str | int) -> str:
    if callable(where):
        return where(*path)
    out = where
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


# ------------------------------------------------------------------------------------------------------------ spec


def as_spec(spec: LoraSpec | Mapping[str, Any], *, where: Where = "lora") -> LoraSpec:
    """A LoraSpec from a spec or a plain mapping; a bad key or value is one RecipeError line."""
    if isinstance(spec, LoraSpec):
        return spec
    try:
        return LoraSpec.model_validate(dict(spec))
    except ValidationError as err:
        first = err.errors()[0]
        loc = [p for p in first["loc"] if isinstance(p, str | int)]
        raise RecipeError(f"{_at(where, *loc)}: {first['msg']}") from None


# ------------------------------------------------------------------------------------------------------- targets


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why PEFT's LoRA cannot adapt this module faithfully (None when it can).

    PEFT dispatches on ``isinstance``, so it would also wrap timm's ``Conv2dSame`` or ``StdConv2d`` (whose forward
    pads or standardizes the weight: the LoRA branch would see other inputs, and a merge would change the output)
    and grouped convolutions (PEFT cannot merge them). Those are refused here, by name.
    """
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        forward = type(module).forward
        if forward is nn.Linear.forward or type(module).__module__.startswith("timm.layers"):
            return None  # timm.layers.Linear only adds a dtype cast for torchscript
        return f"a {kind} with its own forward (not a plain Linear)"
    if isinstance(module, _CONV):
        if type(module).forward is not next(c for c in _CONV if isinstance(module, c)).forward:
            return f"a {kind}, whose forward is not a plain convolution (padding or weight standardization)"
        if module.groups != 1:
            return f"a grouped {kind} (groups={module.groups}, e.g. depthwise), which PEFT cannot merge"
        if module.padding_mode != "zeros":
            return f"a {kind} with padding_mode={module.padding_mode!r}"
        return None
    if type(module) is nn.Embedding:
        return None
    return f"a {kind}; LoRA adapts Linear, Conv1d/2d/3d (groups=1) and Embedding layers"


def _owners(model: nn.Module, skip: Sequence[str]) -> dict[str, nn.Module]:
    """Modules that hold parameters themselves (the layers a pattern can name), outside ``skip`` (new heads)."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            out[name] = module
    return out


def _match_modules(patterns: Sequence[str], names: Sequence[str], *, where: str) -> list[str]:
    try:
        return match_patterns(patterns, names, where=where)
    except NoMatchingParameterError as err:  # select.py speaks of parameters; here the names are modules
        raise NoMatchingParameterError(str(err).replace("matches no parameter", "matches no module")) from None


def resolve_targets(
    model: nn.Module, spec: LoraSpec | Mapping[str, Any], *, modules_to_save: Sequence[str] = (), where: Where = "lora"
) -> list[str]:
    """The exact module names ``spec.targets`` selects, in model order (see :class:`LoraSpec`)."""
    spec = as_spec(spec, where=where)
    owners = _owners(model, modules_to_save)
    names = list(owners)
    at = _at(where, "targets")
    if isinstance(spec.targets, LayerRange):
        param_names = [n for n, _ in model.named_parameters()]
        layers = layers_from_names(model, param_names)
        chosen = {p for i in select_layers(spec.targets, layers, where=at) for p in layers[i].params}
        picked = [
            n
            for n in names
            if unsupported_reason(owners[n]) is None and f"{n}.weight" in chosen and not _weight_read(model, n)
        ]
        if not picked:
            raise NoMatchingParameterError(f"{at}: the layer range holds no Linear or Conv layer LoRA can adapt")
        return picked
    patterns = [spec.targets] if isinstance(spec.targets, str) else list(spec.targets)
    if not patterns:
        raise RecipeError(f"{at}: empty list of patterns; name the modules to adapt, e.g. 'blocks.*.attn.qkv'")
    picked = _match_modules(patterns, names, where=at)
    for name in picked:
        reason = unsupported_reason(owners[name])
        if reason is not None:
            raise RecipeError(
                f"{at}: module {name!r} is {reason}; narrow the pattern (e.g. add '!{name}') or target the "
                "Linear/Conv layers inside"
            )
    return picked


def _weight_read(model: nn.Module, name: str) -> bool:
    """A ``qkv`` whose attention has ``q_bias`` (BEiT, EVA): the attention reads ``qkv.weight`` and never calls it.

    Known by structure so that a layer range leaves it out in planning too (on the meta device nothing runs); an
    explicit pattern naming it is refused by :func:`inject`'s test forward."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return name.rsplit(".", 1)[-1] == "qkv" and isinstance(getattr(parent, "q_bias", None), nn.Parameter)


def _exact_keys(chosen: Sequence[str], universe: Sequence[str]) -> list[str]:
    """PEFT pattern keys (matched as ``(.*\\.)?KEY$``) that select exactly one name each within ``universe``."""
    out = []
    for name in chosen:
        ambiguous = any(other != name and other.endswith("." + name) for other in universe)
        out.append(("^" if ambiguous else "") + re.escape(name))
    return out


def _patterned(patterns: Mapping[str, float], targets: Sequence[str], *, where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for pattern, value in patterns.items():
        hits = _match_modules([pattern], targets, where=f"{where}[{pattern!r}]")
        for key in _exact_keys(hits, targets):
            out[key] = value
    return out


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_modules_to_save(model: nn.Module, paths: Sequence[str], *, where: str) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for path in paths:
        if path not in names:
            raise AdapterError(f"{where}: the model has no module {path!r}; closest: {_closest(path, names)}")
        # PEFT wraps every module whose name *ends with* a modules_to_save entry (plain string suffix).
        others = [n for n in names if n != path and n.endswith(path)]
        if others:
            raise AdapterError(
                f"{where}: PEFT's modules_to_save matches module names by suffix, and {path!r} would also take "
                f"{others[0]!r}; this model cannot save that head as a PEFT adapter"
            )


def lora_config(
    model: nn.Module,
    spec: LoraSpec | Mapping[str, Any],
    *,
    modules_to_save: Sequence[str] = (),
    where: Where = "lora",
) -> LoraConfig:
    """The ``peft.LoraConfig`` of a spec on this model: targets resolved to exact module names.

    ``modules_to_save`` are module paths that train whole and are saved with the adapter (the new heads).
    """
    from peft import LoraConfig

    spec = as_spec(spec, where=where)
    modules_to_save = list(modules_to_save)
    _check_modules_to_save(model, modules_to_save, where=_at(where))
    targets = resolve_targets(model, spec, modules_to_save=modules_to_save, where=where)
    chosen = set(targets)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    if not any(other.endswith("." + t) for other in others for t in targets):
        target_modules: list[str] | str = list(targets)  # PEFT: `name in list or name.endswith('.' + entry)`
    else:  # a suffix would also take another module: a str is matched with re.fullmatch instead
        target_modules = "(" + "|".join(re.escape(t) for t in targets) + ")"
    alpha = spec.alpha if spec.alpha is not None else float(spec.rank)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=_number(alpha),
        lora_dropout=spec.dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        init_lora_weights=True if spec.init == "default" else spec.init,
        bias=spec.bias,
        rank_pattern={
            k: int(v) for k, v in _patterned(spec.rank_pattern, targets, where=_at(where, "rank_pattern")).items()
        },
        alpha_pattern={
            k: _number(v) for k, v in _patterned(spec.alpha_pattern, targets, where=_at(where, "alpha_pattern")).items()
        },
    )


# ------------------------------------------------------------------------------------------------------- inject


def _sample(model: nn.Module) -> torch.Tensor | None:
    """One input of the size the model was built for (timm's data config; a ViT's ``patch_embed.img_size``)."""
    try:
        from timm.data import resolve_model_data_config

        size = tuple(resolve_model_data_config(model)["input_size"])
    except Exception:  # noqa: BLE001 - not a timm model: no check
        return None
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, tuple | list) and len(img) == 2 and all(isinstance(v, int) for v in img):
        size = (size[0], *img)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "meta":
        return None
    return torch.zeros(1, *size, device=device)


def _uncalled(model: nn.Module, names: Sequence[str], sample: torch.Tensor) -> list[str]:
    """Target modules a forward pass never calls (the model reads their ``.weight`` directly)."""
    called: set[str] = set()
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, _a, n=n: called.add(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    except Exception as err:  # noqa: BLE001 - the check is best effort; the model's own errors are not ours
        log.warning("LoRA: could not run a test forward to check the targets are called (%s)", str(err)[:200])
        return []
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [n for n in names if n not in called]


def inject(
    model: nn.Module,
    spec: LoraSpec | Mapping[str, Any],
    *,
    heads: Sequence[str] = (),
    modules_to_save: Sequence[str] = (),
    adapter_name: str = "default",
    sample: torch.Tensor | None = None,
    where: Where = "lora",
) -> PeftModel:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA on the spec's targets; returns the PeftModel.

    ``heads`` (new heads, already in place) and ``modules_to_save`` (other modules to train whole) become PEFT
    ``modules_to_save``. Every other base weight is frozen. BatchNorm running statistics are not touched here: a
    PEFT adapter does not carry them, so the caller keeps them fixed (the plan's ``norm: auto`` does, since LoRA
    leaves the BatchNorm parameters frozen). A test forward (``sample``, default a zero image of the model's input
    size) checks that the model really calls every target.
    """
    from peft import get_peft_model

    spec = as_spec(spec, where=where)
    saved = list(dict.fromkeys([*heads, *modules_to_save]))
    config = lora_config(model, spec, modules_to_save=saved, where=where)
    targets = resolve_targets(model, spec, modules_to_save=saved, where=where)
    sample = _sample(model) if sample is None else sample
    if sample is not None:
        missed = _uncalled(model, targets, sample)
        if missed:
            raise RecipeError(
                f"{_at(where, 'targets')}: the model never calls module {missed[0]!r} (it reads the weight directly, "
                "as BEiT/EVA attention does for qkv with q_bias), so LoRA on it would do nothing; target other layers "
                f"(e.g. add '!{missed[0]}')"
            )
    try:
        return get_peft_model(model, config, adapter_name=adapter_name)
    except (ValueError, TypeError, RuntimeError) as err:
        raise RecipeError(f"{_at(where)}: PEFT cannot inject LoRA: {str(err).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------ introspection


@dataclass(frozen=True)
class LoraParameter:
    """One parameter an adapter adds or retrains, placed in the base model's layers (for the plan)."""

    name: str  # as ``named_parameters()`` of the PeftModel yields it
    key: str  # as PEFT saves it, without ``base_model.model.``: ``blocks.0.attn.qkv.lora_A.weight``, ``head.weight``
    module: str  # the timm module it adapts or replaces: ``blocks.0.attn.qkv``, ``head``
    kind: Literal["lora", "saved", "bias"]  # LoRA weights, a modules_to_save copy, or a base bias PEFT saves
    adapter: str
    layer: int
    layer_name: str
    numel: int
    trainable: bool


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def timm_name(name: str) -> tuple[str, str, str | None]:
    """PEFT parameter name -> (saved key without prefix, module it belongs to, adapter name or None).

    ``base_model.model.blocks.0.attn.qkv.lora_A.default.weight`` -> (``blocks.0.attn.qkv.lora_A.weight``,
    ``blocks.0.attn.qkv``, ``default``); ``...head.modules_to_save.default.weight`` -> (``head.weight``, ``head``,
    ``default``); ``...qkv.base_layer.weight`` -> (``blocks.0.attn.qkv.weight``, ``blocks.0.attn.qkv``, None).
    """
    parts = name.removeprefix(_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part in _LORA_PARTS and i + 1 < len(parts):
            adapter = parts[i + 1]
            return ".".join([*parts[: i + 1], *parts[i + 2 :]]), ".".join(parts[:i]), adapter
        if part == "modules_to_save" and i + 1 < len(parts):
            return ".".join([*parts[:i], *parts[i + 2 :]]), ".".join(parts[:i]), parts[i + 1]
        if part in ("base_layer", "original_module"):
            rest = [*parts[:i], *parts[i + 1 :]]
            return ".".join(rest), ".".join(parts[:i]), None
    return ".".join(parts), ".".join(parts[:-1]), None


def lora_parameters(model: nn.Module) -> list[LoraParameter]:
    """Every LoRA weight, modules_to_save copy and PEFT-saved bias of a PeftModel, with the base layer it sits in.

    Layers are those of the wrapped timm model (``surgery.layers``), so a plan can show LoRA parameters per layer and
    give them the layer's lr (``layer_decay``, rules).
    """
    if not is_peft(model):
        raise AdapterError(f"lora_parameters: expected a peft.PeftModel, got {type(model).__name__}")
    base = model.get_base_model()
    pairs = [(n, p, *timm_name(n)) for n, p in model.named_parameters()]
    base_names = list(dict.fromkeys(key for n, _, key, _, adapter in pairs if adapter is None or "lora_" not in n))
    layers = layers_from_names(base, base_names)
    where_is = layer_of(layers)
    biases = {a: cfg.bias for a, cfg in model.peft_config.items() if getattr(cfg, "bias", "none") != "none"}
    lora_modules = {module for n, _, _, module, adapter in pairs if adapter is not None and "lora_" in n}
    out: list[LoraParameter] = []
    for name, param, key, module, adapter in pairs:
        if adapter is not None and "lora_" in name:
            kind: Literal["lora", "saved", "bias"] = "lora"
        elif adapter is not None:
            kind = "saved"
        elif key.endswith(".bias") and biases and ("all" in biases.values() or module in lora_modules):
            kind, adapter = "bias", next(iter(biases))
        else:
            continue
        anchor = next(
            (f"{module}.{leaf}" for leaf in ("weight", "bias") if f"{module}.{leaf}" in where_is),
            key if key in where_is else None,
        )
        index = where_is.get(anchor, len(layers) - 1) if anchor else len(layers) - 1
        out.append(
            LoraParameter(
                name=name,
                key=key,
                module=module,
                kind=kind,
                adapter=adapter,
                layer=index,
                layer_name=layers[index].name,
                numel=param.numel(),
                trainable=param.requires_grad,
            )
        )
    return out


PEFT_ATTR = "_surgery_peft"
"""Where :func:`attach` keeps the ``PeftModel`` of a timm model that carries LoRA layers (in ``__dict__``, so it is no
submodule). PEFT injects its layers into the timm model itself; the trainer, the plan and the surgery adapter keep
working on the timm model and its real parameter names, and saving or merging goes through the ``PeftModel``."""


def attach(model: nn.Module, peft_model: PeftModel) -> nn.Module:
    """Remember the ``PeftModel`` wrapping ``model`` (see :data:`PEFT_ATTR`); returns ``model``."""
    model.__dict__[PEFT_ATTR] = peft_model
    return model


def peft_of(model: nn.Module) -> PeftModel | None:
    """The ``PeftModel`` around ``model`` when it carries LoRA layers injected by a plan, else None (no peft import)."""
    return model.__dict__.get(PEFT_ATTR)


def meta_copy(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model`` (every tensor on the meta device), for planning without memory."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def planned_parameters(
    model: nn.Module,
    spec: LoraSpec | Mapping[str, Any],
    *,
    heads: Sequence[str] = (),
    modules_to_save: Sequence[str] = (),
    where: Where = "lora",
) -> list[LoraParameter]:
    """The rows :func:`lora_parameters` would give after :func:`inject`, without touching ``model``.

    PEFT injects into a weightless copy (every tensor on the meta device), so names and shapes are PEFT's own while
    planning costs no memory. The test forward of :func:`inject` is skipped (nothing to compute on the meta device).
    """
    shadow = meta_copy(model)
    return lora_parameters(inject(shadow, spec, heads=heads, modules_to_save=modules_to_save, where=where))


# ---------------------------------------------------------------------------------------------------------- save


def _check_carried(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's state dict of ``adapter``; every trainable parameter must be in it (else training would be lost)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    carried = {t.data_ptr() for t in state.values()}
    for name, param in model.named_parameters():
        if param.requires_grad and param.data_ptr() not in carried:
            raise AdapterError(
                f"save_peft: parameter {timm_name(name)[0]!r} trains but a PEFT adapter cannot carry it (PEFT saves "
                "LoRA weights, modules_to_save and biases per `bias`); freeze it or train its module whole "
                "(modules_to_save)"
            )
    return state


def save_peft(model: nn.Module, folder: str | os.PathLike, base_name: str, *, adapter: str | None = None) -> Path:
    """Write PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` (and PEFT's README.md card) to folder.

    Written by ``PeftModel.save_pretrained`` itself, so ``PeftModel.from_pretrained(timm.create_model(base_name,
    num_classes=N), folder)`` loads it. ``base_name`` (a timm name or ``hf-hub:org/name``) fills
    ``base_model_name_or_path``. Only ``adapter`` (default: the active one) is written, at the top of ``folder``.
    """
    if not is_peft(model):
        raise AdapterError(f"save_peft: expected a peft.PeftModel (surgery.lora.inject), got {type(model).__name__}")
    name = adapter or model.active_adapter
    if name not in model.peft_config:
        raise AdapterError(f"save_peft: no adapter {name!r}; the model has {', '.join(model.peft_config)}")
    _check_carried(model, name)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[name]
    previous = config.base_model_name_or_path
    config.base_model_name_or_path = base_name
    with tempfile.TemporaryDirectory(dir=out, prefix=".peft-") as tmp:
        try:
            # save_embedding_layers=False: "auto" would look the base up on the hub to see if its vocabulary changed.
            model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
        finally:
            config.base_model_name_or_path = previous
        src = Path(tmp) / name if name != "default" else Path(tmp)  # PEFT nests non-default adapters
        if (out / "README.md").exists() and (src / "README.md").exists():
            (src / "README.md").unlink()  # keep the caller's card (surgery.adapter.card declares library_name: peft)
        for item in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
            if (src / item).exists():
                os.replace(src / item, out / item)
    return out


# ---------------------------------------------------------------------------------------------------------- load

# adapter_config.json keys this loader accepts and the values it allows. Anything else must be absent or empty:
# PEFT reads some keys as module names to import (megatron_core with megatron_config, auto_mapping for AutoPeftModel),
# as files (corda_config.cache_file) or as data-driven inits that rewrite the base weights (pissa, loftq, eva, corda).
_EMPTY = (None, False, {}, [], "")
_IGNORED = {
    "peft_version",
    "revision",
    "base_model_name_or_path",
    "inference_mode",
    "megatron_core",
    "auto_mapping",
    "qalora_group_size",
    "loftq_config",
    "ensure_weight_tying",
    "task_type",
}
_IGNORED_TYPES: dict[str, tuple[type, ...]] = {
    "peft_version": (str,),
    "revision": (str,),
    "base_model_name_or_path": (str,),
    "megatron_core": (str,),
    "inference_mode": (bool,),
    "ensure_weight_tying": (bool,),
    "qalora_group_size": (int,),
}
_MAX_PATTERN = 2000
# Patterns from an untrusted adapter_config.json are matched by PEFT with re.fullmatch against every module name. Only
# literal names are accepted (escaped characters, an optional ^/$ anchor, one group of |-alternatives: what save_peft
# writes): no quantifier, class or nested group, so matching is linear and a hostile pattern cannot hang the loader.
_LITERAL = r"(?:[\w.-]|\\[^\w\s])+"
_SAFE_PATTERN = re.compile(rf"\^?(?:{_LITERAL}|\({_LITERAL}(?:\|{_LITERAL})*\))\$?")


def _fail(where: str, key: str, what: str) -> AdapterError:
    return AdapterError(f"{where}: {key} {what}")


def _check_pattern(value: Any, *, where: str, key: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_PATTERN:
        raise _fail(where, key, f"must be a module name or pattern of at most {_MAX_PATTERN} characters")
    if not _SAFE_PATTERN.fullmatch(value):
        raise _fail(
            where,
            key,
            f"{value[:60]!r} is not a module name (regular expressions other than literal names are refused)",
        )
    try:
        re.compile(value)
    except re.error:
        raise _fail(where, key, f"{value[:60]!r} is not a valid regular expression") from None
    return value


def _strings(value: Any, *, where: str, key: str, allow_str: bool = True) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str) and allow_str:
        return _check_pattern(value, where=where, key=key)
    if isinstance(value, list) and len(value) <= 100_000:
        return [_check_pattern(v, where=where, key=f"{key}[{i}]") for i, v in enumerate(value)]
    raise _fail(where, key, "must be a list of module names" + (" or one pattern" if allow_str else ""))


def _pattern_map(value: Any, *, where: str, key: str, integer: bool) -> dict[str, Any]:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise _fail(where, key, "must be a mapping of module pattern -> number")
    out = {}
    for k, v in value.items():
        _check_pattern(k, where=where, key=f"{key}[{k[:40]!r}]")
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or v <= 0:
            raise _fail(where, f"{key}[{k[:40]!r}]", "must be a positive " + ("integer" if integer else "number"))
        out[k] = v
    return out


def _urls(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if "://" in value:
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _urls(k)
            yield from _urls(v)
    elif isinstance(value, list):
        for v in value:
            yield from _urls(v)


def check_peft_config(data: Any, *, where: str) -> LoraConfig:
    """A ``peft.LoraConfig`` from the parsed ``adapter_config.json`` of an untrusted folder, checked key by key."""
    from peft import LoraConfig

    if not isinstance(data, dict):
        raise AdapterError(f"{where}: not a JSON object")
    for url in _urls(data):
        raise AdapterError(f"{where}: names a URL ({url[:80]!r}); an adapter config never needs one; refused")
    if data.get("peft_type") != "LORA":
        raise _fail(where, "peft_type", f'is {data.get("peft_type")!r}; only LoRA adapters ("LORA") load here')
    mapping = data.get("auto_mapping")
    if mapping not in (None, {}) and not (
        isinstance(mapping, dict)
        and set(mapping) <= {"base_model_class", "parent_library"}
        and all(isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*", v) for v in mapping.values())
        and str(mapping.get("parent_library", "timm")).startswith("timm")
    ):
        raise _fail(where, "auto_mapping", "must name a timm class (it is never imported here)")
    if data.get("megatron_config") not in _EMPTY:
        raise _fail(where, "megatron_config", "is set: it makes PEFT import `megatron_core`; refused")
    if data.get("task_type") not in (None, ""):
        raise _fail(where, "task_type", f"is {data.get('task_type')!r}; a timm adapter has none")
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise _fail(where, "init_lora_weights", f"is {init!r}; only true, false and 'gaussian' load here")
    bias = data.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise _fail(where, "bias", f"is {bias!r}; use none, all or lora_only")
    r = data.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 65536:
        raise _fail(where, "r", "must be an integer rank between 1 and 65536")
    alpha = data.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise _fail(where, "lora_alpha", "must be a positive number")
    dropout = data.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise _fail(where, "lora_dropout", "must be a number in [0, 1)")
    flags = {}
    for key in ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise _fail(where, key, "must be true or false")
        flags[key] = value
    if flags["fan_in_fan_out"]:
        raise _fail(where, "fan_in_fan_out", "is for GPT-2's Conv1D layers, which timm models do not have")
    targets = _strings(data.get("target_modules"), where=where, key="target_modules")
    if not targets:
        raise _fail(where, "target_modules", "is empty; a LoRA adapter names the modules it adapts")
    known = {
        "peft_type",
        "init_lora_weights",
        "bias",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        *flags,
    }
    for key, value in data.items():
        if key not in known and key not in _IGNORED and value not in _EMPTY:
            raise _fail(where, key, f"is set ({str(value)[:60]}); this loader does not support it, refused")
    for key, kinds in _IGNORED_TYPES.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, str) and len(value) > 1000)):
            raise _fail(where, key, f"must be {' or '.join(k.__name__ for k in kinds)}")
    loftq = data.get("loftq_config")
    if loftq not in _EMPTY:
        raise _fail(where, "loftq_config", "is set; LoftQ adapters are not supported")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        exclude_modules=_strings(data.get("exclude_modules"), where=where, key="exclude_modules"),
        modules_to_save=_strings(data.get("modules_to_save"), where=where, key="modules_to_save", allow_str=False),
        rank_pattern=_pattern_map(data.get("rank_pattern"), where=where, key="rank_pattern", integer=True),
        alpha_pattern=_pattern_map(data.get("alpha_pattern"), where=where, key="alpha_pattern", integer=False),
        init_lora_weights=True,  # the weights are loaded over it; never a data-driven init
        bias=bias,
        use_dora=flags["use_dora"],
        use_rslora=flags["use_rslora"],
        lora_bias=flags["lora_bias"],
    )


def read_peft_config(folder: str | os.PathLike) -> LoraConfig:
    """The checked ``LoraConfig`` of an adapter folder (see :func:`check_peft_config`)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_NAME}; not a PEFT adapter folder")
    if path.stat().st_size > 1 << 20:
        raise AdapterError(f"{path}: larger than 1 MiB; not an adapter config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise AdapterError(f"{path}: not valid JSON ({str(err)[:100]})") from None
    return check_peft_config(data, where=str(path))


def read_peft_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` of a folder; a pickle ``adapter_model.bin`` is refused, never opened."""
    from surgery.models import check_safetensors_header

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(folder) / PICKLE_NAME).exists():
            raise AdapterError(
                f"{folder}: holds only {PICKLE_NAME}, a pickle (loading it can run code); refused. Re-save the "
                "adapter with safe_serialization=True (PEFT's default) to get adapter_model.safetensors"
            )
        raise AdapterError(f"{folder}: no {WEIGHTS_NAME}")
    try:
        check_safetensors_header(path, where=str(path))
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except ModelError as err:
        raise AdapterError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise AdapterError(f"{path}: not a readable safetensors file ({str(err)[:120]})") from None
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise AdapterError(f"{path}: tensor {bad[0]!r} is not floating point; not LoRA weights")
    return tensors


def _check_fit(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], *, where: str) -> None:
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing:
        raise AdapterError(f"{where}: has no tensor {missing[0]!r} that its config needs ({len(missing)} missing)")
    if extra:
        raise AdapterError(f"{where}: tensor {extra[0]!r} belongs to no module its config adapts on this base")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            hint = (
                "; build the base with the adapter's class count (timm.create_model(NAME, num_classes=N))"
                if "lora_" not in key
                else "; is this the adapter's base model?"
            )
            raise AdapterError(
                f"{where}: tensor {key!r} is {list(got.shape)} but the base needs {list(want.shape)}{hint}"
            )


def _add(peft_model: PeftModel, folder: Path, name: str, *, trainable: bool, fit_heads: bool = False) -> None:
    """Load one checked adapter folder into an existing PeftModel under ``name``."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = read_peft_config(folder)
    tensors = read_peft_weights(folder)
    config.inference_mode = not trainable
    try:
        peft_model.add_adapter(name, config)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise AdapterError(f"{folder}: does not fit this base: {str(err).splitlines()[0]}") from None
    if fit_heads:
        _fit_heads(peft_model, name, tensors)
    expected = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    _check_fit(expected, tensors, where=str(folder / WEIGHTS_NAME))
    set_peft_model_state_dict(peft_model, tensors, adapter_name=name)
    if not trainable:
        for param_name, param in peft_model.named_parameters():
            if timm_name(param_name)[2] == name:
                param.requires_grad_(False)


def _fit_heads(peft_model: PeftModel, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give this adapter's copy of a Linear head the adapter's class count (several tasks on one base)."""
    from peft.utils import ModulesToSaveWrapper

    for path, module in peft_model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or name not in module.modules_to_save:
            continue
        head = module.modules_to_save[name]
        weight = tensors.get(f"{path}.weight".replace(".modules_to_save." + name, ""))
        if (
            isinstance(head, nn.Linear)
            and weight is not None
            and weight.ndim == 2
            and weight.shape[1] == head.in_features
        ):
            if weight.shape[0] != head.out_features:
                new = nn.Linear(head.in_features, weight.shape[0], bias=head.bias is not None)
                module.modules_to_save[name] = new.to(head.weight.device, head.weight.dtype)


def load_peft(
    base_model: nn.Module,
    folder: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    *,
    adapter_name: str = "default",
    trainable: bool = False,
) -> PeftModel | MultiAdapterModel:
    """Load a PEFT LoRA adapter folder onto ``base_model`` (modified in place); returns the ``PeftModel``.

    Reads folders this module or PEFT itself wrote for a timm model. The folder is untrusted: its config is checked
    (:func:`check_peft_config`), its weights come from ``adapter_model.safetensors`` only and must fit the base
    exactly. Several folders (a list, or a mapping name -> folder) give a :class:`MultiAdapterModel`.
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if not isinstance(folder, str | os.PathLike):
        return MultiAdapterModel(base_model, folder, trainable=trainable)
    if is_peft(base_model):
        raise AdapterError("load_peft: the base already carries PEFT adapters; pass the plain timm model")
    path = Path(folder)
    config = read_peft_config(path)
    tensors = read_peft_weights(path)
    config.inference_mode = not trainable
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Tt]arget module.*")
            model = get_peft_model(base_model, config, adapter_name=adapter_name)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise AdapterError(f"{path}: does not fit this base: {str(err).splitlines()[0]}") from None
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    _check_fit(expected, tensors, where=str(path / WEIGHTS_NAME))
    set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    if not trainable:
        model.eval()
    return model


# --------------------------------------------------------------------------------------------------------- merge


def merge(model: nn.Module) -> nn.Module:
    """Fold the active LoRA adapter into the weights (PEFT's ``merge_and_unload``); returns the plain timm model.

    New heads (modules_to_save) become ordinary modules of the model. Outputs equal the adapted model's within
    float32 rounding (the tests check 1e-4 relative to the output scale).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(model, MultiAdapterModel):
        model = model.peft_model
    if not is_peft(model):
        raise AdapterError(f"merge: expected a peft.PeftModel, got {type(model).__name__}")
    try:
        plain = model.merge_and_unload()
    except (ValueError, NotImplementedError, RuntimeError) as err:
        raise AdapterError(f"merge: PEFT cannot merge this adapter: {str(err).splitlines()[0]}") from None
    plain.__dict__.pop(PEFT_ATTR, None)  # the timm model no longer carries LoRA layers (see attach)
    left = [n for n, m in plain.named_modules() if isinstance(m, BaseTunerLayer | ModulesToSaveWrapper)]
    if left:
        raise AdapterError(f"merge: module {left[0]!r} is still a PEFT layer after merging")
    return plain


# --------------------------------------------------------------------------------------------------- multi-adapter


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name in "lora_" or name.startswith("lora_"):
        # PEFT finds an adapter's keys by name inside parameter names: a name within "lora_" ("a", "or") confuses it.
        raise AdapterError(
            f"adapter name {name!r}: use letters, digits, '_' or '-', not part of 'lora_' (e.g. the task's name)"
        )


class MultiAdapterModel(nn.Module):
    """Several LoRA adapters over one base, switched by name without reloading the base (PEFT's ``load_adapter`` /
    ``set_adapter``). Adapters may have heads of different class counts (each keeps its own head copy)."""

    def __init__(
        self,
        base_model: nn.Module,
        adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
        *,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        named = dict(adapters) if isinstance(adapters, Mapping) else {Path(a).name: a for a in adapters}
        if not named:
            raise AdapterError("MultiAdapterModel: no adapter folders given")
        if len(named) != len(adapters):
            raise AdapterError("MultiAdapterModel: two adapter folders share a name; pass a mapping name -> folder")
        for name in named:
            _check_name(name)
        items = list(named.items())
        first, first_path = items[0]
        self.peft_model = load_peft(base_model, first_path, adapter_name=first, trainable=trainable)
        for name, path in items[1:]:
            _add(self.peft_model, Path(path), name, trainable=trainable, fit_heads=True)
        self.trainable = trainable
        self.peft_model.set_adapter(first, inference_mode=not trainable)
        if not trainable:
            self.eval()

    @property
    def names(self) -> list[str]:
        """The loaded adapters' names, in loading order."""
        return list(self.peft_model.peft_config)

    @property
    def active(self) -> str:
        """The adapter the forward uses."""
        return self.peft_model.active_adapter

    def use(self, name: str) -> MultiAdapterModel:
        """Switch to adapter ``name`` (LoRA weights and head); the base stays as it is."""
        if name not in self.peft_model.peft_config:
            raise AdapterError(f"no adapter {name!r}; loaded: {', '.join(self.names)}")
        self.peft_model.set_adapter(name, inference_mode=not self.trainable)
        return self

    def add(self, name: str, folder: str | os.PathLike, *, trainable: bool = False) -> MultiAdapterModel:
        """Load one more adapter folder under ``name``."""
        _check_name(name)
        if name in self.peft_model.peft_config:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        _add(self.peft_model, Path(folder), name, trainable=trainable, fit_heads=True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peft_model(x)

    def predict_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each adapter's output for the same batch, restoring the active adapter afterwards."""
        current = self.active
        try:
            out = {}
            for name in self.names:
                self.peft_model.set_adapter(name, inference_mode=not self.trainable)
                out[name] = self.peft_model(x)
            return out
        finally:
            self.peft_model.set_adapter(current, inference_mode=not self.trainable)


__all__ = [
    "PEFT_ATTR",
    "attach",
    "meta_copy",
    "peft_of",
    "LoraParameter",
    "LoraSpec",
    "MultiAdapterModel",
    "check_peft_config",
    "inject",
    "is_peft",
    "load_peft",
    "lora_config",
    "lora_parameters",
    "merge",
    "planned_parameters",
    "read_peft_config",
    "resolve_targets",
    "save_peft",
    "timm_name",
    "unsupported_reason",
]
