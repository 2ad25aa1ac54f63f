"""Recipes: the schema (every key, its type, default and meaning) and the loader (YAML with lines, ``extends:``,
overrides, located errors).

- :mod:`surgery.recipe.schema`: the pydantic models, the one place a recipe key is defined.
- :mod:`surgery.recipe.load`: reading files and mappings into a validated :class:`LoadedRecipe`.

The built-in recipe files live in the top-level ``recipes/`` folder, packaged as ``surgery.recipes``.
"""

from __future__ import annotations

from surgery.recipe.load import (
    LoadedRecipe,
    Origin,
    apply_override,
    builtin_recipes,
    dotted,
    load_recipe,
    recipe_description,
    resolve_recipe_path,
    resolved_data,
    validate,
    with_head_classes,
    with_num_classes,
)
from surgery.recipe.schema import (
    SCHEDULERS,
    DataSpec,
    HeadSpec,
    HubSpec,
    LayerRange,
    LoraSpec,
    ModelSpec,
    OptimSpec,
    Recipe,
    Rule,
    Selector,
    StageSpec,
    SurgerySpec,
    TrainSpec,
    json_schema,
)

__all__ = [
    "SCHEDULERS",
    "DataSpec",
    "HeadSpec",
    "HubSpec",
    "LayerRange",
    "LoraSpec",
    "LoadedRecipe",
    "ModelSpec",
    "OptimSpec",
    "Origin",
    "Recipe",
    "Rule",
    "Selector",
    "StageSpec",
    "SurgerySpec",
    "TrainSpec",
    "apply_override",
    "builtin_recipes",
    "dotted",
    "json_schema",
    "load_recipe",
    "recipe_description",
    "resolve_recipe_path",
    "resolved_data",
    "validate",
    "with_head_classes",
    "with_num_classes",
]
