"""The recipe schema: every key a recipe file may hold, its type, default and meaning.

This is the one place a recipe key is defined. The loader (``surgery.recipe``) validates files against it, the JSON
Schema printed by ``surgery schema`` comes from it, and ``docs/recipes.md`` is generated from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelSpec(_Section):
    """Which model to build when the recipe is run from the command line."""

    name: str = Field(
        description="timm model name (`resnet50`), `hf-hub:org/name[@rev]`, `local-dir:/path` (timm's own references) "
        "or `torchvision:resnet18` for a torchvision classification model.",
    )
    pretrained: bool = Field(False, description="Load the pretrained weights timm knows for this reference.")
    checkpoint: str | None = Field(
        None,
        description="A `.safetensors` file of weights loaded after the model is built (strict; never pickle). "
        "Relative paths are relative to the recipe file.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra arguments for `timm.create_model`, such as `img_size`, `drop_rate` or `in_chans`.",
    )


class LayerRange(_Section):
    """Keras-style layer selection (`freeze_weights(from, to, which)`) over the model's layers.

    Layers are timm's parameter groups from `group_matcher()` (stem, each block, head) or, for other models, the
    top-level children that hold parameters. Indices start at 0 and may be negative; names are layer names or module
    paths inside a layer.
    """

    from_: int | str | None = Field(None, alias="from", description="First layer (inclusive), by index or name.")
    to: int | str | None = Field(None, description="Last layer (inclusive), by index or name.")
    which: list[int | str] | SkipJsonSchema[Callable[[int, str], bool]] | None = Field(
        None,
        description="Only these layers, by index or name. In the Python API also a predicate `f(index, name) -> bool`.",
    )

    @model_validator(mode="after")
    def _not_empty(self) -> LayerRange:
        if self.from_ is None and self.to is None and self.which is None:
            raise ValueError("a layer range needs at least one of 'from', 'to' or 'which'")
        return self


Selector = str | list[str] | LayerRange
"""Parameters to act on: glob patterns over parameter names (`layer4.*`, a module path such as `fc`), `re:` regular
expressions, `!` negation, or a Keras-style layer range."""

_SELECTOR_HELP = (
    "Glob pattern(s) over parameter names or module paths (`layer4`, `blocks.1*`), `re:` regular expressions "
    "(searched; anchor with ^ and $), `!pattern` to exclude, or a layer range `{from, to, which}`."
)


class Rule(_Section):
    """One step of the surgery. Rules apply in order; for each parameter, the last rule that selects it wins."""

    freeze: Selector | None = Field(
        None, description="Freeze these parameters (requires_grad=False). " + _SELECTOR_HELP
    )
    unfreeze: Selector | None = Field(None, description="Make these parameters trainable. " + _SELECTOR_HELP)
    select: Selector | None = Field(
        None, description="Select parameters only to set `lr`, `lr_mult` or `weight_decay`. " + _SELECTOR_HELP
    )
    lr: PositiveFloat | None = Field(None, description="Absolute learning rate for the selected parameters.")
    lr_mult: PositiveFloat | None = Field(None, description="Multiply the selected parameters' learning rate.")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay for the selected parameters.")
    name: str | None = Field(None, description="A label shown in the plan instead of the rule's position.")

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        given = [k for k in ("freeze", "unfreeze", "select") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a rule needs exactly one of 'freeze', 'unfreeze' or 'select'"
                + (f" (got {', '.join(given)}); split it into separate rules" if given else "")
            )
        if given == ["select"] and self.lr is None and self.lr_mult is None and self.weight_decay is None:
            raise ValueError("a 'select' rule does nothing without 'lr', 'lr_mult' or 'weight_decay'")
        return self

    @property
    def action(self) -> Literal["freeze", "unfreeze", "select"]:
        """Which of the three actions this rule performs."""
        return "freeze" if self.freeze is not None else "unfreeze" if self.unfreeze is not None else "select"

    @property
    def selector(self) -> Selector:
        """The selection, whichever action carries it."""
        return getattr(self, self.action)


class HeadSpec(_Section):
    """A new classifier head replacing an existing module. New heads are trainable (the seed's transfer learning)."""

    num_classes: int = Field(ge=1, description="Number of outputs of the new head.")
    type: Literal["linear", "mlp"] = Field("linear", description="`linear`, or `mlp` with `hidden` layers.")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="Hidden sizes of an `mlp` head, e.g. `[512, 256]`."
    )
    act: Literal["relu", "gelu", "silu", "tanh"] = Field("gelu", description="Activation between `mlp` layers.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer of an `mlp` head.")
    norm: Literal["none", "layernorm", "batchnorm"] = Field("none", description="Norm after each hidden layer.")
    init_std: float = Field(0.02, gt=0, description="Weights start trunc-normal with this std, as timm's heads.")
    init_scale: float = Field(
        1.0, gt=0, description="Multiply the initial weights of the last layer (timm's `head_init_scale`)."
    )
    init_bias: float = Field(0.0, description="Initial value of the output bias.")
    trainable: bool = Field(True, description="Train the new head. `false` keeps it at its initialization.")
    lr: PositiveFloat | None = Field(None, description="Absolute learning rate of the head's parameters.")
    lr_mult: PositiveFloat | None = Field(None, description="Multiply the head's learning rate.")

    @model_validator(mode="after")
    def _mlp_needs_hidden(self) -> HeadSpec:
        if self.type == "mlp" and not self.hidden:
            raise ValueError("an 'mlp' head needs 'hidden' sizes, e.g. hidden: [256]; or use type: linear")
        if self.type == "linear" and self.hidden:
            raise ValueError("'hidden' only applies to type: mlp; set type: mlp or remove 'hidden'")
        if self.type == "linear" and (self.dropout or self.norm != "none"):
            raise ValueError("'dropout' and 'norm' apply to mlp heads; for a linear head use model.kwargs.drop_rate")
        return self


class SurgerySpec(_Section):
    """What to freeze, what to replace and how norm layers behave."""

    rules: list[Rule] = Field(
        default_factory=list,
        description="Freeze/unfreeze/select rules applied in order; the last rule that selects a parameter wins. "
        "A child recipe's rules come after its parents'.",
    )
    heads: dict[str, HeadSpec] = Field(
        default_factory=dict,
        description="New heads keyed by what they replace: `classifier` (timm's `pretrained_cfg['classifier']`, "
        "every module of a tuple classifier such as DeiT-distilled's `head`/`head_dist`) or a module path "
        "(`fc`, `head.fc`, `6` in an `nn.Sequential`). Applied after `rules`.",
    )
    norm: Literal["auto", "frozen", "eval", "train"] = Field(
        "auto",
        description="BatchNorm policy. `auto`: running statistics fixed wherever the BatchNorm's parameters are "
        "frozen. `frozen`: those layers become timm's FrozenBatchNorm (statistics and affine fixed). `eval`: "
        "statistics fixed in every BatchNorm, affine follows the rules. `train`: statistics update everywhere, "
        "even in frozen layers.",
    )


class OptimSpec(_Section):
    """Optimizer settings. The plan turns them into the real `lr` and `weight_decay` of each param group."""

    name: str = Field("adamw", description="Optimizer name for `timm.optim.create_optimizer_v2` (`adamw`, `sgd`, ...).")
    lr: PositiveFloat = Field(1e-3, description="Base learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="Base weight decay.")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay: layer i of n gets `lr * layer_decay ** (n - 1 - i)` (timm's groups).",
    )
    decay_norm_and_bias: bool = Field(
        False, description="Apply weight decay to 1-D parameters (norm weights, biases) and `no_weight_decay()` names."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra optimizer arguments (`momentum`, `betas`).")


class TrainSpec(_Section):
    """Training settings (read by `surgery train`)."""

    epochs: int = Field(1, ge=0, description="Number of epochs.")
    batch_size: int = Field(32, ge=1, description="Batch size per process.")
    seed: int = Field(0, description="Random seed for head initialization, data order and augmentation.")


class DataSpec(_Section):
    """Where the training data comes from (read by `surgery train`)."""

    root: str | None = Field(None, description="Folder with `train/` and `val/`, one subfolder per class.")


class HubSpec(_Section):
    """Where `surgery train` pushes the result."""

    repo: str | None = Field(None, description="`org/name` to push the adapter to at the end of training.")


class Recipe(_Section):
    """A whole recipe file. `extends:` (one or more parent recipes) is resolved by the loader before validation."""

    description: str | None = Field(None, description="What this recipe is for; shown by `surgery plan`.")
    model: ModelSpec | None = Field(None, description="The model to build (optional in the Python API).")
    surgery: SurgerySpec = Field(default_factory=SurgerySpec, description="Freeze rules, heads, norm policy.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer, learning rates, layer decay.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training loop settings.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    hub: HubSpec = Field(default_factory=HubSpec, description="Pushing results to a hub.")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file, for editors (yaml-language-server) and validation elsewhere."""
    schema = Recipe.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "timm-surgery recipe"
    schema.setdefault("properties", {})["extends"] = {
        "description": "Parent recipe(s): relative paths or built-in recipe names, merged in order, then this file.",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    return schema
