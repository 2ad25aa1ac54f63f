"""The one path rule of recipes.

A relative path in a recipe is relative to the folder of the recipe file that wrote it, also when that file is a parent
reached through ``extends:``. A path in a mapping recipe (the Python API) or in a command-line override
(``data.root=...``) is relative to the working folder. ``~`` is expanded. After :func:`surgery.load_recipe`, every path
key holds an absolute path, so nothing downstream resolves recipe paths again.

The path keys are the schema fields marked ``format: path`` (``model.checkpoint``, ``data.root``,
``data.train_csv``/``val_csv``/``test_csv``, ``train.output_dir``), plus the folder of a ``local-dir:`` model reference
in ``model.name`` and a folder in ``model.adapter`` (not an ``hf-hub:`` reference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

PATH_FORMAT = "path"
"""``json_schema_extra={"format": PATH_FORMAT}`` marks a schema field as a path key."""
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"

KeyPath = tuple[str | int, ...]


def absolute(value: str | Path, folder: Path | None = None) -> str:
    """``value`` as an absolute path: ``~`` expanded, a relative path joined to ``folder`` (default: working folder)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (folder if folder is not None else Path.cwd()) / path
    return str(path.resolve())


def path_keys(recipe_cls: type[BaseModel] | None = None) -> list[KeyPath]:
    """``(section, key)`` of every schema field marked as a path, e.g. ``("model", "checkpoint")``."""
    if recipe_cls is None:
        from surgery.recipe.schema import Recipe as recipe_cls
    keys: list[KeyPath] = []
    for section, field in recipe_cls.model_fields.items():
        for model in _models(field.annotation):
            for name, sub in model.model_fields.items():
                extra = sub.json_schema_extra if isinstance(sub.json_schema_extra, dict) else {}
                if extra.get("format") == PATH_FORMAT and (section, name) not in keys:
                    keys.append((section, name))
    return keys


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]


def resolve_paths(data: dict[str, Any], folder_of: Callable[[KeyPath], Path | None] = lambda key: None) -> None:
    """Make every path key of raw recipe ``data`` absolute, in place.

    ``folder_of(key)`` is the folder of the recipe file that wrote ``key`` (None: a mapping or an override, so the
    working folder). Values that are not strings are left to the schema to reject.
    """
    for section, name in path_keys():
        block = data.get(section)
        if isinstance(block, Mapping) and isinstance(block.get(name), str) and block[name]:
            block[name] = absolute(block[name], folder_of((section, name)))
    model = data.get("model")
    key: KeyPath = ("model",) if isinstance(model, str) else ("model", "name")
    name = model if isinstance(model, str) else model.get("name") if isinstance(model, Mapping) else None
    if isinstance(name, str) and name.startswith(LOCAL_DIR) and name[len(LOCAL_DIR) :]:
        resolved = LOCAL_DIR + absolute(name[len(LOCAL_DIR) :], folder_of(key))
        if isinstance(model, str):
            data["model"] = resolved
        else:
            model["name"] = resolved
    adapter = model.get("adapter") if isinstance(model, Mapping) else None
    if isinstance(adapter, str) and adapter and not adapter.startswith(HF_HUB):
        model["adapter"] = absolute(adapter, folder_of(("model", "adapter")))
