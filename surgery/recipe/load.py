"""Loading recipes: YAML with line numbers, ``extends:``, command-line overrides, schema validation.

A recipe is data, never code: only plain YAML types are accepted (no ``!!python/...`` tags). Every value remembers
the file and line it came from, so a validation error names ``file:line: key``.

Merging (``extends``): parents are merged in order, then the file itself. Mappings merge key by key. Lists of
mappings (``surgery.rules``) accumulate, the child's after the parent's, so a child's rules win; lists of plain
values (``hidden: [256]``) are replaced. ``{_replace_: VALUE}`` replaces a parent's mapping or list outright.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, PrivateAttr, ValidationError

from surgery.errors import RecipeError
from surgery.paths import resolve_paths
from surgery.recipe.schema import Recipe

REPLACE = "_replace_"
Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a file and line, or a command-line override."""

    source: str
    line: int | None = None
    folder: Path | None = field(default=None, compare=False)
    """The folder of the recipe file (relative paths it writes start there); None for overrides and mappings."""

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class LoadedRecipe(Recipe):
    """A validated recipe that remembers where each value came from (for error messages)."""

    _origins: dict[Path_, Origin] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr("<recipe>")

    def where(self, *path: str | int) -> str:
        """``file:line: dotted.key`` for a key path, falling back to the nearest located parent."""
        for cut in range(len(path), 0, -1):  # a key the files never set has no line: name the file alone
            if path[:cut] in self._origins:
                return f"{self._origins[path[:cut]]}: {dotted(path)}"
        return f"{self._source}: {dotted(path)}"

    @property
    def source(self) -> str:
        """The file (or ``<mapping>``) this recipe was loaded from."""
        return self._source


def dotted(path: Sequence[str | int]) -> str:
    """``('surgery', 'rules', 1, 'lr')`` -> ``surgery.rules[1].lr``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ----------------------------------------------------------------------------------------------------------- YAML


_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


def _read_yaml(text: str, source: str, folder: Path | None = None) -> tuple[Any, dict[Path_, Origin]]:
    """Parse YAML into plain data plus the line of every key and list item, rejecting anything but plain types.

    ``folder`` is the folder of the file the text comes from (None for overrides): relative paths start there.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}{line}: not valid YAML: {err.problem or err}") from None
    finally:
        loader.dispose()
    origins: dict[Path_, Origin] = {}
    if node is None:
        return {}, origins

    def walk(n: yaml.Node, path: Path_) -> Any:
        origins[path] = Origin(source, n.start_mark.line + 1, folder)
        if n.tag not in _SAFE_TAGS and n.tag != "tag:yaml.org,2002:timestamp":
            raise RecipeError(
                f"{source}:{n.start_mark.line + 1}: {dotted(path) or '<top>'}: YAML tag {n.tag!r} is not allowed; "
                "a recipe is plain data (strings, numbers, lists, mappings), never code"
            )
        if isinstance(n, yaml.MappingNode):
            loader.flatten_mapping(n)  # YAML merge keys (<<: *anchor)
            out: dict[str, Any] = {}
            for key_node, value_node in n.value:
                key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str | int | float | bool) or key is None:
                    raise RecipeError(f"{source}:{key_node.start_mark.line + 1}: keys must be plain strings")
                key = str(key)
                if key in out:
                    raise RecipeError(
                        f"{source}:{key_node.start_mark.line + 1}: {dotted((*path, key))}: duplicate key; "
                        "each key may appear once in a mapping"
                    )
                origins[(*path, key)] = Origin(source, key_node.start_mark.line + 1, folder)
                out[key] = walk(value_node, (*path, key))
                origins[(*path, key)] = Origin(source, key_node.start_mark.line + 1, folder)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, (*path, i)) for i, item in enumerate(n.value)]
        if n.tag == "tag:yaml.org,2002:timestamp":
            return n.value  # dates stay text: the schema has no date fields
        return loader.construct_object(n, deep=True)

    return walk(node, ()), origins


# ------------------------------------------------------------------------------------------------------- extends


def builtin_recipes() -> dict[str, Path]:
    """Names and paths of the recipes shipped in ``recipes/``."""
    root = resources.files("surgery.recipes")
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def recipe_description(path: Path) -> str:
    """The ``description:`` of a recipe file, read with the YAML reader (empty when it has none)."""
    data, _ = _read_yaml(path.read_text(encoding="utf-8"), str(path), path.parent)
    text = data.get("description") if isinstance(data, dict) else None
    return " ".join(str(text).split()) if text else ""


def resolve_recipe_path(ref: str, base: Path | None = None, *, origin: str = "recipe") -> Path:
    """A recipe reference is a path (relative to ``base``) or the name of a built-in recipe."""
    candidates = []
    if base is not None:
        candidates.append(base / ref)
    candidates.append(Path(ref))
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    builtins = builtin_recipes()
    name = ref[: -len(".yaml")] if ref.endswith(".yaml") else ref
    if name in builtins:
        return builtins[name]
    close = difflib.get_close_matches(name, list(builtins), n=3)
    hint = (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else (f"; built-in recipes are {', '.join(sorted(builtins))}")
    )
    raise RecipeError(f"{origin}: no recipe file {ref!r} and no built-in recipe of that name{hint}")


def _merge(parent: Any, child: Any) -> Any:
    if isinstance(child, dict) and set(child) == {REPLACE}:
        return child[REPLACE]
    if isinstance(parent, dict) and isinstance(child, dict):
        out = dict(parent)
        for key, value in child.items():
            out[key] = _merge(parent[key], value) if key in parent else _strip_replace(value)
        return out
    if isinstance(parent, list) and isinstance(child, list) and any(isinstance(x, dict) for x in parent + child):
        return parent + child
    return _strip_replace(child)


def _strip_replace(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {REPLACE}:
            return value[REPLACE]
        return {k: _strip_replace(v) for k, v in value.items()}
    return value


def _shift_origins(origins: dict[Path_, Origin], offset: int, prefix: Path_) -> dict[Path_, Origin]:
    """Re-key list-item origins when a child's list items are appended after ``offset`` parent items."""
    out = {}
    for path, origin in origins.items():
        if path[: len(prefix)] == prefix and len(path) > len(prefix) and isinstance(path[len(prefix)], int):
            path = (*prefix, path[len(prefix)] + offset, *path[len(prefix) + 1 :])
        out[path] = origin
    return out


def _merge_origins(parent: Any, child: Any, origins: dict[Path_, Origin], path: Path_ = ()) -> dict[Path_, Origin]:
    """Adjust a child's origins to the merged layout (appended lists shift their indices)."""
    if isinstance(child, dict) and set(child) != {REPLACE} and isinstance(parent, dict):
        for key, value in child.items():
            if key in parent:
                origins = _merge_origins(parent[key], value, origins, (*path, key))
    elif isinstance(parent, list) and isinstance(child, list) and any(isinstance(x, dict) for x in parent + child):
        origins = _shift_origins(origins, len(parent), path)
    return origins


def _load_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[Path_, Origin]]:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError(f"{chain[-1]}: extends: cycle {cycle}; remove one of the extends")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"{path}: not a recipe: byte {err.start} is not UTF-8 text; a recipe is a YAML text file"
        ) from None
    data, origins = _read_yaml(text, str(path), path.parent)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections (model:, surgery:, ...), not a {_kind(data)}")
    parents = data.pop("extends", None)
    if parents is None:
        return data, origins
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{origins.get(('extends',), path)}: extends: must be a recipe name or a list of them")
    merged: dict[str, Any] = {}
    merged_origins: dict[Path_, Origin] = {}
    for i, ref in enumerate(parents):
        where = origins.get(("extends", i)) or origins.get(("extends",))
        parent_path = resolve_recipe_path(ref, path.parent, origin=f"{where}: extends")
        pdata, porigins = _load_file(parent_path, (*chain, path))
        merged_origins.update(_merge_origins(merged, pdata, _replaced_origins(merged_origins, pdata, porigins)))
        merged = _merge(merged, pdata)
    origins = {k: v for k, v in origins.items() if k[:1] != ("extends",)}
    merged_origins.update(_merge_origins(merged, data, _replaced_origins(merged_origins, data, origins)))
    return _merge(merged, data), merged_origins


def _replaced_paths(data: Any, path: Path_ = ()) -> list[Path_]:
    """Where ``data`` holds ``{_replace_: VALUE}`` (as paths of the merged data, without the ``_replace_`` key)."""
    if not isinstance(data, dict):
        return []
    if set(data) == {REPLACE}:
        return [path, *_replaced_paths(data[REPLACE], path)]
    return [p for key, value in data.items() for p in _replaced_paths(value, (*path, key))]


def _replaced_origins(merged: dict[Path_, Origin], child: Any, origins: dict[Path_, Origin]) -> dict[Path_, Origin]:
    """A ``{_replace_: ...}`` in ``child`` replaces what the parents wrote there: forget their origins under it (in
    ``merged``, in place) and return ``origins`` keyed by the merged layout (no ``_replace_`` in the paths), so an
    error in a replaced value names the file and line that replaced it."""
    for path in _replaced_paths(child):
        for key in [k for k in merged if k[: len(path)] == path and len(k) > len(path)]:
            del merged[key]
    return {tuple(part for part in key if part != REPLACE): origin for key, origin in origins.items()}


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "value")


# ------------------------------------------------------------------------------------------------------ overrides


def apply_override(data: dict[str, Any], override: str, origins: dict[Path_, Origin]) -> None:
    """Apply one ``key.sub=value`` override in place; the value is parsed as YAML (``lr=1e-4``, ``which=[0,1]``)."""
    where = f"override {override!r}"
    if "=" not in override:
        raise RecipeError(f"{where}: expected key=value, e.g. optim.lr=1e-4")
    key, _, raw = override.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"{where}: empty key; write the dotted path, e.g. surgery.norm=eval")
    value, _ = _read_yaml(raw, where) if raw.strip() else ("", {})
    parts: list[str | int] = [int(p) if p.lstrip("-").isdigit() else p for p in key.split(".")]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                size = len(node)
                raise RecipeError(f"{where}: {dotted(parts[:i]) or key}: list has {size} items; use 0..{size - 1}")
            part = part % len(node)
        elif isinstance(node, dict):
            part = str(part)
        else:
            raise RecipeError(f"{where}: {dotted(parts[:i])} is a {_kind(node)}, not a section")
        parts[i] = part
        if not last and isinstance(node, dict) and part not in node:
            node[part] = {}
            origins[tuple(parts[: i + 1])] = Origin(where)
        if last:
            node[part] = value
            for stale in [k for k in origins if k[: i + 1] == tuple(parts)]:  # the file no longer wrote these
                del origins[stale]
        else:
            node = node[part]
    origins[tuple(parts)] = Origin(where)


# ------------------------------------------------------------------------------------------------------ validation


def _unwrap_models(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models reachable from an annotation through Optional/Union/list/dict."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is typing.Annotated:
        return _unwrap_models(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict):
        args = typing.get_args(annotation)
        if origin is dict:
            args = args[1:]
        return [m for a in args for m in _unwrap_models(a)]
    return []


def _keys_at(path: Sequence[str | int]) -> list[str]:
    """Valid keys of the schema section at ``path`` (for 'did you mean')."""
    models: list[type[BaseModel]] = [Recipe]
    for part in path:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for model in models:
            field = _field(model, str(part))
            if field is not None:
                nxt += _unwrap_models(field.annotation)
            else:  # dict keys (heads.<name>) lead to the dict's value models
                nxt.append(model)
        models = nxt or models
    keys: list[str] = []
    for model in models:
        keys += [f.alias or name for name, f in model.model_fields.items()]
    return keys


def _field(model: type[BaseModel], key: str) -> Any:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _data_path(data: Any, loc: Sequence[Any], kind: str = "") -> Path_:
    """Map a pydantic error location to a path in the data, dropping union-member tags and aliases."""
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and part == "from_" and "from" in node:
            path.append("from")
            node = node["from"]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and i == len(loc) - 1 and kind in ("missing", "extra_forbidden"):
            path.append(part)  # a missing or extra key; other unknown parts are union-member tags
            node = None
    return tuple(path)


def _best_error(errors: list[Any], data: Any) -> Any:
    """Among a union's alternatives, the error that went deepest into the data is the one the user meant."""

    def depth(err: Any) -> tuple[int, bool, int]:
        path = _data_path(data, err["loc"], err["type"])
        # at equal depth, a member that accepted the input's type explains more than "should be a valid string"
        mismatch = err["type"].endswith("_type")
        return (len(path), not mismatch, -errors.index(err))

    return max(errors, key=depth)


def _format_error(err: Any, data: Any, origins: dict[Path_, Origin], source: str) -> str:
    path = _data_path(data, err["loc"], err["type"])
    origin = None
    for cut in range(len(path), 0 if path else -1, -1):
        if path[:cut] in origins:
            origin = origins[path[:cut]]
            break
    where = f"{origin or source}: {dotted(path) or '<top>'}"
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        valid = [k for k in _keys_at(path[:-1]) if not k.startswith("_")]
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key '{key}'; {hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    got = f" (got {value!r})" if isinstance(value, str | int | float | bool) and kind != "value_error" else ""
    if kind == "literal_error" and isinstance(value, str):
        allowed = err.get("ctx", {}).get("expected", "")
        options = [o.strip(" '") for o in allowed.replace(" or ", ",").split(",") if o.strip()]
        close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
        got += f"; did you mean '{close[0]}'?" if close else ""
    return f"{where}: {msg[0].lower() + msg[1:] if msg else 'invalid value'}{got}"


def validate(
    data: Mapping[str, Any], origins: dict[Path_, Origin] | None = None, source: str = "<recipe>"
) -> LoadedRecipe:
    """Validate merged recipe data against the schema; raise one located :class:`RecipeError` for the first problem."""
    origins = origins or {}
    try:
        recipe = LoadedRecipe.model_validate(dict(data))
    except ValidationError as exc:
        errors = exc.errors()
        # A union (str | list | range) fails once per alternative. Among the errors about the first failing item,
        # report the one that went deepest into the data: that is the mistake the user made.
        first = _data_path(data, errors[0]["loc"])
        prefix = first[: max(1, len(first) - 1)]
        related = [e for e in errors if _data_path(data, e["loc"])[: len(prefix)] == prefix]
        raise RecipeError(_format_error(_best_error(related or errors, data), data, origins, source)) from None
    recipe._origins = origins
    recipe._source = source
    return recipe


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Load a recipe from a file path, a built-in recipe name or a mapping, then apply ``key.sub=value`` overrides.

    Raises :class:`~surgery.errors.RecipeError` with ``file:line: key: problem`` on any malformed input.
    """
    if isinstance(source, Recipe):
        source = source.model_dump(by_alias=True, exclude_unset=True)
    if isinstance(source, Mapping):
        data = dict(source)
        origins: dict[Path_, Origin] = {}
        name = "<mapping>"
        if "extends" in data:
            parents = data.pop("extends")
            merged: dict[str, Any] = {}
            for ref in [parents] if isinstance(parents, str) else list(parents):
                pdata, porigins = _load_file(resolve_recipe_path(ref, origin="extends"), ())
                origins.update(_merge_origins(merged, pdata, porigins))
                merged = _merge(merged, pdata)
            data = _merge(merged, data)
    else:
        path = resolve_recipe_path(str(source), origin="recipe")
        data, origins = _load_file(path, ())
        name = str(path)
    data = _copy(data)
    for override in overrides:
        apply_override(data, override, origins)
    resolve_paths(data, lambda key: origins[key].folder if key in origins else None)  # the one path rule
    return validate(data, origins, name)


def with_num_classes(recipe: LoadedRecipe, num_classes: int, *, source: str = "num_classes") -> LoadedRecipe:
    """The recipe with every new head sized to ``num_classes`` (the class count of the data, or ``--num-classes``).

    A head that leaves ``num_classes`` unset takes the count; one that sets another count is an error naming where it
    is set, because a head whose size does not match the data trains a wrong classifier without a word.
    """
    if num_classes < 1:
        raise RecipeError(f"{source}: the class count must be at least 1, got {num_classes}")
    heads = dict(recipe.surgery.heads)
    for key, spec in heads.items():
        if spec.num_classes is None:
            heads[key] = spec.model_copy(update={"num_classes": num_classes})
        elif spec.num_classes != num_classes:
            raise RecipeError(
                f"{recipe.where('surgery', 'heads', key, 'num_classes')}: the head has {spec.num_classes} classes "
                f"but {source} has {num_classes}; remove the key to take the count from the data, "
                f"or set it to {num_classes}"
            )
    if heads == recipe.surgery.heads:
        return recipe
    filled = recipe.model_copy(update={"surgery": recipe.surgery.model_copy(update={"heads": heads})})
    filled._origins, filled._source = recipe._origins, recipe._source
    return filled


def with_head_classes(recipe: LoadedRecipe, num_classes: int, *, source: str = "--num-classes") -> LoadedRecipe:
    """:func:`with_num_classes`, adding a new ``heads.classifier`` when the recipe replaces no head (``--num-classes``
    on a recipe without heads asks for one)."""
    if not recipe.surgery.heads and num_classes >= 1:
        from surgery.recipe.schema import HeadSpec

        heads = {"classifier": HeadSpec(num_classes=num_classes)}
        added = recipe.model_copy(update={"surgery": recipe.surgery.model_copy(update={"heads": heads})})
        added._origins, added._source = recipe._origins, recipe._source
        return added
    return with_num_classes(recipe, num_classes, source=source)


def resolved_data(recipe: Recipe, *, predicates: str = "error") -> dict[str, Any]:
    """The fully resolved recipe as plain JSON-ready data, for the copies runs and adapters keep.

    Paths are absolute (:mod:`surgery.paths`: a loaded recipe's already are; a plain :class:`Recipe` resolves against
    the working folder), so the copy rebuilds the same run from anywhere. A Python predicate (``which=callable``) is
    not data: ``predicates="error"`` refuses it, ``"repr"`` writes its repr (a record, not loadable).
    """

    def default(value: Any) -> str:
        if predicates == "repr":
            return repr(value)
        raise RecipeError(
            f"{getattr(recipe, 'source', '<recipe>')}: a Python predicate in a layer range (which=callable) cannot be "
            "saved as data; use layer indices or names"
        )

    data = json.loads(json.dumps(recipe.model_dump(by_alias=True, exclude_none=True), default=default))
    if data.get("train", {}).get("stages"):
        data["train"].pop("epochs", None)  # stages carry their epochs; both keys together are refused
    resolve_paths(data)
    return data


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
