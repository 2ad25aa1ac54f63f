"""Training data: image folders (:mod:`~surgery.data.folders`: scanning, validation, the report, timm datasets),
timm preprocessing (:mod:`~surgery.data.transforms`: data config, transforms, augmentation presets) and labels CSV
files (:mod:`~surgery.data.labels`)."""

from surgery.data.folders import (
    FolderReport,
    SampleListReader,
    build_image_datasets,
    class_names,
    validate_image_folders,
)
from surgery.data.transforms import AUGMENT_PRESETS, build_transforms, is_deterministic_transform, resolve_data_cfg

__all__ = [
    "AUGMENT_PRESETS",
    "FolderReport",
    "SampleListReader",
    "build_image_datasets",
    "build_transforms",
    "class_names",
    "is_deterministic_transform",
    "resolve_data_cfg",
    "validate_image_folders",
]
