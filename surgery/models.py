"""Building the model a recipe names: timm names and ``hf-hub:``/``local-dir:`` references through
``timm.create_model``, ``torchvision:NAME`` through torchvision, then an optional safetensors checkpoint.

``meta=True`` builds on the meta device: shapes and names only, no memory, no weights loaded. ``surgery plan`` uses
it so that planning a 1B-parameter model costs what planning a small one does.

Recipes and adapters come from other people, so ``model.kwargs`` (and an adapter's ``base.kwargs``) are untrusted:
``timm.create_model`` also takes ``pretrained_cfg_overlay`` (a download URL), ``cache_dir`` (where to write it),
``checkpoint_path`` (a pickle to load) and feature-extraction options. :func:`check_kwargs` lets through only
arguments of the model's own constructor that carry plain data, before anything is built. Every failure while
building is a :class:`~surgery.errors.ModelError` with one line.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import os
import socket
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from surgery.errors import ModelError, SurgeryError
from surgery.recipe import ModelSpec

TORCHVISION = "torchvision:"
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"

# Parts of an argument name that say it names a file, URL, directory, download or pretrained config, or that it
# drives timm's feature-extraction wrapper: never architecture, so never taken from a recipe or an adapter.
_BLOCKED_SUBSTRINGS = (
    "path",
    "url",
    "file",
    "directory",
    "cfg",
    "config",
    "cache",
    "checkpoint",
    "pretrained",
    "feature",
    "weights",
    "download",
)
_BLOCKED_PARTS = {"dir", "dirs", "uri", "hub"}
_BLOCKED_NAMES = {
    "out_indices",  # feature extraction (features_only wrapper)
    "flatten_sequential",
    "no_rewrite",
    "pruned",  # timm's builder: reads a pruning table file
    "kwargs_filter",
    "variant",
    "model_cls",
    "device",  # placement, not architecture: the trainer places the model
    "dtype",
    "progress",  # torchvision's download progress bar
}
# Architecture arguments of timm models whose names contain a word above but that hold numbers only (values are
# still checked to be plain data).
_SAFE_NAMES = {
    "drop_path_rate",
    "drop_path_rates",
    "drop_path",
    "num_features",
    "in_features",
    "hidden_features",
    "out_features",
    "num_init_features",
    "num_input_features",
    "num_output_features",
    "pretrained_window_size",
    "pretrained_window_sizes",
    "block_config",
}
# timm.create_model's own layer-config switches: plain booleans, safe.
_CREATE_OPTIONS = {"scriptable", "exportable", "no_jit"}
_MAX_STR = 256
_MAX_ITEMS = 64
# safetensors refuses headers over 100 MB itself; we check first so the error is ours and names the file.
_MAX_HEADER = 100 * 1024 * 1024
_PROBE_TIMEOUT = 3.0


def build_model(
    spec: ModelSpec,
    *,
    meta: bool = False,
    where: str = "model",
) -> nn.Module:
    """Build the model of a recipe's ``model:`` section (see module docstring).

    ``kwargs`` are checked against the model's constructor first (:func:`check_kwargs`); ``pretrained: true``
    fails at once, naming ``model.pretrained``, when the weights are neither cached nor reachable.
    """
    pretrained = spec.pretrained and not meta
    if spec.pretrained and spec.name.startswith(TORCHVISION):  # fail at plan time, not after the plan was trusted
        raise ModelError(
            f"{where}.pretrained: torchvision weights cannot be downloaded here; set pretrained: false and give "
            "model.checkpoint (a .safetensors file)"
        )
    try:
        _check_name(spec.name, where=where)
        _check_keys(spec.kwargs, where=f"{where}.kwargs")  # hostile names first: nothing is fetched or built for them
        remote = spec.name.startswith(HF_HUB)  # checking an hf-hub: model's kwargs reads its config.json
        if pretrained and remote:
            check_pretrained_reachable(spec.name, where=f"{where}.pretrained")
        kwargs = check_kwargs(spec.name, spec.kwargs, where=f"{where}.kwargs")
        if pretrained and not remote:
            check_pretrained_reachable(spec.name, where=f"{where}.pretrained")
        if meta:
            with torch.device("meta"):
                model = _create(spec.name, pretrained=False, kwargs=kwargs)
        else:
            model = _create(spec.name, pretrained=pretrained, kwargs=kwargs)
    except SurgeryError:
        raise
    except TypeError as err:
        raise ModelError(f"{where}.kwargs: {spec.name!r} does not accept these arguments: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - timm, torch, huggingface_hub and safetensors raise many types
        hint = ""
        if pretrained:
            hint = "; set pretrained: false and give model.checkpoint, or an hf-hub: reference on your own hub"
        key = f"{where}.kwargs" if spec.kwargs else f"{where}.name"
        with_kwargs = f" with kwargs {', '.join(map(str, spec.kwargs))}" if spec.kwargs else ""
        raise ModelError(f"{key}: cannot build {spec.name!r}{with_kwargs}: {_first_line(err)}{hint}") from None
    if spec.checkpoint and not meta:
        # a loaded recipe's paths are absolute (surgery.paths); a ModelSpec made in Python is relative to the cwd
        load_checkpoint(model, Path(spec.checkpoint), where=f"{where}.checkpoint")
    return model


MAX_ADAPTER_CHAIN = 8
"""How many adapters deep ``model.adapter`` may chain (an adapter continued from an adapter...): a loop or a hostile
chain stops here."""


def build_recipe_model(spec: ModelSpec, *, meta: bool = False, where: str = "model", depth: int = 0) -> nn.Module:
    """The model of a recipe's ``model:`` section: :func:`build_model` for ``name``; for ``adapter`` (continue
    training), the adapter loaded onto the base it records by :func:`surgery.adapter.load` (fingerprint checked, heads,
    LoRA layers and data config included), with ``checkpoint`` as the base's local checkpoint.

    An adapter is always loaded for real, also when ``meta`` is asked (``surgery plan``): only its weights say what it
    is. ``depth`` counts adapters continued from adapters (:data:`MAX_ADAPTER_CHAIN`).
    """
    if spec.adapter is None:
        return build_model(spec, meta=meta, where=where)
    if depth >= MAX_ADAPTER_CHAIN:
        raise ModelError(
            f"{where}.adapter: adapters continued from adapters {MAX_ADAPTER_CHAIN} deep; merge one (surgery merge) "
            "and train from the merged model"
        )
    from surgery.adapter.load import load_chained

    return load_chained(spec.adapter, checkpoint=spec.checkpoint, depth=depth + 1, where=f"{where}.adapter")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _check_name(name: str, *, where: str) -> None:
    if name.startswith(TORCHVISION):
        import torchvision

        arch = name[len(TORCHVISION) :]
        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            close = difflib.get_close_matches(arch, available, n=3)
            raise ModelError(f"{where}.name: torchvision has no model {arch!r}; closest: {', '.join(close) or '-'}")
        return
    if name.startswith(LOCAL_DIR):
        _local_dir_config(name, where=f"{where}.name")
        return
    if name.startswith(HF_HUB):
        return
    if ":" in name or "/" in name or "\\" in name:
        raise ModelError(
            f"{where}.name: {name!r} is not a timm model name; write hf-hub:ORG/NAME for a hub repo or "
            "local-dir:/path for a folder with config.json"
        )
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*name*')` lists them"
        raise ModelError(f"{where}.name: timm has no model {name!r}{hint}")


def _create(name: str, *, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    if name.startswith(TORCHVISION):
        import torchvision

        return torchvision.models.get_model(name[len(TORCHVISION) :], weights=None, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# kwargs: architecture arguments only


def blocked_reason(key: str) -> str | None:
    """Why an argument name is never taken from a recipe or adapter (None: it may be, if the model takes it)."""
    low = key.lower()
    if low in _SAFE_NAMES:
        return None
    if low in _BLOCKED_NAMES or any(s in low for s in _BLOCKED_SUBSTRINGS) or set(low.split("_")) & _BLOCKED_PARTS:
        return "it names a file, URL, directory, download, pretrained config or feature-extraction option"
    return None


@functools.lru_cache(maxsize=64)
def _timm_class(arch: str) -> type[nn.Module]:
    """The class timm's entrypoint for ``arch`` builds (found by building it on the meta device: no memory)."""
    with torch.device("meta"):
        return type(timm.create_model(arch, pretrained=False))


@functools.lru_cache(maxsize=64)
def _torchvision_params(arch: str) -> dict[str, inspect.Parameter]:
    import torchvision

    builder = torchvision.models.get_model_builder(arch)
    params = {
        k: p
        for k, p in inspect.signature(builder).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k != "weights"
    }
    with torch.device("meta"):
        cls = type(builder(weights=None))
    return {**params, **_init_params(cls)}


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    """Named ``__init__`` parameters of ``cls``, following base classes while ``**kwargs`` passes through to them."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "__init__" not in vars(klass):
            continue
        try:
            sig = inspect.signature(klass.__init__)
        except (TypeError, ValueError):
            break
        for key, param in list(sig.parameters.items())[1:]:  # skip self
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                out.setdefault(key, param)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return out


def _local_dir_config(name: str, *, where: str = "model.name") -> tuple[str, dict[str, Any]]:
    """Architecture and saved ``model_args`` of a ``local-dir:`` folder (what timm will read)."""
    folder = Path(name[len(LOCAL_DIR) :])
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{where}: {name}: cannot read {path}: {_first_line(err)}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{where}: {path} is not a timm config (a JSON object with 'architecture')")
    arch = cfg.get("architecture") or (cfg.get("pretrained_cfg") or {}).get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ModelError(f"{where}: {path}: 'architecture' {arch!r} is not a timm model")
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ModelError(f"{where}: {path}: 'model_args' must be an object")
    return arch, model_args


def _hf_hub_config(name: str, *, where: str = "model.name") -> tuple[str, dict[str, Any]]:
    """Architecture and saved ``model_args`` of an ``hf-hub:`` repo's config.json, read with timm's own reader (the
    download is cached, so timm's build right after reads the same file)."""
    try:
        _cfg, arch, model_args = timm.models.load_model_config_from_hf(name[len(HF_HUB) :])
    except Exception as err:  # noqa: BLE001 - huggingface_hub and json raise many types
        raise ModelError(f"{where}: cannot read the config.json of {name}: {_first_line(err)}") from None
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ModelError(f"{where}: {name}: config.json 'architecture' {arch!r} is not a timm model")
    if not isinstance(model_args, dict):
        raise ModelError(f"{where}: {name}: config.json 'model_args' must be an object")
    return arch, model_args


def model_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments a recipe may set for model ``name`` (before the name-based block list)."""
    if name.startswith(TORCHVISION):
        return _torchvision_params(name[len(TORCHVISION) :])
    if name.startswith(LOCAL_DIR):
        arch = _local_dir_config(name)[0]
        return _init_params(_timm_class(arch))
    if name.startswith(HF_HUB):
        return _init_params(_timm_class(_hf_hub_config(name)[0]))
    return _init_params(_timm_class(timm.models.split_model_name_tag(name)[0]))


def _check_keys(kwargs: Any, *, where: str) -> None:
    """The name-based refusals, which need no model: run before anything is fetched or built."""
    if not isinstance(kwargs, Mapping):
        raise ModelError(f"{where}: must be a mapping of argument names to values, got {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ModelError(f"{where}: {key!r} is not an argument name")
        reason = blocked_reason(key)
        if reason:
            raise ModelError(
                f"{where}.{key}: refused, {reason}; kwargs may only hold architecture arguments (e.g. drop_rate, "
                "num_classes, in_chans); give weights as model.checkpoint (.safetensors) or an hf-hub: name"
            )


def check_kwargs(name: str, kwargs: Mapping[str, Any], *, where: str = "model.kwargs") -> dict[str, Any]:
    """Return ``kwargs`` if every key is an architecture argument of model ``name`` holding plain data, else raise.

    A key is refused when it names a file, URL, directory, download, pretrained config or feature-extraction option
    (whatever the model takes), or when the model's constructor does not take it. Values must be JSON data: scalars,
    lists of scalars, and small flat dicts only where the constructor documents a dict. timm resolves string layer
    arguments (``act_layer: gelu``, ``norm_layer: layernorm2d``) from its own registries only (``get_act_layer``,
    ``get_norm_layer``), so such strings cannot import or run anything. The ``model_args`` saved in a ``local-dir:``
    folder's or ``hf-hub:`` repo's config.json (timm passes them to the constructor too) are held to the same rule.
    """
    _check_keys(kwargs, where=where)
    if not kwargs and not name.startswith((LOCAL_DIR, HF_HUB)):
        return {}
    extra: dict[str, Any] = {}
    if name.startswith(LOCAL_DIR):
        extra = _local_dir_config(name)[1]
    elif name.startswith(HF_HUB):
        extra = _hf_hub_config(name, where=where)[1]
    try:
        params = model_parameters(name)
    except SurgeryError:
        raise
    except Exception as err:  # noqa: BLE001 - the model cannot even be built without kwargs
        raise ModelError(f"{where}: cannot inspect {name!r} to check its arguments: {_first_line(err)}") from None
    for key, value in [*kwargs.items(), *((f"model_args.{k}", v) for k, v in extra.items())]:
        arg = key.removeprefix("model_args.")
        label = f"{where}.{key}" if not key.startswith("model_args.") else f"{name} config.json {key}"
        reason = blocked_reason(arg)
        if reason:
            raise ModelError(f"{label}: refused, {reason}")
        if arg in _CREATE_OPTIONS:
            if not isinstance(value, bool):
                raise ModelError(f"{label}: must be true or false, got {value!r}")
            continue
        if arg not in params:
            close = difflib.get_close_matches(arg, [k for k in params if not blocked_reason(k)], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(
                f"{where if arg == key else label}: {name!r} does not accept these arguments: {arg!r} is not among "
                f"its constructor's arguments{hint}"
            )
        problem = _value_problem(value, allow_dict=_takes_dict(arg, params[arg]))
        if problem:
            raise ModelError(f"{label}: refused value {_short(value)}: {problem}")
    return dict(kwargs)


def _takes_dict(key: str, param: inspect.Parameter) -> bool:
    annotation = param.annotation if isinstance(param.annotation, str) else repr(param.annotation)
    return key.endswith(("_kwargs", "_args")) or any(t in annotation for t in ("Dict", "dict", "Mapping"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_problem(value: Any, *, allow_dict: bool, depth: int = 0) -> str | None:
    """Why ``value`` is not plain data for a constructor argument (None when it is)."""
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "not a finite number"
    if isinstance(value, str):
        if len(value) > _MAX_STR:
            return f"strings are limited to {_MAX_STR} characters"
        if "://" in value or "/" in value or "\\" in value or value.startswith("~"):
            return "a path or URL is not an architecture value"
        return None
    if isinstance(value, list | tuple):
        if depth >= 2:
            return "lists nest at most two deep"
        if len(value) > _MAX_ITEMS:
            return f"lists are limited to {_MAX_ITEMS} items"
        for item in value:
            problem = _value_problem(item, allow_dict=False, depth=depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, Mapping):
        if not allow_dict or depth:
            return "this argument does not take a mapping"
        if len(value) > _MAX_ITEMS:
            return f"mappings are limited to {_MAX_ITEMS} keys"
        for k, v in value.items():
            if not isinstance(k, str) or blocked_reason(k):
                return f"key {k!r} is not allowed"
            problem = _value_problem(v, allow_dict=False, depth=depth + 1)
            if problem:
                return problem
        return None
    return f"{type(value).__name__} is not JSON data (only numbers, strings, booleans, lists)"


# ---------------------------------------------------------------------------------------------------------------
# pretrained: fail in seconds when the weights cannot come


def check_pretrained_reachable(name: str, *, where: str = "model.pretrained") -> None:
    """Raise at once when ``pretrained: true`` weights are neither cached nor downloadable from here.

    Without this, timm's download through huggingface_hub retries for close to a minute without network.
    """
    from huggingface_hub import constants

    fix = (
        "set pretrained: false and give model.checkpoint (a .safetensors file), or use an hf-hub: reference on "
        "your own hub (HF_ENDPOINT)"
    )
    if name.startswith(LOCAL_DIR):
        return
    offline = bool(constants.HF_HUB_OFFLINE)
    if name.startswith(HF_HUB):
        repo = name[len(HF_HUB) :].split("@")[0]
        if _hf_cached(repo, ["config.json"]) and offline:
            return
        if offline:
            raise ModelError(f"{where}: {name} is not in the local cache and HF_HUB_OFFLINE is set; {fix}")
        _require_reachable(constants.ENDPOINT, what=name, where=where, fix=fix)
        return
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(f"{where}: timm has no pretrained weights for {name!r}; {fix}")
    if cfg.file:
        return
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if _hf_cached(repo, files):
            return
        if offline:
            raise ModelError(
                f"{where}: weights of {name} ({cfg.hf_hub_id}) are not cached and HF_HUB_OFFLINE is set; {fix}"
            )
        _require_reachable(constants.ENDPOINT, what=f"weights of {name}", where=where, fix=fix)
        return
    url = str(cfg.url)
    if (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file():
        return
    if offline:
        raise ModelError(f"{where}: weights of {name} ({url}) are not cached and HF_HUB_OFFLINE is set; {fix}")
    _require_reachable(url, what=f"weights of {name}", where=where, fix=fix)


def _hf_cached(repo: str, files: list[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        try:
            found = try_to_load_from_cache(repo, filename)
        except Exception:  # noqa: BLE001 - a malformed repo id is simply "not cached"
            return False
        if isinstance(found, str):
            return True
    return False


def _require_reachable(url: str, *, what: str, where: str, fix: str) -> None:
    """One TCP connect with a short timeout (DNS included) to the host of ``url``; no request is sent."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        raise ModelError(f"{where}: {what}: cannot download from {url!r}; {fix}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    error: list[BaseException] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT).close()
        except OSError as err:
            error.append(err)

    thread = threading.Thread(target=connect, daemon=True)  # a thread bounds DNS resolution too
    thread.start()
    thread.join(_PROBE_TIMEOUT + 0.5)
    if thread.is_alive() or error:
        why = _first_line(error[0]) if error else "timed out"
        raise ModelError(
            f"{where}: {what} cannot be downloaded: {parsed.scheme}://{host}:{port} unreachable ({why}); {fix}"
        )


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def check_safetensors_header(path: Path, *, where: str) -> None:
    """Refuse a file whose safetensors header is absurdly large or not a JSON object, before safetensors reads it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelError(f"{where}: {path} is not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or length + 8 > size:
                raise ModelError(
                    f"{where}: {path} is not a readable safetensors file "
                    f"(header claims {length} bytes, file has {size})"
                )
            header = json.loads(fh.read(length))
    except OSError as err:
        raise ModelError(f"{where}: cannot read {path}: {_first_line(err)}") from None
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"{where}: {path} is not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{where}: {path} is not a readable safetensors file (its header is not a JSON object)")


def read_safetensors(path: Path, *, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file as a state dict on the CPU; every failure is a ModelError naming the file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{where}: no file {path}")
    check_safetensors_header(path, where=where)
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise ModelError(f"{where}: {path} is not a readable safetensors file ({_first_line(err)})") from None


def load_checkpoint(model: nn.Module, path: Path, *, where: str = "checkpoint") -> None:
    """Load a ``.safetensors`` state dict strictly; anything else is refused (pickle can run code)."""
    if path.suffix != ".safetensors":
        raise ModelError(
            f"{where}: {path} is not a .safetensors file; convert it with "
            f"`surgery convert {path} --model MODEL --out weights.safetensors` (reads pickles with weights_only)"
        )
    state = read_safetensors(path, where=where)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise ModelError(f"{where}: {path} does not fit the model: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        missing = f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})" if result.missing_keys else ""
        extra = (
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})"
            if result.unexpected_keys
            else ""
        )
        raise ModelError(
            f"{where}: {path} does not fit the model: {', '.join(x for x in (missing, extra) if x)}; "
            "check model.name and model.kwargs"
        )


def fit_img_size(recipe: Any) -> tuple[Any, str | None]:
    """The recipe with ``model.kwargs.img_size`` set to ``data.img_size`` when the model has a fixed input size
    (ViT-like: ``pretrained_cfg["fixed_input_size"]``) that differs and its constructor takes ``img_size``; and a note
    saying so for the plan (None when nothing changed).

    A fixed-size model that cannot take ``img_size`` stops here with the fix, instead of failing inside its forward.
    Trainers call this before building the model, as ``surgery plan`` does.
    """
    spec, size = recipe.model, recipe.data.img_size
    if spec is None or spec.adapter is not None or size is None or "img_size" in spec.kwargs:
        return recipe, None  # an adapter's base is built as it records (its data config says its input size)
    model = build_model(spec, meta=True, where=recipe.where("model"))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    native = tuple(cfg.get("input_size") or ())[-2:]
    if not cfg.get("fixed_input_size") or not native or native == (size, size):
        return recipe, None
    native_text = "x".join(map(str, native))
    if "img_size" not in model_parameters(spec.name):
        raise ModelError(
            f"{recipe.where('data', 'img_size')}: {spec.name!r} takes {native_text} inputs only and cannot be built "
            f"for {size}; set data.img_size: {native[-1]} or remove it"
        )
    model_spec = spec.model_copy(update={"kwargs": {**spec.kwargs, "img_size": size}})
    fitted = recipe.model_copy(update={"model": model_spec})
    fitted._origins, fitted._source = recipe._origins, recipe._source
    note = f"model.kwargs.img_size: {size} (from data.img_size; {spec.name} is fixed-size, {native_text} by default)"
    return fitted, note
