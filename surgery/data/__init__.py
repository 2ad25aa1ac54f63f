"""Training data: image folders (:mod:`~surgery.data.folders`: scanning, validation, the report, timm datasets),
timm preprocessing (:mod:`~surgery.data.transforms`: data config, transforms, augmentation presets), labels CSV
files (:mod:`~surgery.data.labels`) and the recipe's data section checked into one report, whichever of the two it
names (:mod:`~surgery.data.source`)."""

from surgery.data.folders import (
    FolderReport,
    SampleListReader,
    build_image_datasets,
    class_names,
    validate_image_folders,
)
from surgery.data.labels import LabelsDataset, LabelsFile, read_labels_csv
from surgery.data.source import validate_data
from surgery.data.transforms import AUGMENT_PRESETS, build_transforms, is_deterministic_transform, resolve_data_cfg

__all__ = [
    "AUGMENT_PRESETS",
    "FolderReport",
    "LabelsDataset",
    "LabelsFile",
    "SampleListReader",
    "build_image_datasets",
    "build_transforms",
    "class_names",
    "is_deterministic_transform",
    "read_labels_csv",
    "resolve_data_cfg",
    "validate_data",
    "validate_image_folders",
]
