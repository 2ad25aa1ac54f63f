"""The recipe schema: every key a recipe file may hold, its type, default and meaning.

This is the one place a recipe key is defined. The loader (``surgery.recipe.load``) validates files against it, the JSON
Schema printed by ``surgery schema`` comes from it, and ``docs/recipes.md`` is generated from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from surgery.paths import PATH_FORMAT

__all__ = [
    "SCHEDULERS",
    "DataSpec",
    "EarlyStopping",
    "HeadSpec",
    "HubSpec",
    "LayerRange",
    "LoraSpec",
    "ModelSpec",
    "OptimSpec",
    "PositiveFloat",
    "Recipe",
    "Rule",
    "Selector",
    "StageSpec",
    "SurgerySpec",
    "TrainSpec",
    "json_schema",
]

PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelSpec(_Section):
    """Which model to build when the recipe is run from the command line: a model (`name`), or a trained adapter to
    continue from (`adapter`)."""

    name: str | None = Field(
        None,
        description="timm model name (`resnet50`), `hf-hub:org/name[@rev]`, `local-dir:/path` (timm's own references) "
        "or `torchvision:resnet18` for a torchvision classification model. Required unless `adapter` is set.",
    )
    adapter: str | None = Field(
        None,
        description="Continue training from an adapter: a folder (a run's output or an adapter folder; relative to "
        "the recipe file) or `hf-hub:org/name[@rev]`. The model is the adapter loaded onto the base it records "
        "(`surgery.load`, fingerprint checked), with its heads, LoRA layers and data config; this recipe's surgery "
        "and training continue from there. The new adapter records this one (pinned to its commit) as its base. Not "
        "with `name`, `pretrained` or `kwargs`; `checkpoint` is then the base's local checkpoint when the adapter "
        "names one.",
    )
    pretrained: bool = Field(False, description="Load the pretrained weights timm knows for this reference.")
    checkpoint: str | None = Field(
        None,
        description="A `.safetensors` file of weights loaded after the model is built (strict; never pickle). "
        "A relative path is relative to the recipe file that sets it.",
        json_schema_extra={"format": PATH_FORMAT},
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra arguments for `timm.create_model`, such as `img_size`, `drop_rate` or `in_chans`.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.adapter is None:
            if self.name is None:
                raise ValueError("'name' is required: a timm model name, or set 'adapter' to continue from one")
            return self
        if self.name is not None:
            raise ValueError(
                "set either 'name' (a model) or 'adapter' (continue from a trained adapter), not both; the adapter "
                "records its base"
            )
        if self.pretrained or self.kwargs:
            raise ValueError(
                "'adapter' builds the base it records: remove 'pretrained' and 'kwargs' (they belong to a 'name')"
            )
        return self

    @property
    def label(self) -> str:
        """What the model is, for messages and folder names: the name, or ``adapter:REF``."""
        return self.name if self.name is not None else f"adapter:{self.adapter}"


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

    _where: str | None = PrivateAttr(None)
    """Where the rule is written when it is not at its index of ``surgery.rules`` (a stage's rule): errors name it."""

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

    num_classes: int | None = Field(
        None,
        ge=1,
        description="Number of outputs of the new head. Unset: the class count of the training data "
        "(`surgery train`), `--num-classes N` or `num_classes=N` in the Python API.",
    )
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


class LoraSpec(_Section):
    """LoRA adapters (PEFT's `LoraConfig`) on chosen layers of the backbone; the rest of the backbone starts frozen.

    The LoRA weights start trainable, every base weight frozen; `surgery.rules` then apply to both as to any parameter
    (`unfreeze: '*.bias'` is BitFit with LoRA; `select` with `lr_mult` and `optim.layer_decay` set their lr; LoRA
    weights are named `<module>.lora_A.default.weight` / `lora_B`, so `'*.lora_*'` selects them all). New heads train
    whole (PEFT `modules_to_save`). A base parameter other than a bias cannot train with LoRA: a PEFT adapter could
    not carry it. The run's folder holds PEFT's `adapter_config.json` and `adapter_model.safetensors` too.
    """

    targets: Selector = Field(
        description="Modules to adapt, by module name: glob patterns (`blocks.*.attn.qkv`), `re:` regular "
        "expressions, `!pattern` to exclude, or a layer range `{from, to, which}` (every Linear/Conv of those "
        "layers). A pattern must match only modules LoRA can adapt (Linear, Conv1d/2d/3d with groups=1, "
        "Embedding); new heads are never targets (they train whole).",
    )
    rank: int = Field(8, ge=1, description="Rank `r` of the low-rank update.")
    alpha: float | None = Field(
        None,
        gt=0,
        description="Scaling numerator `lora_alpha`: the update is scaled by alpha/rank "
        "(alpha/sqrt(rank) with `use_rslora`). Unset: equal to `rank` (scale 1).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input (`lora_dropout`).")
    use_dora: bool = Field(False, description="DoRA: also learn each adapted weight's magnitude (PEFT `use_dora`).")
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/sqrt(rank) (`use_rslora`).")
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="Initialization of the LoRA weights: `default` (Kaiming A, zero B: training starts from the "
        "base model exactly) or `gaussian` (Gaussian A scaled by the rank, zero B). PEFT's data- or SVD-based "
        "inits (PiSSA, OLoRA, EVA, CorDA, LoftQ) change the base weights, so an adapter could no longer be "
        "shared over the plain base; they are not offered.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Biases that train and are saved with the adapter (PEFT `bias`): `none`, `all` (BitFit "
        "together with LoRA) or `lora_only` (biases of adapted modules).",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="A different rank for some targets: module pattern (glob or `re:`, as in `targets`) -> rank. "
        "Each pattern must match at least one target.",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict,
        description="A different alpha for some targets: module pattern -> alpha.",
    )

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [k for k, v in value.items() if isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"rank_pattern[{bad[0]!r}] must be a rank >= 1")
        return value

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas_positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if v <= 0]
        if bad:
            raise ValueError(f"alpha_pattern[{bad[0]!r}] must be > 0")
        return value


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
    lora: LoraSpec | None = Field(
        None,
        description="LoRA adapters on the backbone (PEFT): `targets` (module selectors), `rank`, `alpha`, "
        "`dropout`, ... Base weights start frozen, LoRA weights trainable, then `rules` apply. See docs/lora.md.",
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
    momentum: float | None = Field(
        None,
        ge=0,
        description="Momentum of optimizers that have one (`sgd`, `momentum`, `rmsprop`...). Unset: timm's default, "
        "0.9. `surgery plan` prints the resolved optimizer with every argument.",
    )
    nesterov: bool | None = Field(
        None,
        description="Nesterov momentum for `sgd`. Unset: timm's default for the name (`sgd`: true, off when "
        "`momentum: 0`; `momentum`: false).",
    )
    decay_norm_and_bias: bool = Field(
        False, description="Apply weight decay to 1-D parameters (norm weights, biases) and `no_weight_decay()` names."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra optimizer arguments (`momentum`, `betas`).")


class StageSpec(_Section):
    """One stage of training (fastai's `fine_tune`, Lightning's `BackboneFinetuning`): its epochs, extra rules, lr.

    A stage's rules come after the recipe's `surgery.rules` and its heads, and are planned on the model as it is when
    the stage starts. Newly trainable parameters join the optimizer; those already training keep their state.
    """

    name: str | None = Field(None, description="A label for logs and metrics (default `stage<i>`).")
    epochs: int = Field(ge=1, description="Number of epochs of this stage.")
    rules: list[Rule] = Field(
        default_factory=list,
        description="Freeze/unfreeze/select rules applied after `surgery.rules` and the heads, for this stage only "
        "(e.g. `[{unfreeze: '*'}]` to train everything).",
    )
    lr: PositiveFloat | None = Field(
        None, description="Base learning rate of this stage, replacing `optim.lr` (rules' `lr_mult` apply to it)."
    )


MONITOR_TYPE = Literal[
    "val_top1",
    "val_loss",
    "val_macro_f1",
    "val_balanced_acc",
    "val_top5",
    "ema_val_top1",
    "ema_val_loss",
    "ema_val_macro_f1",
    "ema_val_balanced_acc",
    "ema_val_top5",
]


class EarlyStopping(_Section):
    """`train.early_stopping`: when to give up on a run whose monitored metric no longer improves."""

    patience: int = Field(ge=1, description="Evaluations without improvement before training stops.")
    min_delta: float = Field(
        0.0, ge=0, description="The least change of `train.monitor` that counts as an improvement."
    )


SCHEDULERS = ("cosine", "step", "multistep", "tanh", "poly", "constant", "none")


class TrainSpec(_Section):
    """Training settings (read by `surgery train`)."""

    epochs: int = Field(1, ge=0, description="Number of epochs (when `stages` is empty).")
    batch_size: int = Field(32, ge=1, description="Batch size per process.")
    seed: int = Field(0, description="Random seed for head initialization, data order and augmentation.")
    stages: list[StageSpec] = Field(
        default_factory=list,
        description="Training stages run in order, each with its own epochs, rules and schedule; replaces `epochs`. "
        "E.g. `[{epochs: 1}, {epochs: 3, rules: [{unfreeze: '*'}], lr: 1e-4}]` (fastai's fine_tune).",
    )
    sched: str = Field(
        "cosine",
        description="Learning-rate schedule by timm name: `cosine`, `step`, `multistep`, `tanh`, `poly`, `constant` "
        "or `none`. Each stage gets its own schedule over its epochs, stepped every optimizer update.",
    )
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warmup at the start of each stage, in epochs.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup in optimizer updates (instead of `warmup_epochs`)."
    )
    warmup_lr: float = Field(1e-6, ge=0, description="Learning rate at the first warmup update.")
    min_lr: float = Field(0.0, ge=0, description="Lowest learning rate of decaying schedules (`cosine`, `tanh`).")
    decay_epochs: float = Field(30.0, gt=0, description="Epochs between decays (`step`).")
    decay_milestones: list[int] = Field(
        default_factory=lambda: [30, 60, 90], description="Epochs at which the lr decays (`multistep`)."
    )
    decay_rate: float = Field(0.1, gt=0, description="Multiplier at each decay (`step`, `multistep`).")
    grad_accum_steps: int = Field(1, ge=1, description="Batches whose gradients add up before each optimizer update.")
    clip_grad_norm: PositiveFloat | None = Field(None, description="Clip the gradients' global norm to this value.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision. `auto`: what Accelerate's config or `accelerate launch --mixed_precision` "
        "says (default `no`); `bf16` also works on CPUs that support it.",
    )
    deterministic: bool = Field(
        False, description="Use only deterministic algorithms (`torch.use_deterministic_algorithms`), for exact resume."
    )
    loss: Literal["auto", "cross_entropy", "bce"] = Field(
        "auto",
        description="Loss: `cross_entropy`, or `bce` (binary cross-entropy on one logit, targets 0/1). `auto`: "
        "`bce` when the model has a single output, `cross_entropy` otherwise.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Label smoothing of the cross-entropy loss (with `mixup`/`cutmix`, timm's `Mixup` smooths the "
        "mixed targets instead).",
    )
    class_weights: Literal["none", "auto"] | list[Annotated[float, Field(ge=0)]] = Field(
        "none",
        description="Per-class loss weights for imbalanced data. `auto`: inverse class frequency of the training "
        "data (scikit-learn's `balanced`: `n_samples / (n_classes * count)`); a list: one weight per class in class "
        "order; `none`: unweighted. A one-logit (bce) model gets `pos_weight = w[1] / w[0]`. Evaluation is unweighted.",
    )
    mixup: float = Field(
        0.0, ge=0, description="Mixup alpha (timm's `Mixup`, with `SoftTargetCrossEntropy`); 0 turns mixup off."
    )
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (timm's `Mixup`); 0 turns CutMix off.")
    mixup_prob: float = Field(
        1.0, ge=0, le=1, description="Probability of mixing a batch when `mixup` or `cutmix` is on."
    )
    mixup_switch_prob: float = Field(
        0.5, ge=0, le=1, description="Probability of CutMix instead of mixup when both are on."
    )
    monitor: MONITOR_TYPE = Field(
        "val_top1",
        description="The evaluation metric that picks the best epoch (`train.keep_best`) and drives "
        "`train.early_stopping`: `val_top1`, `val_loss`, `val_macro_f1`, `val_balanced_acc`, `val_top5` (more than "
        "5 classes) or the `ema_val_*` of `train.ema`. Losses are minimised, the others maximised.",
    )
    keep_best: bool = Field(
        False,
        description="Save the weights of the best evaluated epoch (by `train.monitor`) in `best/` beside the last "
        "state; the adapter and the top-level numbers of `metrics.json` then come from that epoch "
        "(`metrics.json` says which: `selected`). Needs validation data.",
    )
    early_stopping: EarlyStopping | None = Field(
        None,
        description="Stop when `train.monitor` has not improved by more than `min_delta` for `patience` evaluations "
        "in a row, e.g. `{patience: 3, min_delta: 0.001}`. Needs validation data.",
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the weights (timm ModelEmaV3).")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="Decay of the weight average.")
    feature_cache: Literal["auto", "off"] = Field(
        "auto",
        description="Linear probes: when only the head trains and the input pipeline is deterministic, compute the "
        "backbone's features once and train the head on them. `auto` does it whenever it is safe.",
    )
    eval_every_epochs: int = Field(
        1, ge=1, description="Evaluate on val every N epochs; the last epoch of training is always evaluated."
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Also save a checkpoint every N optimizer updates (one is saved every epoch)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints to keep.")
    find_unused_parameters: bool = Field(
        False, description="Multi-process only: let DDP tolerate trainable parameters the forward does not use."
    )
    output_dir: str | None = Field(
        None,
        description="Output folder (`--output` overrides it). Default: a new "
        "`output/train/<date>-<time>-<model>-<recipe>`. A relative path is relative to the recipe file that sets it.",
        json_schema_extra={"format": PATH_FORMAT},
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="Train in the channels-last memory format. `auto`: on for convnets (a Conv2d with a kernel larger "
        "than 1 that is not a patch embedding, i.e. whose stride differs from its kernel), off otherwise (ViTs, MLPs).",
    )
    compile: bool = Field(False, description="Compile the trained module with `torch.compile`.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.sched not in SCHEDULERS:
            raise ValueError(f"unknown sched {self.sched!r}; use one of {', '.join(SCHEDULERS)}")
        if self.warmup_steps is not None and self.warmup_epochs:
            raise ValueError("set either 'warmup_epochs' or 'warmup_steps', not both")
        if self.stages and "epochs" in self.model_fields_set:
            raise ValueError("'epochs' and 'stages' both given: stages carry their own epochs; remove 'epochs'")
        if self.mixup or self.cutmix:
            if self.batch_size % 2:
                raise ValueError(
                    f"mixup/cutmix pair each sample with another of its batch: make batch_size even "
                    f"(got {self.batch_size})"
                )
            if self.class_weights != "none":
                raise ValueError(
                    "class_weights do not combine with mixup/cutmix (timm's SoftTargetCrossEntropy has no weights); "
                    "use data.sampler: balanced, or turn mixup and cutmix off"
                )
        return self

    @property
    def mixing(self) -> bool:
        """Whether mixup or CutMix is on."""
        return bool(self.mixup or self.cutmix)

    @property
    def total_epochs(self) -> int:
        """Epochs over all stages."""
        return sum(s.epochs for s in self.stages) if self.stages else self.epochs


class DataSpec(_Section):
    """Where the training data comes from (read by `surgery train`)."""

    root: str | None = Field(
        None,
        description="Folder with `train/` and `val/`, one subfolder per class. A relative path is relative to the "
        "recipe file that sets it.",
        json_schema_extra={"format": PATH_FORMAT},
    )
    train_dir: str = Field("train", description="Training images, one subfolder per class, under `root`.")
    val_dir: str = Field("val", description="Validation images, the same class subfolders, under `root`.")
    test_dir: str | None = Field(
        None,
        description="Test images, the same class subfolders, under `root`; evaluated once at the end of training "
        "(with the weights the adapter holds and the validation transform) into `test_*` numbers of "
        "`metrics.json`. Unset: no test split.",
    )
    sampler: Literal["random", "balanced"] = Field(
        "random",
        description="Training order: `random` (a shuffle per epoch) or `balanced` (each epoch draws as many samples "
        "with replacement, every class equally likely, as PyTorch's `WeightedRandomSampler`).",
    )
    img_size: int | None = Field(
        None, ge=1, description="Input size (square), overriding the model's `pretrained_cfg` input size."
    )
    augment: Literal["none", "light", "strong"] = Field(
        "light",
        description="Training augmentation: `none` (resize and center crop, deterministic), `light` (random resized "
        "crop and flip) or `strong` (adds RandAugment and random erasing).",
    )
    skip_bad_images: bool = Field(False, description="Leave undecodable images out instead of stopping with an error.")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Data-loading worker processes per training process. `auto`: min(CPU count // training "
        "processes on the machine - 1, 4), so 0 when the training processes use every core; workers are persistent, "
        "and memory is pinned on CUDA.",
    )
    # labels CSV files (surgery.data.labels): instead of class folders under `root`
    train_csv: str | None = Field(
        None,
        description="Labels CSV of the training images instead of class folders: a `path,label` header, then one row "
        "per image; a path is relative to the CSV's folder, a label is a class name or an index from 0. A relative "
        "path to the CSV is relative to the recipe file that sets it. Needs `val_csv`; not with `root`.",
        json_schema_extra={"format": PATH_FORMAT},
    )
    val_csv: str | None = Field(
        None,
        description="Labels CSV of the validation images (same format and classes as `train_csv`).",
        json_schema_extra={"format": PATH_FORMAT},
    )
    test_csv: str | None = Field(
        None,
        description="Labels CSV of held-out test images (same format and classes as `train_csv`): evaluated once at "
        "the end of training into the `test_*` numbers of `metrics.json`, as `test_dir` is, and read by "
        "`surgery eval RUN --split test`.",
        json_schema_extra={"format": PATH_FORMAT},
    )
    target_column: str | None = Field(
        None,
        description="Labels CSV column holding a number per image (a score) instead of `label`; `label_threshold` "
        "turns it into 2 classes: `0` below the threshold, `1` at or above it.",
    )
    label_threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="The threshold that makes classes of `target_column` (needs `target_column`).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.root is not None and (self.train_csv is not None or self.val_csv is not None):
            raise ValueError("set either 'root' (class folders) or 'train_csv'/'val_csv' (labels files), not both")
        if (self.train_csv is None) != (self.val_csv is None):
            given, other = ("train_csv", "val_csv") if self.train_csv is not None else ("val_csv", "train_csv")
            raise ValueError(f"'{given}' needs '{other}' too: training reads both labels files")
        if self.test_dir is not None and self.test_csv is not None:
            raise ValueError("set either 'test_dir' (a class folder) or 'test_csv' (a labels file), not both")
        if (self.target_column is None) != (self.label_threshold is None):
            raise ValueError(
                "'target_column' and 'label_threshold' go together: the threshold turns the column's numbers into "
                "classes; set both or neither"
            )
        return self


class HubSpec(_Section):
    """Where `surgery train` pushes the result (the main process only, one commit, at the end of training).

    The hub is `HF_ENDPOINT` (default huggingface.co) and the token `HF_TOKEN`, as for every Hugging Face tool.
    """

    repo: str | None = Field(
        None,
        pattern=r"^(hf-hub:)?[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="`org/name` to push the adapter to at the end of training (created if missing). "
        "No push when unset.",
    )
    private: bool = Field(False, description="Create the repo as private (only used when it does not exist yet).")
    revision: str | None = Field(None, description="Branch to push to, created from `main` if missing (default main).")
    message: str | None = Field(None, description="Commit message. Default: `Upload <folder> with timm-surgery`.")


class Recipe(_Section):
    """A whole recipe file. `extends:` (one or more parent recipes) is resolved by the loader before validation.

    Paths: a relative path (`model.checkpoint`, `data.root`, `data.*_csv`, `train.output_dir`, a `local-dir:` model)
    is relative to the folder of the recipe file that writes it, also when that file is a parent reached through
    `extends:`. In a mapping (the Python API) or a command-line override (`data.root=...`) it is relative to the
    working folder. `~` is expanded. A loaded recipe holds absolute paths only.
    """

    description: str | None = Field(None, description="What this recipe is for; shown by `surgery plan`.")
    model: ModelSpec | None = Field(None, description="The model to build (optional in the Python API).")
    surgery: SurgerySpec = Field(default_factory=SurgerySpec, description="Freeze rules, heads, norm policy.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer, learning rates, layer decay.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training loop settings.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    hub: HubSpec = Field(default_factory=HubSpec, description="Pushing results to a hub.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value  # `model: resnet50` means `model: {name: ...}`


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
