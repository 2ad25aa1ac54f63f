"""Merging an adapter into its base as a plain timm folder, written by timm's own ``save_for_hf``."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from surgery import lora
from surgery.adapter.format import CARD_FILE, MERGED_CONFIG, MERGED_WEIGHTS, AdapterConfig
from surgery.adapter.load import BaseLike, load_folder, resolve
from surgery.errors import AdapterError
from surgery.norms import FrozenBatchNorm1d, StatsFixed, release
from surgery.plan import Plan


def plain_norms(model: nn.Module, base_state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Turn stats-fixed and frozen BatchNorms back into the plain classes, in place (same outputs in eval mode).

    A frozen BatchNorm keeps no step counter; ``num_batches_tracked`` is taken from ``base_state`` when given.
    """
    from timm.layers import FrozenBatchNormAct2d, unfreeze_batch_norm_2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    for path, module in list(model.named_modules()):
        new: nn.Module | None = None
        stats_fixed = isinstance(module, StatsFixed)  # release() changes the module's class in place
        if stats_fixed:
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
        if not stats_fixed:
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


def mergeable(model: nn.Module, the_plan: Plan, config: AdapterConfig) -> None:
    """Refuse what timm's config.json cannot express, with the reason and what to do instead."""
    name = str(config.base.model or "")
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
    from timm.models import get_model_input_config

    try:
        size = tuple(get_model_input_config(model)["input_size"])
    except Exception:  # noqa: BLE001 - fall back to the recorded config
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, *size), generator=generator)


def merge(
    ref: str | Path,
    out: str | Path,
    *,
    base: BaseLike = None,
    fingerprint: str | None = None,
    token: str | None = None,
    check: bool = True,
) -> Path:
    """Write the adapter merged into its base as a timm folder (``config.json``, ``model.safetensors``, README.md).

    The folder is written by timm's ``save_for_hf`` (safetensors only) with the training data config in
    ``pretrained_cfg``, so ``timm.create_model("local-dir:OUT", pretrained=True)`` and ``resolve_data_config`` give the
    trained model and its input size without this package. With ``check`` (default) the folder is loaded back with timm
    and its outputs compared with the adapter's (``torch.equal``) before anything appears in ``out``. Heads timm cannot
    build from ``num_classes`` are refused before anything is written. ``base`` and ``fingerprint``: as for
    :func:`surgery.load`.
    """
    import timm.models

    from surgery.adapter.base import base_model_id
    from surgery.adapter.card import write_card

    loaded = load_folder(resolve(ref, token=token), base=base, fingerprint=fingerprint, token=token)
    model, config = loaded.model, loaded.config
    mergeable(model, loaded.plan, config)
    probe = _probe(model)
    with torch.no_grad():
        expected = model(probe)
    model = plain_norms(model, loaded.base_state).eval()
    tolerance = 0.0
    peft_model = lora.peft_of(model)
    if peft_model is not None:  # PEFT's merge: W + scale * B @ A, equal to the adapted outputs up to float rounding
        model = lora.merge(peft_model).eval()
        tolerance = LORA_TOLERANCE
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".merge-"))
    try:
        model_config = {"label_names": list(config.class_names)} if config.class_names else None
        data_config = config.data_config.to_timm() if config.data_config else None
        try:
            timm.models.save_for_hf(
                model, str(staging), model_config=model_config, safe_serialization=True, data_config=data_config
            )
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
            raise AdapterError(f"merge: timm cannot write this model ({err}); keep the adapter") from None
        write_card(
            staging / CARD_FILE, config, base_model_id=base_model_id(model, config.base.model_dump()), merged=True
        )
        if check:
            _check_merged(staging, probe, expected, tolerance=tolerance)
        for name in (MERGED_WEIGHTS, MERGED_CONFIG, CARD_FILE):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


LORA_TOLERANCE = 1e-4
"""A LoRA merge changes the weights' float rounding: merged outputs must equal the adapter's within this, relative to
the largest output magnitude (at least 1). Without LoRA a merge is exact."""


def _check_merged(out: Path, probe: torch.Tensor, expected: torch.Tensor, *, tolerance: float = 0.0) -> None:
    import timm

    try:
        merged = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    except Exception as err:  # noqa: BLE001 - any failure here means timm cannot load what we wrote
        raise AdapterError(
            f"merge: timm cannot load the merged folder ({type(err).__name__}: {err}); keep the adapter"
        ) from None
    with torch.no_grad():
        got = merged(probe)
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
    scale = max(1.0, expected.abs().max().item())
    if diff > tolerance * scale or (not tolerance and not torch.equal(got, expected)):  # exact unless LoRA
        raise AdapterError(
            f"merge: timm's model from the merged folder gives different outputs (max difference {diff:.3g}); "
            "keep the adapter and load it with surgery.load"
        )
