"""timm-surgery: recipe-driven model surgery for timm backbones.

A recipe says what to freeze, which heads to replace and which learning rate each layer gets. :func:`plan` resolves
it against a model without touching it; :func:`apply` makes it real and returns the same plan, whose
``param_groups()`` feed any torch optimizer.

    >>> import timm, surgery
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> p = surgery.apply(model, "linear-probe", )  # doctest: +SKIP

The public names are imported lazily (PEP 562): ``import surgery`` costs nothing, so the hub server and the CLI's
light commands never load torch or timm. ``surgery.NAME`` imports the module that defines NAME on first use.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("timm-surgery")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AdapterError": "surgery.errors",
    "DataError": "surgery.errors",
    "HeadError": "surgery.errors",
    "HubError": "surgery.errors",
    "ModelError": "surgery.errors",
    "NoMatchingParameterError": "surgery.errors",
    "NothingTrainableError": "surgery.errors",
    "RecipeError": "surgery.errors",
    "SurgeryError": "surgery.errors",
    "fingerprint": "surgery.adapter",
    "load": "surgery.adapter",
    "merge": "surgery.adapter",
    "save_adapter": "surgery.adapter",
    "apply": "surgery.apply",
    "apply_plan": "surgery.apply",
    "push": "surgery.adapter",
    "push_folder": "surgery.adapter",
    "build_model": "surgery.models",
    "HeadChange": "surgery.plan",
    "NormChange": "surgery.plan",
    "ParamPlan": "surgery.plan",
    "Plan": "surgery.plan",
    "plan": "surgery.plan",
    "LoadedRecipe": "surgery.recipe",
    "builtin_recipes": "surgery.recipe",
    "load_recipe": "surgery.recipe",
    "with_num_classes": "surgery.recipe",
    "with_head_classes": "surgery.recipe",
    "RecipePlan": "surgery.render",
    "plan_recipe": "surgery.render",
    "DataSpec": "surgery.recipe",
    "HeadSpec": "surgery.recipe",
    "HubSpec": "surgery.recipe",
    "LayerRange": "surgery.recipe",
    "ModelSpec": "surgery.recipe",
    "OptimSpec": "surgery.recipe",
    "Recipe": "surgery.recipe",
    "Rule": "surgery.recipe",
    "StageSpec": "surgery.recipe",
    "SurgerySpec": "surgery.recipe",
    "TrainSpec": "surgery.recipe",
    "json_schema": "surgery.recipe",
    "LoraSpec": "surgery.lora",
    "MultiAdapterModel": "surgery.lora",
    "load_peft": "surgery.lora",
    "save_peft": "surgery.lora",
    "train": "surgery.train",
    "EvalResult": "surgery.metrics",
    "evaluate": "surgery.evaluation",
    "Prediction": "surgery.predict",
    "predict": "surgery.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Importing ``surgery.plan`` (the module) makes Python set ``surgery.plan``; the function of that name keeps it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            return  # plan, apply, train: `from surgery.plan import ...` still works through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from surgery.adapter import fingerprint, load, merge, push, push_folder, save_adapter  # noqa: F401
    from surgery.apply import apply, apply_plan  # noqa: F401
    from surgery.errors import (  # noqa: F401
        AdapterError,
        DataError,
        HeadError,
        HubError,
        ModelError,
        NoMatchingParameterError,
        NothingTrainableError,
        RecipeError,
        SurgeryError,
    )
    from surgery.evaluation import evaluate  # noqa: F401
    from surgery.lora import LoraSpec, MultiAdapterModel, load_peft, save_peft  # noqa: F401
    from surgery.metrics import EvalResult  # noqa: F401
    from surgery.models import build_model  # noqa: F401
    from surgery.plan import HeadChange, NormChange, ParamPlan, Plan, plan  # noqa: F401
    from surgery.predict import Prediction, predict  # noqa: F401
    from surgery.recipe import (  # noqa: F401
        DataSpec,
        HeadSpec,
        HubSpec,
        LayerRange,
        LoadedRecipe,
        ModelSpec,
        OptimSpec,
        Recipe,
        Rule,
        StageSpec,
        SurgerySpec,
        TrainSpec,
        builtin_recipes,
        json_schema,
        load_recipe,
        with_head_classes,
        with_num_classes,
    )
    from surgery.render import RecipePlan, plan_recipe  # noqa: F401
    from surgery.train import train  # noqa: F401
