"""Building the model a recipe names: timm names and ``hf-hub:``/``local-dir:`` references through
``timm.create_model``, ``torchvision:NAME`` through torchvision, then an optional safetensors checkpoint.

``meta=True`` builds on the meta device: shapes and names only, no memory, no weights loaded. ``surgery plan`` uses
it so that planning a 1B-parameter model costs what planning a small one does.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from surgery.errors import ModelError
from surgery.schema import ModelSpec

TORCHVISION = "torchvision:"


def build_model(
    spec: ModelSpec,
    *,
    meta: bool = False,
    recipe_dir: Path | None = None,
    where: str = "model",
) -> nn.Module:
    """Build the model of a recipe's ``model:`` section (see module docstring)."""
    pretrained = spec.pretrained and not meta
    if spec.pretrained and spec.name.startswith(TORCHVISION):  # fail at plan time, not after the plan was trusted
        raise ModelError(
            f"{where}.pretrained: torchvision weights cannot be downloaded here; set pretrained: false and give "
            "model.checkpoint (a .safetensors file)"
        )
    kwargs: dict[str, Any] = dict(spec.kwargs)
    try:
        if meta:
            with torch.device("meta"):
                model = _create(spec.name, pretrained=False, kwargs=kwargs, where=where)
        else:
            model = _create(spec.name, pretrained=pretrained, kwargs=kwargs, where=where)
    except ModelError:
        raise
    except TypeError as err:
        raise ModelError(f"{where}.kwargs: {spec.name!r} does not accept these arguments: {err}") from None
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if pretrained:
            hint = (
                "; weights cannot be downloaded here: set pretrained: false, or use a checkpoint or hf-hub: reference"
            )
        raise ModelError(f"{where}.name: cannot build {spec.name!r}: {first}{hint}") from None
    if spec.checkpoint and not meta:
        path = Path(spec.checkpoint)
        if not path.is_absolute() and recipe_dir is not None:
            path = recipe_dir / path
        load_checkpoint(model, path, where=f"{where}.checkpoint")
    return model


def _create(name: str, *, pretrained: bool, kwargs: Mapping[str, Any], where: str) -> nn.Module:
    if name.startswith(TORCHVISION):
        import torchvision

        arch = name[len(TORCHVISION) :]
        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            close = difflib.get_close_matches(arch, available, n=3)
            raise ModelError(f"{where}.name: torchvision has no model {arch!r}; closest: {', '.join(close) or '-'}")
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    if ":" not in name and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*name*')` lists them"
        raise ModelError(f"{where}.name: timm has no model {name!r}{hint}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def load_checkpoint(model: nn.Module, path: Path, *, where: str = "checkpoint") -> None:
    """Load a ``.safetensors`` state dict strictly; anything else is refused (pickle can run code)."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ModelError(
            f"{where}: {path} is not a .safetensors file; convert it once with "
            "safetensors.torch.save_file(torch.load(path), 'weights.safetensors') in a trusted environment"
        )
    if not path.is_file():
        raise ModelError(f"{where}: no file {path}")
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise ModelError(f"{where}: {path} is not a readable safetensors file ({err})") from None
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
