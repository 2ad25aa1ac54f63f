"""Evaluating a trained model on labelled images: ``surgery eval`` as an API (:func:`evaluate`).

The model comes from a run folder (what ``surgery train`` wrote: ``recipe.yaml`` + ``model.safetensors``), an adapter
folder or a hub reference (``hf-hub:org/name[@rev]``, through :func:`surgery.adapter.load`, which verifies it). The
data is a class-folder split or a labels CSV file. Whatever training decided is used as it is: the input size and
normalization (timm's data config of training), the class names and their order, the loss and the memory format.
Data whose classes are not the model's is refused, in one line, before any image is scored.

The numbers are :class:`surgery.metrics.EvalResult` (top-1, top-5 with more than 5 classes, per-class precision and
recall, macro-F1, balanced accuracy, the confusion matrix); with ``out`` the folder also receives a confusion-matrix
PNG, the per-image predictions as CSV and the metrics as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from surgery.errors import DataError, SurgeryError
from surgery.io import write_text
from surgery.metrics import EvalResult, MetricsAccumulator, write_confusion_png, write_predictions_csv

__all__ = ["CONFUSION_PNG", "METRICS_JSON", "PREDICTIONS_CSV", "EvalModel", "evaluate", "load_for_eval"]

CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS_CSV = "predictions.csv"
METRICS_JSON = "eval.json"

Split = Literal["val", "test"]


@dataclass
class EvalModel:
    """A trained model with what its training decided: class names, timm data config, the recipe it was trained
    with (for the loss, the labels-file settings and the data it names) and whether it ran channels-last."""

    model: nn.Module
    class_names: list[str]
    data_config: dict[str, Any]
    recipe: Any  # surgery.recipe.LoadedRecipe
    channels_last: bool
    name: str  # what was loaded, for messages
    is_run: bool = False  # a run folder: its recipe's data paths are this machine's, so they are a default for data


def _is_run_folder(folder: Path) -> bool:
    from surgery.train.run_folder import RECIPE, WEIGHTS

    return (folder / RECIPE).is_file() and (folder / WEIGHTS).is_file()


def _class_names(names: list[str] | None, num_classes: int | None, where: str) -> list[str]:
    if names:
        return [str(n) for n in names]
    if num_classes:
        return [str(i) for i in range(num_classes)]
    raise DataError(f"{where}: the model records no classes (no class names, no class count); it cannot be scored")


def _load_run(folder: Path) -> EvalModel:
    """A run folder's saved model (``model.safetensors``) on the base its recipe builds, after every stage's surgery."""
    from safetensors.torch import load_file

    from surgery.adapter.format import CONFIG_FILE, read_config
    from surgery.adapter.save import replay
    from surgery.data.transforms import resolve_data_cfg
    from surgery.models import build_model, build_recipe_model
    from surgery.recipe import load_recipe
    from surgery.train.run_folder import CLASSES, RECIPE, WEIGHTS
    from surgery.train.trainer import uses_channels_last

    recipe = load_recipe(folder / RECIPE)
    if recipe.model is None:
        raise SurgeryError(
            f"{folder / RECIPE}: the run's recipe has no model: section, so surgery eval cannot build its model again; "
            "train with a recipe that names model.name"
        )
    # every weight comes from model.safetensors: skip downloading pretrained weights or reading the base checkpoint
    if recipe.model.adapter is None:
        spec = recipe.model.model_copy(update={"pretrained": False, "checkpoint": None})
        model = build_model(spec, where=recipe.where("model"))
    else:  # continued from an adapter: its structure (heads, LoRA layers) comes from loading it
        model = build_recipe_model(recipe.model, where=recipe.where("model"))
    replay(model, recipe)
    state = load_file(str(folder / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise SurgeryError(
            f"{folder / WEIGHTS}: does not fit the model {recipe.model.label} of {RECIPE}: {first}"
        ) from None
    model.eval()
    names = json.loads((folder / CLASSES).read_text()) if (folder / CLASSES).is_file() else None
    heads = [h.num_classes for h in recipe.surgery.heads.values() if h.num_classes]
    outputs = getattr(model, "num_classes", None)
    count = heads[0] if heads else outputs if isinstance(outputs, int) else None
    wanted = recipe.train.channels_last
    data_config = resolve_data_cfg(model, img_size=recipe.data.img_size)  # as the trainer resolved it...
    if (folder / CONFIG_FILE).is_file():  # ...and recorded it in the run's adapter, which wins
        recorded = read_config(folder).data_config
        data_config = recorded.to_timm() if recorded is not None else data_config
    return EvalModel(
        model=model,
        class_names=_class_names(names, count, str(folder)),
        data_config=data_config,
        recipe=recipe,
        channels_last=uses_channels_last(model) if wanted == "auto" else bool(wanted),
        name=str(folder),
        is_run=True,
    )


def _load_adapter(ref: str, base: Any, fingerprint: str | None, token: str | None) -> EvalModel:
    """An adapter folder or hub reference, loaded and verified by :func:`surgery.adapter.load`."""
    from surgery.adapter.load import data_config_of, load_folder, resolve
    from surgery.recipe import load_recipe
    from surgery.train.trainer import uses_channels_last

    loaded = load_folder(resolve(ref, token=token), base=base, fingerprint=fingerprint, token=token)
    config = loaded.config
    recipe = load_recipe(config.recipe)
    data_config = config.data_config.to_timm() if config.data_config is not None else dict(data_config_of(loaded.model))
    wanted = recipe.train.channels_last
    return EvalModel(
        model=loaded.model,
        class_names=_class_names(config.class_names, config.num_classes, ref),
        data_config=data_config,
        recipe=recipe,
        channels_last=uses_channels_last(loaded.model) if wanted == "auto" else bool(wanted),
        name=ref,
    )


def load_for_eval(
    source: str | os.PathLike,
    *,
    base: Any = None,
    fingerprint: str | None = None,
    token: str | None = None,
) -> EvalModel:
    """The model of a run folder, an adapter folder or an ``hf-hub:`` reference, with what its training decided.

    ``base``/``fingerprint``/``token`` are those of :func:`surgery.load` (adapters only: a run folder rebuilds its
    model from its own ``recipe.yaml`` and ``model.safetensors``).
    """
    from surgery.adapter.format import CONFIG_FILE, HF_HUB

    text = str(source)
    if text.startswith(HF_HUB):
        return _load_adapter(text, base, fingerprint, token)
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise SurgeryError(
            f"{text}: no such folder; give a run folder (surgery train's output), an adapter folder or "
            "hf-hub:ORG/NAME[@REVISION]"
        )
    if _is_run_folder(folder):
        return _load_run(folder)
    if (folder / CONFIG_FILE).is_file():
        return _load_adapter(text, base, fingerprint, token)
    raise SurgeryError(
        f"{folder}: neither a run folder (recipe.yaml + model.safetensors) nor an adapter folder ({CONFIG_FILE}); "
        "give the output folder of surgery train, an adapter folder or hf-hub:ORG/NAME"
    )


def _recipe_split(recipe: Any, split: Split) -> Path:
    """The data the training recipe names for ``split``: its labels file, or its class folder."""
    data = recipe.data
    key = f"{split}_csv"
    if getattr(data, key, None):
        return Path(getattr(data, key))
    folder = getattr(data, f"{split}_dir", None) or split  # data.val_dir / data.test_dir when set, else val/ test/
    if data.root and not data.train_csv:
        return Path(data.root) / folder
    raise DataError(
        f"the training recipe names no {split} data (data.{key}, or data.root with {folder}/); pass --data DIR or "
        "--data labels.csv"
    )


def eval_samples(
    data: str | os.PathLike | None, split: Split, trained: EvalModel
) -> tuple[list[tuple[Path, int]], Path, str]:
    """The labelled images to score, labelled by the model's class order: ``(samples, root, what)``.

    ``data`` is a labels CSV file, a data root holding ``val/`` or ``test/`` class folders (``split`` picks one), or a
    class-folder split itself when it holds no such subfolder; None takes the split a run's recipe names.
    """
    from surgery.data.folders import decode_errors, scan_eval_folder
    from surgery.data.labels import read_labels_csv

    if data is None and not trained.is_run:
        raise DataError(
            f"{trained.name}: an adapter names no data of this machine; pass --data DIR or --data labels.csv"
        )
    path = _recipe_split(trained.recipe, split) if data is None else Path(data).expanduser()
    if path.suffix.lower() == ".csv" or path.is_file():
        spec = trained.recipe.data
        labels = read_labels_csv(
            path,
            class_names=trained.class_names,
            target_column=spec.target_column,
            label_threshold=spec.label_threshold,
            require_all_classes=False,
        )
        decode_errors(labels.paths)
        return labels.samples, labels.root, str(path)
    if data is not None and (path / split).is_dir():
        path = path / split
    return scan_eval_folder(path, trained.class_names), path, str(path)


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(
    source: str | os.PathLike | EvalModel,
    data: str | os.PathLike | None = None,
    *,
    split: Split = "val",
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    base: Any = None,
    fingerprint: str | None = None,
    token: str | None = None,
) -> EvalResult:
    """Score a trained model on labelled images; the CLI's ``surgery eval`` (see the module docstring).

    ``source``: a run folder, an adapter folder, an ``hf-hub:`` reference or a :func:`load_for_eval` result.
    ``data``: a labels CSV file, or a folder: a data root holding ``<split>/`` class folders, or the class folders
    themselves; None takes the ``split`` the training recipe names (a run's own val or test data). ``out``: a folder
    that receives ``confusion_matrix.png``, ``predictions.csv`` (one row per image, paths relative to the data) and
    ``eval.json`` (the result); nothing is written without it. Raises :class:`~surgery.errors.DataError` when the
    data's classes are not the model's, and the errors of :func:`surgery.load` for a bad adapter.
    """
    from timm.data import ImageDataset

    from surgery.data.folders import SampleListReader
    from surgery.data.transforms import build_transforms

    if split not in ("val", "test"):
        raise DataError(f"split must be val or test, got {split!r}")
    trained = (
        source
        if isinstance(source, EvalModel)
        else load_for_eval(source, base=base, fingerprint=fingerprint, token=token)
    )
    samples, root, what = eval_samples(data, split, trained)
    cfg = trained.data_config
    transform = build_transforms(cfg, is_training=False)
    reader = SampleListReader(root, samples)
    img_mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    dataset = ImageDataset(str(root), reader=reader, input_img_mode=img_mode, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    dev = _device(device)
    model = trained.model.to(dev)
    if trained.channels_last:  # the memory format training ran in (train.channels_last)
        model = model.to(memory_format=torch.channels_last)
    was = model.training
    model.eval()
    acc = MetricsAccumulator(
        len(trained.class_names),
        loss=trained.recipe.train.loss,
        class_names=trained.class_names,
        keep_predictions=out is not None,
    )
    try:
        for x, y in loader:
            x = x.to(dev)
            if trained.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            acc.update(model(x), y)
    finally:
        model.train(was)
    result = acc.compute()
    if out is not None:
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        write_confusion_png(
            result.confusion,
            result.class_names,
            folder / CONFUSION_PNG,
            title=f"{Path(trained.name).name} on {Path(what).name}",
        )
        paths = [os.path.relpath(p, root) for p, _ in samples]
        write_predictions_csv(acc.predictions(paths), folder / PREDICTIONS_CSV)
        record = {"model": trained.name, "data": what, "split": split, **result.to_dict()}
        write_text(folder / METRICS_JSON, json.dumps(record, indent=1) + "\n")
    return result
