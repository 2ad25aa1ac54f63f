"""`surgery predict` as an API: images through one or several adapters of one base, each adapter with the data config
it was trained with.

One adapter is :func:`surgery.load` and the eval transform of its recorded data config (what ``surgery load
--predict`` does). Several adapters must record the same base (fingerprint); the base is built (or read from its
checkpoint) once:

- LoRA adapters (LoRA runs and folders PEFT saved) share that base in one :class:`surgery.lora.MultiAdapterModel`
  (PEFT's ``load_adapter``/``set_adapter``; each adapter keeps its own head);
- other adapters (a linear probe, a full fine-tune: their tensors replace base weights, which PEFT cannot switch) are
  loaded each on its own copy of the same base, through :func:`surgery.load`.

Images are decoded once; each distinct data config (input size, interpolation, crop, mean/std) preprocesses them once
and the adapters recording it run on that batch. LoRA adapters of one data config run in one forward of PEFT's
mixed-batch inference (``model(x, adapter_names=[...])``: the batch repeated per adapter, each row routed to its
adapter in every LoRA layer and head), when PEFT allows it; else one after the other with ``set_adapter`` over the
same batch (see :func:`run_lora`). Either way the base's compute grows with the number of adapters: LoRA changes the
input of every layer after the first adapted one, so no base activation can be shared.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import AdapterError, DataError, RecipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassProb:
    """One of an image's top classes: its name (the index as text when the adapter records no names), index, prob."""

    name: str
    index: int
    prob: float


@dataclass(frozen=True)
class Prediction:
    """An image's top classes by one adapter."""

    image: str
    adapter: str
    top: tuple[ClassProb, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"image", "adapter", "top": [{"class", "index", "prob"}]}``."""
        return {
            "image": self.image,
            "adapter": self.adapter,
            "top": [{"class": c.name, "index": c.index, "prob": c.prob} for c in self.top],
        }


@dataclass
class _Member:
    """One adapter as predicting sees it: its name, reference, folder, how it runs and what it was trained with."""

    name: str
    ref: str
    folder: Path
    lora: bool
    config: Any = None  # AdapterConfig, None for a folder PEFT saved
    data: dict[str, Any] = field(default_factory=dict)  # timm data config
    model: nn.Module | None = None  # the adapter's own model (one adapter, or a non-LoRA one)
    key: str = ""  # its name in the MultiAdapterModel (LoRA adapters sharing the base), else its name

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    @property
    def class_names(self) -> list[str]:
        if self.config is not None and self.config.class_names:
            return list(self.config.class_names)
        info = getattr(self.model, "adapter_info", None) or {}
        return list(info.get("class_names") or [])


def _named(adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """name -> reference: a mapping as it is; a list named by each reference's last path part."""
    if isinstance(adapters, Mapping):
        named = {str(k): str(v) for k, v in adapters.items()}
    else:
        named = {}
        for ref in adapters:
            name = str(ref).rstrip("/").split("/")[-1].split("@")[0]
            if name in named:
                raise AdapterError(
                    f"adapters {named[name]} and {ref} are both named {name!r}; name them: --adapter NAME=REF "
                    "(or pass a mapping name -> reference)"
                )
            named[name] = str(ref)
    if not named:
        raise AdapterError("predict: no adapter given; name at least one adapter folder or hf-hub: reference")
    return named


def _data_config(base: nn.Module, config: Any) -> dict[str, Any]:
    """timm's resolved data config of an adapter: the base's ``pretrained_cfg`` updated as :func:`surgery.load` does
    (``apply_data_config``), so that a LoRA adapter in a MultiAdapterModel preprocesses as it does loaded alone."""
    from timm.data import resolve_data_config

    from surgery.adapter.load import apply_data_config

    holder = nn.Module()
    holder.pretrained_cfg = dict(getattr(base, "pretrained_cfg", None) or {})
    if config is not None:
        apply_data_config(holder, config)
    return dict(resolve_data_config({}, model=holder))


def _config_key(data: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in data.items()))


def _check_images(images: Sequence[str | os.PathLike]) -> list[str]:
    out = []
    for image in images:
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{image}: no such image file; check the path")
        out.append(str(image))
    return out


def _decode(image: str) -> Any:
    from PIL import Image

    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{image}: cannot decode the image ({err}); pass a JPEG, PNG or other file PIL reads") from None


def _build_base(members: list[_Member], base: Any, *, token: str | None) -> nn.Module:
    """The one base every adapter shares: the model passed, else built from the first recorded base (as ``surgery
    load`` would, ``base`` a reference or checkpoint file), else (only PEFT folders) the reference built pretrained."""
    from surgery.adapter.load import _base_from
    from surgery.models import build_model
    from surgery.recipe import ModelSpec

    if isinstance(base, nn.Module):
        return base
    recorded = next((m for m in members if m.config is not None), None)
    if recorded is not None:
        return _base_from(recorded.config, base, token=token, where=str(recorded.folder / "surgery.json"))[0]
    if base is None:
        raise AdapterError(
            f"{members[0].ref}: a PEFT adapter (adapter_config.json, no surgery.json) names its base without weights "
            "or fingerprint; pass the base: --base NAME (or base=model)"
        )
    return build_model(ModelSpec(name=str(base), pretrained=True), where="--base")


def _check_same_base(members: list[_Member]) -> None:
    recorded = [m for m in members if m.config is not None]
    for other in recorded[1:]:
        first = recorded[0]
        if other.config.base.fingerprint != first.config.base.fingerprint:
            raise AdapterError(
                f"adapters {first.name} and {other.name} were trained on different bases (fingerprints "
                f"{first.config.base.fingerprint[:19]}... and {other.config.base.fingerprint[:19]}...); one predict "
                "shares one base: predict them in separate commands"
            )


def _mixed_batch_ok(peft_model: nn.Module, names: Sequence[str]) -> bool:
    """PEFT's mixed batch stacks each head's rows (``ModulesToSaveWrapper``): heads of different shapes (class counts)
    cannot share one forward."""
    from peft.utils import ModulesToSaveWrapper

    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            shapes = set()
            for name in names:
                if name not in module.modules_to_save:
                    return False
                shapes.add(tuple(tuple(p.shape) for p in module.modules_to_save[name].parameters()))
            if len(shapes) > 1:
                return False
    return True


def _drop_routing_hooks(model: nn.Module) -> None:
    """Remove PEFT's ``adapter_names`` routing hooks left behind by a mixed-batch forward that raised.

    PEFT 0.21's ``LoraModel._enable_peft_forward_hooks`` removes them after its ``yield`` without ``try/finally``, so
    when the forward raises (its own refusal, e.g. Swin's windows) they stay and every later forward would still route
    rows by the old ``adapter_names``. Matching PEFT's hook function keeps every other hook.
    """
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, h in hooks.items() if getattr(h, "func", None) is _adapter_names_pre_forward_hook]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def run_lora(
    multi: nn.Module, x: torch.Tensor, names: Sequence[str], *, mixed: bool = True
) -> tuple[dict[str, torch.Tensor], bool]:
    """Each named adapter's logits for batch ``x`` on a :class:`~surgery.lora.MultiAdapterModel`, and whether they came
    from one mixed-batch forward.

    Mixed batch is PEFT's inference API ``peft_model(x_repeated, adapter_names=[...])``: every LoRA layer and head
    routes each row to its adapter. PEFT refuses it for DoRA and when an adapted layer sees another batch size than
    the input (Swin's window attention), and its heads cannot stack rows of different class counts; then (or with
    ``mixed=False``) the adapters run one after the other with ``set_adapter`` over the same batch. Both give the same
    logits (tests/test_predict.py checks 1e-5).
    """
    names = list(names)
    n = len(x)
    peft_model = multi.peft_model
    if mixed and len(names) > 1 and _mixed_batch_ok(peft_model, names):
        routed = [name for name in names for _ in range(n)]
        try:
            with torch.no_grad():
                out = peft_model(x.repeat(len(names), *([1] * (x.ndim - 1))), adapter_names=routed)
            return {name: out[i * n : (i + 1) * n] for i, name in enumerate(names)}, True
        except (ValueError, TypeError, RuntimeError) as err:  # PEFT's refusals; the fallback gives the same result
            _drop_routing_hooks(peft_model)
            log.info("predict: PEFT mixed-batch inference does not apply (%s); switching adapters", str(err)[:200])
    current = multi.active
    out = {}
    try:
        with torch.no_grad():
            for name in names:
                out[name] = multi.use(name)(x)
    finally:
        multi.use(current)
    return out, False


def _top(logits: torch.Tensor, names: Sequence[str], top: int) -> list[tuple[ClassProb, ...]]:
    from surgery.metrics import class_probabilities

    probs = class_probabilities(logits)
    values, indices = probs.topk(min(top, probs.shape[-1]), dim=-1)
    return [
        tuple(
            ClassProb(names[i] if i < len(names) else str(i), i, v)
            for v, i in zip(row_v.tolist(), row_i.tolist(), strict=True)
        )
        for row_v, row_i in zip(values, indices, strict=True)
    ]


def predict(
    images: Sequence[str | os.PathLike],
    adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    *,
    base: nn.Module | str | os.PathLike | None = None,
    fingerprint: str | None = None,
    top: int = 3,
    batch_size: int = 32,
    token: str | None = None,
    mixed: bool = True,
) -> list[Prediction]:
    """The ``top`` classes of every image by every adapter, image by image in the adapters' order.

    ``adapters``: folders or ``hf-hub:`` references (named by their last path part), or a mapping name -> reference.
    ``base`` and ``fingerprint`` are those of :func:`surgery.load`: the base (model, timm name, ``hf-hub:`` or a
    ``.safetensors`` checkpoint of the recorded architecture; by default rebuilt from the record) and the fingerprint
    you trust. Every adapter's recorded base must be this base. Each adapter preprocesses with its own recorded data
    config. ``mixed=False`` switches LoRA adapters one by one instead of PEFT's mixed batch (same result).
    Bad input (missing or undecodable image, another base, ``top`` < 1) raises one-line errors of our own types.
    """
    from timm.data import create_transform

    from surgery.adapter.format import CONFIG_FILE, FINGERPRINT, read_config
    from surgery.adapter.format import fingerprint as fingerprint_of
    from surgery.adapter.load import PEFT_FILES, _wrong_base, load, load_adapters, resolve

    if top < 1:
        raise RecipeError(f"predict: top must be at least 1, got {top}")
    if batch_size < 1:
        raise RecipeError(f"predict: batch size must be at least 1, got {batch_size}")
    if fingerprint is not None and re.fullmatch(FINGERPRINT, fingerprint) is None:
        raise AdapterError(f"fingerprint={fingerprint[:20]!r}: expected 'sha256:' and 64 hex digits")
    paths = _check_images(images)
    named = _named(adapters)
    if not paths:
        return []
    members = []
    for name, ref in named.items():
        source = resolve(ref, token=token)
        config = read_config(source.folder) if (source.folder / CONFIG_FILE).is_file() else None
        members.append(_Member(name, ref, source.folder, (source.folder / PEFT_FILES[0]).is_file(), config))
    _check_same_base(members)

    multi = None
    if len(members) == 1 and members[0].config is not None:  # one adapter: exactly `surgery load A --predict`
        only = members[0]
        only.model = load(only.ref, base=base, fingerprint=fingerprint, token=token)
        only.data = _data_config(only.model, None)
    else:
        model = _build_base(members, base, token=token)
        got = fingerprint_of(model)
        if fingerprint is not None and got != fingerprint:
            trusted = fingerprint[:19]
            raise AdapterError(f"predict: the base's fingerprint {got[:19]}... is not the trusted {trusted}...")
        for m in members:
            if m.config is not None and m.config.base.fingerprint != got:
                supplied = "model" if isinstance(base, nn.Module) else "reference" if base is not None else "recorded"
                raise AdapterError(
                    f"adapter {m.name}: {_wrong_base(m.config, got, m.config.base.fingerprint, supplied=supplied)}"
                )
        # PEFT finds an adapter's tensors by its name inside parameter names: fixed-width keys of our own (never a
        # prefix of another, never part of "lora_"), so that any display name (a folder's, NAME=REF) is safe.
        loras = [m for m in members if m.lora]
        for i, m in enumerate(loras):
            m.key = f"task{i:04d}"
        multi = load_adapters(model, {m.key: m.folder for m in loras}) if loras else None
        for m in members:
            if m.lora:
                m.data = _data_config(model, m.config)
            else:  # its tensors replace base weights: its own copy of the base (surgery.load copies a model base)
                m.model = load(m.ref, base=model, token=token)
                m.data = _data_config(m.model, None)

    groups: dict[tuple, list[_Member]] = {}
    for m in members:
        groups.setdefault(_config_key(m.data), []).append(m)
    transforms = {key: create_transform(**group[0].data) for key, group in groups.items()}
    found: dict[tuple[str, str], tuple[ClassProb, ...]] = {}
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        decoded = [_decode(p) for p in batch]
        for key, group in groups.items():
            x = torch.stack([transforms[key](img) for img in decoded])
            logits: dict[str, torch.Tensor] = {}
            shared = [m.key for m in group if m.model is None]
            if shared:
                logits.update(run_lora(multi, x, shared, mixed=mixed)[0])
            for m in group:
                if m.model is not None:
                    with torch.no_grad():
                        logits[m.key] = m.model(x)
            for m in group:
                for path, row in zip(batch, _top(logits[m.key], m.class_names, top), strict=True):
                    found[(path, m.name)] = row
    return [Prediction(path, m.name, found[(path, m.name)]) for path in paths for m in members]


def table(predictions: Sequence[Prediction]) -> str:
    """The predictions as aligned columns: image, adapter, top classes with probabilities."""
    rows = [("image", "adapter", "top classes")]
    rows += [(p.image, p.adapter, ", ".join(f"{c.name} ({c.prob:.3f})" for c in p.top)) for p in predictions]
    wide = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{wide[0]}}  {r[1]:<{wide[1]}}  {r[2]}".rstrip() for r in rows)


__all__ = ["ClassProb", "Prediction", "predict", "run_lora", "table"]
