"""timm preprocessing for image folders: the data config (size, mean/std, interpolation, crop) and the transforms.

Everything is timm's: ``timm.data.resolve_data_config`` + ``timm.data.create_transform``. This module adds the
augmentation presets of ``data.augment`` and the test of whether a transform is random (for the feature cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from surgery.errors import DataError

__all__ = ["AUGMENT_PRESETS", "build_transforms", "is_deterministic_transform", "resolve_data_cfg"]

# Augmentation strength -> extra kwargs for ``timm.data.create_transform(is_training=True)``.
# "none" is timm's no-aug train pipeline (resize + center crop), the only deterministic one.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"no_aug": True},
    "light": {"scale": (0.6, 1.0), "hflip": 0.5, "color_jitter": None},
    "strong": {"scale": (0.08, 1.0), "hflip": 0.5, "auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25},
}


def resolve_data_cfg(model_or_cfg: Any, *, img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode) with an optional size override.

    ``model_or_cfg`` is a timm model (its ``pretrained_cfg`` is used), a ``pretrained_cfg``/data-config mapping,
    or a timm model name (its default pretrained cfg, nothing is downloaded).
    """
    if isinstance(model_or_cfg, str):
        import timm.models

        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(model_or_cfg, allow_unregistered=False).to_dict()
        except RuntimeError as exc:
            raise DataError(f"no timm pretrained config for '{model_or_cfg}'; pass the model itself") from exc
        cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
    elif isinstance(model_or_cfg, Mapping):
        cfg = resolve_data_config(pretrained_cfg=dict(model_or_cfg))
    elif isinstance(model_or_cfg, torch.nn.Module):
        cfg = resolve_data_config(model=model_or_cfg)
    else:
        raise DataError(f"cannot read a data config from {type(model_or_cfg).__name__}; pass a timm model or dict")
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise DataError(f"img_size must be a positive int or (height, width), got {img_size!r}")
        cfg["input_size"] = (cfg["input_size"][0], *size)
    return cfg


def build_transforms(
    model_or_cfg: Any,
    *,
    img_size: int | tuple[int, int] | None = None,
    augment: str = "light",
    is_training: bool,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm transform for a model: size, mean/std, interpolation and crop_pct from its ``pretrained_cfg``.

    ``augment`` picks the train-time strength (see ``AUGMENT_PRESETS``): "none" (resize + center crop),
    "light" (random resized crop with scale 0.6-1 + horizontal flip) or "strong" (full-range crop, flip,
    RandAugment ``rand-m9-mstd0.5`` and random erasing). Evaluation transforms ignore ``augment``.
    """
    if augment not in AUGMENT_PRESETS:
        raise DataError(f"unknown augment '{augment}'; use one of {', '.join(AUGMENT_PRESETS)}")
    cfg = resolve_data_cfg(model_or_cfg, img_size=img_size)
    extra = AUGMENT_PRESETS[augment] if is_training else {}
    return create_transform(**cfg, is_training=is_training, **extra)


# Transforms whose output depends only on their input. Anything not listed counts as random.
_DETERMINISTIC = {
    "Resize",
    "CenterCrop",
    "Normalize",
    "ToTensor",
    "PILToTensor",
    "ConvertImageDtype",
    "Grayscale",
    "Pad",
    "MaybeToTensor",
    "MaybePILToTensor",
    "ToNumpy",
    "CenterCropOrPad",
    "TrimBorder",
    "ResizeToSequence",
}


def is_deterministic_transform(transform: Any) -> bool:
    """True when ``transform`` has no random step, so features computed once can be cached and reused.

    Walks ``Compose`` (and tuples of transforms) and checks each step against a whitelist of known deterministic
    torchvision/timm transforms; unknown steps count as random. ``build_transforms(..., augment="none")`` is
    deterministic, "light" and "strong" are not.
    """
    if transform is None:
        return True
    if isinstance(transform, (list, tuple)):
        return all(is_deterministic_transform(t) for t in transform)
    name = type(transform).__name__
    if name == "Compose":  # not RandomApply/RandomChoice/RandomOrder, which also hold ``.transforms``
        return all(is_deterministic_transform(t) for t in transform.transforms)
    if isinstance(transform, torch.nn.Sequential):
        return all(is_deterministic_transform(t) for t in transform)
    if name == "ResizeKeepRatio":
        return not (transform.random_scale_prob or transform.random_aspect_prob)
    return name in _DETERMINISTIC
