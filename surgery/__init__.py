"""timm-surgery: recipe-driven model surgery for timm backbones.

A recipe says what to freeze, which heads to replace and which learning rate each layer gets. :func:`plan` resolves
it against a model without touching it; :func:`apply` makes it real and returns the same plan, whose
``param_groups()`` feed any torch optimizer.

    >>> import timm, surgery
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> p = surgery.apply(model, "linear-probe", )  # doctest: +SKIP
"""

from surgery.adapter import fingerprint, load, merge, save_adapter
from surgery.apply import apply, apply_plan
from surgery.errors import (
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
from surgery.hub import push, push_folder
from surgery.models import build_model
from surgery.plan import HeadChange, NormChange, ParamPlan, Plan, plan
from surgery.recipe import builtin_recipes, load_recipe
from surgery.schema import HeadSpec, LayerRange, ModelSpec, OptimSpec, Recipe, Rule, SurgerySpec, json_schema
from surgery.train import train

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "DataError",
    "HeadChange",
    "HeadError",
    "HeadSpec",
    "HubError",
    "LayerRange",
    "ModelError",
    "ModelSpec",
    "NoMatchingParameterError",
    "NormChange",
    "NothingTrainableError",
    "OptimSpec",
    "ParamPlan",
    "Plan",
    "Recipe",
    "RecipeError",
    "Rule",
    "SurgeryError",
    "SurgerySpec",
    "apply",
    "apply_plan",
    "build_model",
    "builtin_recipes",
    "fingerprint",
    "json_schema",
    "load",
    "load_recipe",
    "merge",
    "plan",
    "train",
    "push",
    "push_folder",
    "save_adapter",
]
