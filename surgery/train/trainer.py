"""The Accelerate trainer: :func:`train` sets a run up, fits it stage by stage and cleans up.

One loop for one process or many (``accelerate launch``): Accelerate's config decides processes and mixed precision;
only the main process writes files, logs and progress. Stage 0 is planned and applied to the model through
:func:`surgery.stages.plan_stage` (the one stage replay), the plan's param groups go to a timm optimizer as they are,
and each later stage is planned by the same function on the model as it is and updates the optimizer.

Exact resume (:mod:`surgery.train.seeding`): randomness is a function of (seed, epoch, batch), so a checkpoint
(Accelerate's state plus :class:`~surgery.train.state.TrainState`) resumes to exactly the weights an uninterrupted
run reaches (deterministic mode). The run folder's files are named in :mod:`surgery.train.run_folder`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from surgery import stages
from surgery.errors import DataError, HeadError, RecipeError, SurgeryError
from surgery.optim import build_optimizer, build_scheduler, current_lrs, set_param_groups
from surgery.plan import Plan, RecipeLike
from surgery.recipe import LoadedRecipe, load_recipe, resolved_data, with_num_classes
from surgery.train import checkpoints, feature_cache, run_folder
from surgery.train.evaluate import Loss, evaluate, evaluate_result, split_batch
from surgery.train.seeding import EpochSampler, SeededDataset, balanced_weights, mix, needs_seeding, seed_step
from surgery.train.state import TrainState

__all__ = ["Interrupted", "TrainResult", "default_output_dir", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (unwrapped), its metrics and where the outputs went."""

    model: nn.Module
    metrics: dict[str, Any]
    output_dir: Path | None
    plan: Plan
    class_names: list[str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main_process: bool = True
    skipped_images: list[Path] = field(default_factory=list)
    pushed_url: str | None = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run at an update, after a checkpoint; ``hint`` says how to continue."""

    def __init__(self, step: int, checkpoint: Path | None, is_main_process: bool = True) -> None:
        self.step, self.checkpoint, self.is_main_process = step, checkpoint, is_main_process
        where = f"; checkpoint saved to {checkpoint}, continue with --resume" if checkpoint else ""
        self.hint = f"interrupted at step {step}{where}"
        super().__init__(self.hint)


def _load(recipe: RecipeLike, overrides: Sequence[str]) -> LoadedRecipe:
    if isinstance(recipe, LoadedRecipe) and not overrides:
        return recipe
    return load_recipe(recipe, overrides)  # type: ignore[arg-type]


def default_output_dir(recipe: LoadedRecipe) -> Path:
    """``train.output_dir``, else a fresh ``output/train/<date>-<time>-<model>-<recipe>`` (as timm's train.py)."""
    if recipe.train.output_dir:
        return Path(recipe.train.output_dir)
    stem = Path(recipe.source).stem if not recipe.source.startswith("<") else None
    return run_folder.default_output_dir(recipe.model.label if recipe.model else None, stem)


def train(
    recipe: RecipeLike,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | DataLoader | None = None,
    val_data: Dataset | DataLoader | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    num_classes: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Apply ``recipe`` to ``model`` (built from ``recipe.model`` when None) and train it; see the module docstring.

    ``train_data``/``val_data`` are Datasets or DataLoaders yielding ``(inputs, targets)``; when omitted, the image
    folders of ``recipe.data.root`` (or its labels files ``data.train_csv``/``val_csv``) are validated (before
    anything else) and loaded through timm. New heads take their class count from the data (or ``num_classes``); a
    model whose own classifier does not match the data is an error. ``output_dir`` (default
    ``recipe.train.output_dir``; None keeps everything in memory) receives the files of
    :mod:`surgery.train.run_folder` and the adapter. ``resume=True`` continues from the newest checkpoint there (an
    error when there is none); ``overwrite=True`` replaces an earlier run in that folder.
    """
    loaded = _load(recipe, overrides)
    trainer = Trainer(loaded, model, train_data, val_data, output_dir, resume, overwrite, num_classes, progress)
    return trainer.run()


def _make_accelerator(recipe: LoadedRecipe, out: Path | None):  # noqa: ANN202 - accelerate is imported lazily
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    spec = recipe.train
    # On a machine without GPUs, `accelerate launch --multi_gpu` starts several processes but Accelerate would run
    # each alone; cpu=True makes them one gloo group.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    log_with = None
    project = None
    if out is not None:
        log_with = [_jsonl_tracker(out / run_folder.METRICS_LOG), "tensorboard"]
        project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / run_folder.LOGS))
    # train.compile: Accelerate's own torch.compile (dynamo) in prepare; unset, its config or launch flag decides
    dynamo = {"dynamo_backend": "inductor"} if spec.compile else {}
    try:
        return Accelerator(
            **dynamo,
            cpu=cpu,
            mixed_precision=None if spec.mixed_precision == "auto" else spec.mixed_precision,
            gradient_accumulation_steps=spec.grad_accum_steps,
            log_with=log_with,
            project_config=project,
            step_scheduler_with_optimizer=False,
            dataloader_config=DataLoaderConfiguration(even_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=spec.find_unused_parameters)],
        )
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"{recipe.where('train', 'mixed_precision')}: Accelerate refused the setup: {first}"
        ) from None


def _jsonl_tracker(path: Path) -> Any:
    """An Accelerate tracker writing one JSON object per ``accelerator.log`` call (``metrics.jsonl``)."""
    from accelerate.tracking import GeneralTracker  # lazy: `import surgery` stays light for `surgery plan`

    class JsonLinesTracker(GeneralTracker):
        name = "jsonl"
        requires_logging_directory = False
        main_process_only = True

        def __init__(self, path: Path) -> None:
            super().__init__()
            self.path = path

        @property
        def tracker(self) -> JsonLinesTracker:
            return self

        def start(self) -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    return JsonLinesTracker(path)


def resolve_num_workers(value: int | str, processes: int = 1) -> int:
    """``data.num_workers``: an int as it is; ``auto`` is this process's share of the machine's cores minus the one
    that trains, at most 4: min(CPU count // processes on this machine - 1, 4), so 0 when the training processes
    already use every core (two processes on two cores). More workers than cores only compete with training, and a
    worker forked from a process that runs gloo's threads is the known DataLoader deadlock (pytorch#130610)."""
    if value != "auto":
        return int(value)
    cpus = os.cpu_count() or 1
    return max(0, min(cpus // max(processes, 1) - 1, 4))


def uses_channels_last(model: nn.Module) -> bool:
    """``train.channels_last: auto``: True for convnets, i.e. a Conv2d with a kernel larger than 1 that is not a patch
    embedding (its stride differs from its kernel); False for ViTs (their one conv is the patchify), MLPs..."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and tuple(m.kernel_size) != tuple(m.stride):
            return True
    return False


def _contiguous_weights(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """Accelerate saves model weights as safetensors, which refuses channels-last tensors: make them contiguous."""
    for state in weights:
        for key, value in state.items():
            state[key] = value.contiguous()


def _group_names(optimizer: torch.optim.Optimizer, plan: Plan) -> list[str]:
    """A name for each optimizer group from the plan's layers (``layer4``, ``stem..layer3``), for the lr logs; groups
    of the same layers with another weight decay get ``_wd<value>``."""
    layer_of = {p.name: p.layer_name for p in plan.parameters}
    names: list[str] = []
    for group in optimizer.param_groups:
        layers = list(dict.fromkeys(layer_of.get(n, "?") for n in group.get("param_names", [])))
        name = (layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}") if layers else f"group{len(names)}"
        if name in names:
            name = f"{name}_wd{group.get('weight_decay', 0):g}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link a best/ file into a checkpoint (the files are never rewritten, only replaced), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _worker_init(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers ignore it, the trainer stops at the next update."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_loader(
    data: Dataset,
    batch_size: int,
    sampler: Sampler | None,
    num_workers: int,
    *,
    training: bool = False,
    full_batches: bool = False,
) -> DataLoader:
    # BatchNorm cannot train on a batch of one sample: drop a lone trailing sample (a different one each epoch, since
    # the order is shuffled) instead of failing at the end of the first epoch. timm's Mixup pairs the samples of a
    # batch and needs an even one: with mixing (full_batches) a short last batch is dropped, as timm's train.py does.
    rest = len(data) % batch_size  # type: ignore[arg-type]
    drop_last = training and len(data) > batch_size and (rest == 1 or (full_batches and rest > 0))  # type: ignore
    # Persistent workers keep their copy of the dataset: a SeededDataset's epoch would not reach them, so workers
    # are started again each epoch for seeded (random) pipelines and kept for deterministic ones.
    persistent = num_workers > 0 and not isinstance(data, SeededDataset)
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=persistent,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


def _recipe_record(recipe: LoadedRecipe) -> dict[str, Any]:
    """The resolved recipe as a checkpoint records it (JSON types; the output folder left out)."""
    data = resolved_data(recipe, predicates="repr")
    data.get("train", {}).pop("output_dir", None)
    return json.loads(json.dumps(data))


def _classifier_outputs(model: nn.Module) -> int | None:
    """Outputs of a timm model's own classifier (``get_classifier()``), or None when it cannot tell."""
    get = getattr(model, "get_classifier", None)  # timm's API; other models are not checked
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # noqa: BLE001 - a model whose get_classifier fails has no classifier to check
        return None
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    outputs = getattr(model, "num_classes", None)
    return outputs if isinstance(outputs, int) and not isinstance(outputs, bool) else None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _format_epoch(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']} ({m['stage']})", f"train_loss {m['train_loss']:.4f}"]
    for key in ("val_loss", "val_top1", "val_top5", "val_macro_f1", "val_balanced_acc", "ema_val_top1"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class Trainer:
    """One run: :meth:`setup` (checks, model, plan, data, optimizer), :meth:`fit` (stages, epochs, checkpoints),
    :meth:`finish` (outputs, adapter, push) and :meth:`cleanup`. :meth:`run` does all four.

    ``model`` is the model being trained (never a wrapper); ``net`` is what Accelerate prepared from it (the whole
    model, or its head on cached features) and ``optimizer`` the prepared optimizer; the plain objects come back
    through ``accelerator.unwrap_model`` and ``optimizer.optimizer``.
    """

    def __init__(
        self,
        recipe: LoadedRecipe,
        model: nn.Module | None,
        train_data: Dataset | DataLoader | None,
        val_data: Dataset | DataLoader | None,
        output_dir: str | os.PathLike | None,
        resume: bool = False,
        overwrite: bool = False,
        num_classes: int | None = None,
        progress: bool = True,
    ) -> None:
        self.recipe, self.spec = recipe, recipe.train
        self.user_model, self.train_data, self.val_data = model, train_data, val_data
        self.custom_data = train_data is not None
        out = output_dir if output_dir is not None else self.spec.output_dir
        self.out: Path | None = Path(out).expanduser() if out is not None else None
        self.resume, self.overwrite, self.num_classes, self.progress = resume, overwrite, num_classes, progress
        self.stages = stages.stage_specs(self.spec)
        self.loss = Loss(self.spec.loss, self.spec.label_smoothing)
        # set up by setup()
        self.acc: Any = None  # accelerate.Accelerator (imported lazily)
        self.checkpoint: checkpoints.Checkpoint | None = None
        self.report: Any = None  # surgery.data.FolderReport of image folders
        self.class_names: list[str] | None = None
        self.data_config: dict[str, Any] | None = None
        self.model: nn.Module | None = None
        self.base_fingerprint: str | None = None
        self.first: Plan | None = None  # stage 0's plan
        self.plan: Plan | None = None  # the current stage's plan
        self.train_ds: Dataset | None = None
        self.val_ds: Dataset | None = None
        self.sampler: EpochSampler | None = None
        self.seeded: SeededDataset | None = None
        self.data_loaders: dict[str, DataLoader] = {}
        self.feature_loaders: dict[str, DataLoader] | None = None
        self.loaders: dict[str, DataLoader] = {}  # the ones the current stage uses
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.ema: Any = None
        self.net: nn.Module | None = None
        self.channels_last = False  # train.channels_last, resolved on the built model
        self.state = TrainState()
        # set while fitting
        self.cache_reason: str | None = "no training"
        self.cache_seconds: float | None = None
        self.epoch_train: dict[str, float] = {}
        self.samples_seen, self.train_seconds = 0, 0.0
        self.interrupted = False
        self.pushed_url: str | None = None
        self.was_deterministic = torch.are_deterministic_algorithms_enabled()
        # evaluation, best epoch, mixing, logs (issue 12)
        self.test_report: Any = None  # FolderReport of data.test_dir/test_csv (its `train` list is the test split)
        self.mixup: Any = None  # timm.data.Mixup (train.mixup / train.cutmix)
        self.best_weights: dict[str, dict[str, torch.Tensor]] | None = None  # train.keep_best, on the CPU
        self.group_names: list[str] = []  # the current optimizer groups, named by the plan's layers (lr logs)
        self.test_metrics: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        """Set up, fit, write the outputs; always clean up."""
        self.setup_checks()
        try:
            self.setup()
            self.fit()
            metrics = self.finish()
        finally:
            self.cleanup()
        assert self.acc is not None and self.model is not None and self.plan is not None
        return TrainResult(
            model=self.model,
            metrics=metrics,
            output_dir=self.out,
            plan=self.plan,
            class_names=self.class_names,
            history=self.state.history,
            is_main_process=self.acc.is_main_process,
            skipped_images=list(self.report.skipped) if self.report is not None else [],
            pushed_url=self.pushed_url,
        )

    def setup_checks(self) -> None:
        """What needs no model: the output folder, the data, the class count, the checkpoint's recipe."""
        if self.out is None:
            if self.resume:
                raise SurgeryError("resume needs an output folder: pass output_dir (--output DIR)")
        else:
            self.checkpoint = checkpoints.latest(self.out)
            run_folder.check_reuse(
                self.out, resume=self.resume, overwrite=self.overwrite, has_checkpoint=self.checkpoint is not None
            )
            if not self.resume:
                self.checkpoint = None  # --overwrite: the earlier run's checkpoints are dropped, not resumed
        self.report = self._validate_data()  # bad data is reported before any model is built or trained
        self.test_report = self._validate_test_data()
        self._check_monitoring()
        self._fill_num_classes()
        self.img_size_note: str | None = None
        if self.user_model is None:  # a fixed-size model (ViT) is built for data.img_size, as `surgery plan` shows
            from surgery.models import fit_img_size

            self.recipe, self.img_size_note = fit_img_size(self.recipe)
        if self.checkpoint is not None:
            self.checkpoint.check_recipe(_recipe_record(self.recipe))
            self.state = self.checkpoint.state

    def setup(self) -> None:
        """Accelerator, seed, model (fingerprinted before surgery), stage 0's plan, data, optimizer, EMA, folder."""
        from accelerate.utils import set_seed

        recipe, spec = self.recipe, self.spec
        self.acc = acc = _make_accelerator(recipe, self.out)
        set_seed(spec.seed, deterministic=spec.deterministic)
        self.model = self._build_model()
        if self.img_size_note:
            log.info(self.img_size_note)
        if self.out is not None:
            from surgery import adapter

            self.base_fingerprint = adapter.fingerprint(self.model)  # the base, before surgery and training
        self.model.to(acc.device)
        self.first = self.plan = stages.plan_stage(self.model, recipe, 0, None)
        wanted = spec.channels_last
        self.channels_last = uses_channels_last(self.model) if wanted == "auto" else bool(wanted)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            acc.register_save_state_pre_hook(_contiguous_weights)
        # every stage's selectors are resolved now, so a typo in a late stage fails before any training
        for index in range(1, len(spec.stages)):
            stages.check_stage_rules(self.model, recipe, index)
        self._check_classifier()
        self._build_data()
        self._build_loss()
        self.optimizer = build_optimizer(self.plan.param_groups(self.model), recipe.optim, where="optim")
        if spec.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=spec.ema_decay)
            acc.register_for_checkpointing(self.ema)
        if self.out is not None and acc.is_main_process:
            self._prepare_folder()
        if self.out is not None:
            acc.init_trackers("tensorboard", config=self._hparams())

    def cleanup(self) -> None:
        """Restore the deterministic-algorithms flag, end the trackers, free Accelerate's references."""
        torch.use_deterministic_algorithms(self.was_deterministic)
        if self.acc is not None:
            # The trackers end here, not the process group (Accelerator.end_training would destroy it): it belongs to
            # the process, and a script under `accelerate launch` may train again or gather results after train()
            # returns. `surgery train` destroys it when the command ends.
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.free_memory()

    # ------------------------------------------------------------------------------------------------ checks
    def _validate_data(self) -> Any:
        if self.train_data is not None:
            return None
        from surgery.data.source import validate_data  # image folders or labels CSV files

        return validate_data(self.recipe)

    def _validate_test_data(self) -> Any:
        """``data.test_dir`` or ``data.test_csv``: checked as train/val are, before training (the report's ``train``
        is the test split)."""
        data = self.recipe.data
        if data.test_csv is not None and self.report is not None:
            from surgery.data.source import validate_test_labels

            return validate_test_labels(data, self.report.class_names)
        if data.test_dir is None:
            return None
        if self.report is None:
            raise RecipeError(
                f"{self.recipe.where('data', 'test_dir')}: a test folder needs image folders (data.root); "
                "with your own datasets evaluate the result yourself, or remove data.test_dir"
            )
        from surgery.data.folders import validate_image_folders

        path = Path(self.report.root) / data.test_dir
        if not path.is_dir():
            raise DataError(
                f"{self.recipe.where('data', 'test_dir')}: test folder '{path}' does not exist; create it with the "
                "same class subfolders as train/, or remove data.test_dir"
            )
        return validate_image_folders(
            self.report.root, train_dir=data.test_dir, val_dir=data.val_dir, skip_bad_images=data.skip_bad_images
        )

    def _check_monitoring(self) -> None:
        """keep_best and early stopping compare evaluations: without validation data they would silently do nothing."""
        spec = self.spec
        wanted = [k for k, on in (("keep_best", spec.keep_best), ("early_stopping", spec.early_stopping)) if on]
        if wanted and self.report is None and self.val_data is None:
            raise RecipeError(
                f"{self.recipe.where('train', wanted[0])}: compares evaluations, and there is no validation data; "
                "pass val_data (or data.root with val/), or remove it"
            )
        if spec.monitor.startswith("ema_") and not spec.ema:
            raise RecipeError(
                f"{self.recipe.where('train', 'monitor')}: {spec.monitor} is the weight average's metric; set "
                f"train.ema: true, or monitor {spec.monitor[4:]}"
            )

    def _data_classes(self) -> tuple[int | None, str]:
        """The data's class count (None when it cannot tell) and how to name where it comes from."""
        if self.report is not None:
            return len(self.report.class_names), self.report.classes_source
        names = getattr(self.train_data, "classes", None)  # torchvision/timm datasets list their classes
        if names:
            return len(names), f"the training data ({len(names)} classes)"
        return None, ""

    def _fill_num_classes(self) -> None:
        """C-num-classes: new heads take ``num_classes`` (``--num-classes``), then the data's count, before planning."""
        if self.num_classes is not None:
            self.recipe = with_num_classes(self.recipe, self.num_classes, source="--num-classes")
        n, source = self._data_classes()
        if n is not None:
            self.recipe = with_num_classes(self.recipe, n, source=source)

    def _check_classifier(self) -> None:
        """A model whose own classifier does not match the data trains a wrong answer: stop, naming the fix."""
        assert self.model is not None and self.first is not None
        n, source = self._data_classes()
        if n is None or self.first.heads:
            return
        outputs = _classifier_outputs(self.model)
        if outputs is None or outputs == n or (outputs == 1 and n == 2):  # one logit: binary cross-entropy
            return
        name = self.recipe.model.label if self.recipe.model else type(self.model).__name__
        raise HeadError(
            f"{self.recipe.where('model')}: {name}'s classifier has {outputs} outputs but {source} has {n} classes; "
            f"add a head sized from the data (surgery.heads.classifier: {{}}), or build the model with "
            f"model.kwargs.num_classes={n} (or pass --num-classes {n})"
        )

    # ------------------------------------------------------------------------------------------------- setup
    def _build_model(self) -> nn.Module:
        if self.user_model is not None:
            return self.user_model
        if self.recipe.model is None:
            raise RecipeError(f"{self.recipe.source}: the recipe has no model: add model.name, or pass model=")
        from surgery.models import build_recipe_model

        where = self.recipe.where("model")
        # paths are absolute after load_recipe (surgery.paths); model.adapter loads that adapter onto its base
        return build_recipe_model(self.recipe.model, where=where)

    def _build_data(self) -> None:
        spec, data, acc = self.spec, self.recipe.data, self.acc
        assert acc is not None
        if self.report is not None:
            from surgery.data.folders import build_image_datasets
            from surgery.data.transforms import resolve_data_cfg

            self.train_ds, self.val_ds, self.class_names = build_image_datasets(
                data.root, self.model, img_size=data.img_size, augment=data.augment, report=self.report
            )
            self.data_config = resolve_data_cfg(self.model, img_size=data.img_size)
        else:
            self.train_ds = None if isinstance(self.train_data, DataLoader) else self.train_data
            self.val_ds = None if isinstance(self.val_data, DataLoader) or self.val_data is None else self.val_data
            names = getattr(self.train_ds, "classes", None)
            self.class_names = list(names) if names else None
        # the processes of this machine share its cores (torchrun sets LOCAL_WORLD_SIZE; one machine otherwise)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        workers = resolve_num_workers(data.num_workers, local)
        if self.train_ds is not None:
            if needs_seeding(self.train_ds):
                self.seeded = SeededDataset(self.train_ds, spec.seed)
            weights = None
            if data.sampler == "balanced":
                targets = self._train_targets()
                if targets is None:
                    raise RecipeError(
                        f"{self.recipe.where('data', 'sampler')}: balanced sampling needs the training labels: give a "
                        "dataset with a `targets` list or a TensorDataset (inputs, labels), or use sampler: random"
                    )
                weights = balanced_weights(targets)
            self.sampler = EpochSampler(len(self.train_ds), spec.seed, weights=weights)  # type: ignore[arg-type]
            source = self.seeded if self.seeded is not None else self.train_ds
            loader = _as_loader(source, spec.batch_size, self.sampler, workers, training=True, full_batches=spec.mixing)
        else:
            assert isinstance(self.train_data, DataLoader)
            if data.sampler != "random":
                raise RecipeError(
                    f"{self.recipe.where('data', 'sampler')}: a caller's DataLoader is used as it is; give a Dataset "
                    "to sample it balanced, or give the DataLoader a WeightedRandomSampler yourself"
                )
            loader = self.train_data  # a caller's DataLoader, used as it is
        self.data_loaders = {"train": acc.prepare_data_loader(loader)}
        if isinstance(self.val_data, DataLoader):
            self.data_loaders["val"] = acc.prepare_data_loader(self.val_data)
        elif self.val_ds is not None:
            self.data_loaders["val"] = acc.prepare_data_loader(_as_loader(self.val_ds, spec.batch_size, None, workers))
        if len(self.data_loaders["train"]) == 0:
            raise DataError("the training data is empty: add images (or samples) to train on")
        if self.test_report is not None:
            from timm.data import ImageDataset

            from surgery.data.folders import SampleListReader

            assert self.val_ds is not None  # folder data: val always exists; test gets its (eval) transform
            reader = SampleListReader(self.test_report.train_dir, self.test_report.train)
            mode = getattr(self.val_ds, "input_img_mode", "RGB")
            test_ds = ImageDataset(
                str(self.test_report.train_dir), reader=reader, input_img_mode=mode, transform=self.val_ds.transform
            )
            self.data_loaders["test"] = acc.prepare_data_loader(_as_loader(test_ds, spec.batch_size, None, workers))

    def _train_targets(self) -> torch.Tensor | None:
        """The label of every training sample, in dataset order (folders, a `targets` list, a TensorDataset)."""
        if self.report is not None:
            return torch.tensor([label for _, label in self.report.train], dtype=torch.long)
        ds = self.train_ds
        targets = getattr(ds, "targets", None)
        if targets is not None:
            return torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets).long()
        if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2 and ds.tensors[1].ndim <= 2:
            y = ds.tensors[1].reshape(len(ds), -1)
            if y.shape[1] == 1 and torch.equal(y, y.round()):
                return y.reshape(-1).long()
        return None

    def _build_loss(self) -> None:
        """The loss with ``train.class_weights`` (counted on the training data) and timm's Mixup for mixup/cutmix."""
        spec = self.spec
        weights = None
        if spec.class_weights != "none":
            from surgery.metrics import class_weights

            if isinstance(spec.class_weights, list):
                n, _ = self._data_classes()
                counts: Any = [1] * (n if n is not None else len(spec.class_weights))
            else:
                targets = self._train_targets()
                if targets is None:
                    raise RecipeError(
                        f"{self.recipe.where('train', 'class_weights')}: auto needs the training labels: give a "
                        "dataset with a `targets` list or a TensorDataset (inputs, labels), or list the weights"
                    )
                n, _ = self._data_classes()
                n = max(n or 0, int(targets.max()) + 1 if targets.numel() else 0)
                counts = torch.bincount(targets, minlength=n).tolist()
                if self.class_names and len(self.class_names) == len(counts):
                    counts = dict(zip(self.class_names, counts, strict=True))
            weights = class_weights(counts, spec.class_weights)
            if weights is not None and self.acc is not None and self.acc.is_main_process:
                shown = ", ".join(f"{w:.3g}" for w in weights.tolist()[:10])
                log.info("train.class_weights: %s%s", shown, " ..." if len(weights) > 10 else "")
        self.loss = Loss(spec.loss, spec.label_smoothing, weights)
        if spec.mixing:
            from timm.data import Mixup

            n, _ = self._data_classes()
            if n is None and self.model is not None:
                n = _classifier_outputs(self.model)
            if n is None or n < 2:
                raise RecipeError(
                    f"{self.recipe.where('train', 'mixup')}: mixup/cutmix need the class count (2 or more outputs); "
                    "pass num_classes, or give a dataset with a `classes` list"
                )
            self.mixup = Mixup(
                mixup_alpha=spec.mixup,
                cutmix_alpha=spec.cutmix,
                prob=spec.mixup_prob,
                switch_prob=spec.mixup_switch_prob,
                mode="batch",
                label_smoothing=spec.label_smoothing,
                num_classes=n,
            )

    def _prepare_folder(self) -> None:
        """Create the output folder; on --overwrite drop the earlier run; on resume drop logs of later epochs."""
        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            run_folder.clear(self.out)
        if self.checkpoint is not None:
            ckpt_state = self.checkpoint.state
            run_folder.trim_metrics_log(self.out, ckpt_state.global_step, ckpt_state.epoch)
        else:
            (self.out / run_folder.TRAIN_LOG).unlink(missing_ok=True)
        if self.report is not None and self.report.skipped:
            run_folder.write_skipped(self.out, self.report.skipped)
            self._log_line(
                f"skipped {len(self.report.skipped)} undecodable image(s) (data.skip_bad_images), listed in "
                f"{self.out / run_folder.SKIPPED}"
            )

    def _hparams(self) -> dict[str, Any]:
        r = self.recipe
        assert self.acc is not None
        return {
            "model": r.model.label if r.model else type(self.model).__name__,
            "optim": r.optim.name,
            "lr": r.optim.lr,
            "batch_size": self.spec.batch_size,
            "epochs": self.spec.total_epochs,
            "seed": self.spec.seed,
            "processes": self.acc.num_processes,
        }

    def _base_optimizer(self) -> torch.optim.Optimizer:
        from accelerate.optimizer import AcceleratedOptimizer

        return self.optimizer.optimizer if isinstance(self.optimizer, AcceleratedOptimizer) else self.optimizer

    # ----------------------------------------------------------------------------------------------- stages
    def _enter_stage(self, index: int) -> tuple[int, int]:
        """Plan stage ``index`` > 0 on the model as it is (``stages.plan_stage``), give the optimizer the new groups."""
        assert self.model is not None
        new_plan = stages.plan_stage(self.model, self.recipe, index, self.first)
        if self.ema is not None and any(n.action == "frozen" for n in new_plan.norms):
            raise RecipeError(
                f"{self.recipe.where('train', 'stages', index)}: this stage turns BatchNorms into FrozenBatchNorm "
                "(surgery.norm: frozen), which changes the state the EMA averages; use surgery.norm: auto or drop ema"
            )
        self.plan = new_plan
        return set_param_groups(self._base_optimizer(), new_plan.param_groups(self.model))

    def _cache_reason(self) -> str | None:
        assert self.plan is not None and self.model is not None and self.acc is not None
        reason = feature_cache.feature_cache_reason(self.plan, self.recipe, custom_data=self.custom_data)
        if reason is None and self.train_ds is not None:
            head = feature_cache.head_path(self.plan)
            assert head is not None
            sample = self.train_ds[0][0].unsqueeze(0).to(self.acc.device)
            reason = feature_cache.runtime_reason(self.model, head, sample)
        return reason

    def _setup_stage(self, index: int) -> None:
        """Choose the trained module (whole model, or the head on cached features) and (re)prepare it."""
        acc, model = self.acc, self.model
        assert acc is not None and model is not None and self.plan is not None
        self.cache_reason = self._cache_reason()
        head = feature_cache.head_path(self.plan) if self.cache_reason is None else None
        if head is not None:
            if self.feature_loaders is None:
                self.feature_loaders = self._build_cache()
            module, self.loaders = model.get_submodule(head), self.feature_loaders
        else:
            module, self.loaders = model, self.data_loaders
        # A new stage may change what trains; DDP only reduces gradients of the parameters that required them when
        # it was built, so the module is wrapped again (DDP broadcasts rank 0's weights, which all ranks share).
        unwrapped = acc.unwrap_model(self.net, keep_torch_compile=False) if self.net is not None else None
        if self.net is not None and (acc.num_processes > 1 or unwrapped is not module):
            acc.unwrap_model(self.net, keep_fp32_wrapper=False)
        acc.free_memory()
        self.net, self.optimizer = acc.prepare(module, self._base_optimizer())
        self.group_names = _group_names(self._base_optimizer(), self.plan)
        updates = math.ceil(len(self.loaders["train"]) / self.spec.grad_accum_steps)
        epochs = self.stages[index].epochs
        self.scheduler = build_scheduler(self._base_optimizer(), self.spec, epochs=epochs, updates_per_epoch=updates)

    def _build_cache(self) -> dict[str, DataLoader]:
        spec, acc = self.spec, self.acc
        assert self.train_ds is not None and self.sampler is not None and acc is not None and self.model is not None
        start = time.perf_counter()
        x, y = feature_cache.compute_features(self.model, self.train_ds, batch_size=spec.batch_size, device=acc.device)
        loaders = {
            "train": acc.prepare_data_loader(DataLoader(TensorDataset(x, y), spec.batch_size, sampler=self.sampler))
        }
        if self.val_ds is not None:
            vx, vy = feature_cache.compute_features(
                self.model, self.val_ds, batch_size=spec.batch_size, device=acc.device
            )
            loaders["val"] = acc.prepare_data_loader(DataLoader(TensorDataset(vx, vy), spec.batch_size))
        self.cache_seconds = time.perf_counter() - start
        return loaders

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        """Run every stage from where the state is; a checkpoint's Accelerate state is loaded at its stage."""
        acc, state = self.acc, self.state
        assert acc is not None and self.plan is not None
        # Replay the stage transitions up to the checkpoint's stage (through stages.plan_stage), so the optimizer gets
        # the same groups in the same order as in the interrupted run (its state is then loaded by position).
        for s in range(1, min(state.stage, len(self.stages) - 1) + 1):
            self._enter_stage(s)
        ckpt = self.checkpoint
        if ckpt is not None:
            ckpt.check_run(self.plan.trainable_names, acc.num_processes)
            self._restore_best(ckpt.path)
        # Ctrl-C, and the SIGTERM of schedulers and of torchrun's agent shutting its workers down, end the run at the
        # next update with a checkpoint.
        handler_set = _in_main_thread()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        if handler_set:
            for sig in previous:
                signal.signal(sig, self._on_signal)
        try:
            while state.stage < len(self.stages):
                self._setup_stage(state.stage)
                if ckpt is not None:
                    acc.load_state(str(ckpt.path))
                    ckpt = None
                self._run_stage()
                if state.stopped:
                    break
                state.next_stage()
                if state.stage < len(self.stages):
                    added, kept = self._enter_stage(state.stage)
                    if acc.is_main_process:
                        self._log_line(
                            f"{stages.stage_name(self.stages, state.stage)}: {self.plan.trainable_params:,} "
                            f"trainable parameters ({added} tensors join the optimizer, {kept} keep their state)"
                        )
        finally:
            if handler_set:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model's memory format (channels-last when on); other inputs as they are."""
        if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _sync_step(self, loss: float, epoch: int) -> bool:
        """After an update: agree over processes whether a signal asked to stop (one all-reduce that also averages
        the update's loss) and log the loss and every group's lr at this step; True when the run must stop."""
        acc = self.acc
        assert acc is not None
        flag = self.interrupted
        if acc.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0, loss], device=acc.device)
            total = acc.reduce(t, reduction="sum")
            flag, loss = bool(total[0].item() > 0), float(total[1].item()) / acc.num_processes
        self.interrupted = flag
        if self.out is not None:
            values: dict[str, Any] = {"train/loss": loss, "train/epoch": epoch + 1}
            for name, lr in zip(self.group_names, current_lrs(self._base_optimizer()), strict=False):
                values[f"lr/{name}"] = lr
            acc.log(values, step=self.state.global_step)
        return flag

    def _run_stage(self) -> None:
        acc, state = self.acc, self.state
        assert acc is not None
        stage = self.stages[state.stage]
        while state.stage_epoch < stage.epochs and not state.stopped:
            self._run_epoch()  # a signal ends the run inside, at an update, after a checkpoint
            metrics = self._evaluate()
            improved = self._observe(metrics)
            state.end_epoch(metrics)
            acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=state.global_step)
            if acc.is_main_process:
                self._log_line(_format_epoch(metrics) + ("  (best)" if improved and self.spec.keep_best else ""))
                if state.stopped:
                    es = self.spec.early_stopping
                    assert es is not None and state.best is not None
                    self._log_line(
                        f"early stopping: {self.spec.monitor} has not improved by more than {es.min_delta:g} for "
                        f"{es.patience} evaluation(s); best {state.best['value']:.4f} at epoch {state.best['epoch']}"
                    )
            if improved and self.spec.keep_best:
                self._keep_best()
            self._save_checkpoint()

    def _observe(self, metrics: dict[str, Any]) -> bool:
        """Track ``train.monitor`` over evaluations (best epoch, early stopping); True when this epoch is the best."""
        spec, state = self.spec, self.state
        if not any(k.startswith("val_") for k in metrics):
            return False  # not an evaluated epoch (eval_every_epochs, or no validation data)
        if spec.monitor not in metrics:
            shown = ", ".join(k for k in metrics if k.startswith(("val_", "ema_val_")))
            raise RecipeError(
                f"{self.recipe.where('train', 'monitor')}: the evaluation has no {spec.monitor} (it has {shown}); "
                "monitor one of those"
            )
        es = spec.early_stopping
        improved = state.observe(metrics, spec.monitor, es.min_delta if es is not None else 0.0)
        if es is not None and state.bad_evals >= es.patience:
            state.stopped = True
        return improved

    def _keep_best(self) -> None:
        """Keep this epoch's weights (every process, on the CPU) and, on the main process, write ``best/``."""
        assert self.model is not None and self.state.best is not None
        modules = {run_folder.WEIGHTS: self.model}
        if self.ema is not None:
            modules[run_folder.EMA_WEIGHTS] = self.ema.module
        self.best_weights = {
            name: {k: v.detach().to("cpu", copy=True).contiguous() for k, v in m.state_dict().items()}
            for name, m in modules.items()
        }
        if self.out is None or not self.acc.is_main_process:
            return
        from safetensors.torch import save_file

        best, tmp = self.out / run_folder.BEST, self.out / (run_folder.BEST + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, weights in self.best_weights.items():
            save_file(weights, str(tmp / name))  # copied per name above, so tied weights share no memory
        (tmp / run_folder.BEST_RECORD).write_text(json.dumps(self.state.best, indent=1))
        shutil.rmtree(best, ignore_errors=True)
        tmp.replace(best)

    def _restore_best(self, checkpoint: Path) -> None:
        """A resumed run takes the best weights the checkpoint kept (``best/`` may be of a later, lost epoch)."""
        if not (self.spec.keep_best and self.state.best is not None):
            return
        from safetensors.torch import load_file

        kept = checkpoint / run_folder.BEST
        if not (kept / run_folder.WEIGHTS).is_file():
            raise SurgeryError(f"the checkpoint {checkpoint} has no {run_folder.BEST}/ weights; start a new run")
        self.best_weights = {p.name: load_file(str(p)) for p in sorted(kept.glob("*.safetensors"))}
        if self.out is not None and self.acc.is_main_process:
            best = self.out / run_folder.BEST
            shutil.rmtree(best, ignore_errors=True)
            shutil.copytree(kept, best)
        self.acc.wait_for_everyone()

    def _run_epoch(self) -> None:
        from tqdm.auto import tqdm

        acc, spec, state, net = self.acc, self.spec, self.state, self.net
        assert acc is not None and net is not None
        epoch = state.epoch
        if self.sampler is not None:
            self.sampler.epoch = epoch
        if self.seeded is not None:
            self.seeded.epoch = epoch
        loader = full = self.loaders["train"]
        skip = state.batch
        if skip:
            from accelerate.data_loader import skip_first_batches

            loader = skip_first_batches(full, skip)
        net.train()
        total = len(full)
        bar = tqdm(
            total=total,
            initial=skip,
            desc=f"epoch {epoch + 1}/{spec.total_epochs}",
            disable=not (self.progress and acc.is_main_process),
            leave=False,
            dynamic_ncols=True,
        )
        loss_sum, loss_n = (state.loss_sum, state.loss_n) if skip else (0.0, 0)  # a resumed epoch's mean
        tic = time.perf_counter()
        seen = 0
        params = [p for p in net.parameters() if p.requires_grad]
        batch_index = skip
        update_sum, update_n = 0.0, 0  # the batches of one optimizer update (gradient accumulation)
        for batch in loader:
            x, y = split_batch(batch)
            x = self._input(x)
            with acc.accumulate(net):
                seed_step(mix(spec.seed, epoch, batch_index, acc.process_index), acc.device)
                if self.scheduler is not None:
                    self.scheduler.step_update(state.stage_step)
                if self.mixup is not None:  # timm's Mixup draws from NumPy, seeded by seed_step: exact resume
                    if len(x) % 2:
                        raise DataError(
                            f"train.mixup/cutmix pair the samples of a batch and got a batch of {len(x)}; give more "
                            "training samples than train.batch_size, or a DataLoader with drop_last=True"
                        )
                    x, y = self.mixup(x, y)
                logits = net(x)
                loss = self.loss(logits, y)
                acc.backward(loss)
                if acc.sync_gradients and spec.clip_grad_norm is not None:
                    acc.clip_grad_norm_(params, spec.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            batch_index += 1
            seen += len(y) * acc.num_processes
            loss_sum += float(loss.detach())
            loss_n += 1
            update_sum, update_n = update_sum + float(loss.detach()), update_n + 1
            bar.update(1)
            if acc.sync_gradients:
                state.stage_step += 1
                state.global_step += 1
                state.batch, state.loss_sum, state.loss_n = batch_index, loss_sum, loss_n
                if self.ema is not None:
                    self.ema.update(self.model, step=state.global_step)
                stop = self._sync_step(update_sum / max(update_n, 1), epoch)
                update_sum, update_n = 0.0, 0
                elapsed = time.perf_counter() - tic
                bar.set_postfix(
                    loss=f"{loss_sum / loss_n:.4f}",
                    lr=f"{max(current_lrs(self._base_optimizer())):.2e}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                )
                if stop:
                    path = self._save_checkpoint()
                    bar.close()
                    stop = Interrupted(state.global_step, path, acc.is_main_process)
                    if acc.is_main_process:
                        self._log_line(stop.hint)
                    raise stop
                every = spec.checkpoint_every_steps
                if every and state.global_step % every == 0 and batch_index < total:
                    self._save_checkpoint()
        bar.close()
        elapsed = time.perf_counter() - tic
        self.train_seconds += elapsed
        self.samples_seen += seen
        self.epoch_train = {
            "train_loss": loss_sum / max(loss_n, 1),
            "images_per_s": seen / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
        }
        if loss_n:  # the mean over this process's batches, averaged over processes
            t = torch.tensor([loss_sum / loss_n], device=acc.device)
            self.epoch_train["train_loss"] = float(acc.reduce(t, reduction="mean").item())

    def _evaluate(self) -> dict[str, Any]:
        acc, state = self.acc, self.state
        assert acc is not None and self.net is not None and self.plan is not None
        metrics: dict[str, Any] = {
            "epoch": state.epoch + 1,
            "stage": stages.stage_name(self.stages, state.stage),
            "global_step": state.global_step,
            **self.epoch_train,
            "lr": max(current_lrs(self._base_optimizer())),
            "feature_cache": self.cache_reason is None,
        }
        last = state.epoch + 1 == self.spec.total_epochs
        val = self.loaders.get("val")
        if val is None or ((state.epoch + 1) % self.spec.eval_every_epochs and not last):
            return metrics
        metrics.update(evaluate(acc, self.net, val, self.loss, to_input=self._input))
        if self.ema is not None:
            ema_net = self.ema.module
            if self.cache_reason is None:
                head = feature_cache.head_path(self.plan)
                assert head is not None
                ema_net = ema_net.get_submodule(head)
            metrics.update(evaluate(acc, ema_net, val, self.loss, prefix="ema_", to_input=self._input))
        return metrics

    def _save_checkpoint(self) -> Path | None:
        if self.out is None:
            return None
        acc, state = self.acc, self.state
        assert acc is not None and self.plan is not None
        path = self.out / run_folder.CHECKPOINTS / checkpoints.name(state)
        if (path / run_folder.STATE_FILE).exists():
            return path
        acc.wait_for_everyone()
        acc.save_state(str(path), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            best = self.out / run_folder.BEST
            if self.spec.keep_best and (best / run_folder.WEIGHTS).is_file():  # self-contained: resume restores it
                shutil.copytree(best, path / run_folder.BEST, copy_function=_link_or_copy, dirs_exist_ok=True)
            record = {
                **state.to_dict(),
                "recipe": _recipe_record(self.recipe),
                "trainable": self.plan.trainable_names,
                "stage_name": stages.stage_name(self.stages, state.stage),
                "feature_cache": self.cache_reason is None,
                "processes": acc.num_processes,
            }
            checkpoints.write_record(path, record)
            checkpoints.prune(self.out, self.spec.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------------ outputs
    def _log_line(self, line: str) -> None:
        from tqdm.auto import tqdm

        log.info(line)
        if self.progress:
            tqdm.write(line)
        if self.out is not None:
            with (self.out / run_folder.TRAIN_LOG).open("a") as f:
                f.write(line + "\n")

    def finish(self) -> dict[str, Any]:
        """The final metrics; the main process writes the run folder, the adapter, and pushes."""
        acc, state = self.acc, self.state
        assert acc is not None and self.plan is not None
        acc.wait_for_everyone()
        if self.channels_last:  # hand back a plain model: safetensors and timm's save_for_hf need contiguous weights
            assert self.model is not None
            self.model.to(memory_format=torch.contiguous_format)
            if self.ema is not None:
                self.ema.module.to(memory_format=torch.contiguous_format)
        if self.out is not None and acc.is_main_process:  # the last state, whichever epoch the adapter takes
            from safetensors.torch import save_model

            assert self.model is not None
            self.out.mkdir(parents=True, exist_ok=True)
            save_model(self.model, str(self.out / run_folder.WEIGHTS))
            if self.ema is not None:
                save_model(self.ema.module, str(self.out / run_folder.EMA_WEIGHTS))
        selected = "last"
        last = state.history[-1] if state.history else {}
        if self.spec.keep_best and self.best_weights is not None and state.best is not None:
            self._load_best()
            selected = "best"
            last = next(h for h in state.history if h["epoch"] == state.best["epoch"])
        self.test_metrics = self._evaluate_test()
        skipped = len(self.report.skipped) if self.report is not None else 0
        metrics: dict[str, Any] = {
            **{k: v for k, v in last.items() if k.startswith(("val_", "ema_val_", "train_loss"))},
            **{k: v for k, v in self.test_metrics.items() if k.startswith("test_")},
            "selected": selected,  # which epoch the numbers above and the adapter come from: best or last
            "selected_epoch": last.get("epoch"),
            "monitor": self.spec.monitor,
            "best": state.best,
            "stopped_early": state.stopped,
            "class_weights": self.loss.weights.tolist() if self.loss.weights is not None else None,
            "epochs": state.epoch,
            "steps": state.global_step,
            "processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "images_per_s": self.samples_seen / self.train_seconds if self.train_seconds else None,
            "feature_cache": self.cache_reason is None,
            "feature_cache_reason": self.cache_reason,
            "feature_cache_seconds": self.cache_seconds,
            "trainable_params": self.plan.trainable_params,
            "frozen_params": self.plan.frozen_params,
            "class_names": self.class_names,
            "skipped_images": skipped,
            "channels_last": self.channels_last,
            "history": state.history,
        }
        if "test_per_class" in self.test_metrics:
            metrics["test_per_class"] = self.test_metrics["test_per_class"]
        if acc.is_main_process and state.best is not None:
            b = state.best
            self._log_line(
                f"best {b['monitor']} {b['value']:.4f} at epoch {b['epoch']}; the adapter and metrics.json hold the "
                + (
                    "best epoch (train.keep_best)"
                    if selected == "best"
                    else f"last epoch {last.get('epoch')} (train.keep_best: true keeps the best)"
                )
            )
        if self.test_metrics and acc.is_main_process:
            self._log_line(
                "test: " + "  ".join(f"{k} {v:.4f}" for k, v in self.test_metrics.items() if isinstance(v, float))
            )
        if self.out is not None and acc.is_main_process:
            self._write_outputs(metrics)
        acc.wait_for_everyone()
        return metrics

    def _load_best(self) -> None:
        """Put the best epoch's weights (``train.keep_best``) into the model and the EMA, on every process."""
        assert self.best_weights is not None and self.model is not None
        targets = {run_folder.WEIGHTS: self.model}
        if self.ema is not None:
            targets[run_folder.EMA_WEIGHTS] = self.ema.module
        for name, module in targets.items():
            weights = self.best_weights.get(name)
            if weights is None:
                continue
            missing, unexpected = module.load_state_dict(weights, strict=False)
            odd = [k for k in (*missing, *unexpected) if not k.endswith("num_batches_tracked")]
            if odd:  # a later stage changed the model's layout (e.g. BatchNorms turned into FrozenBatchNorm)
                raise SurgeryError(
                    f"the best epoch's weights do not fit the model as it ended (e.g. {odd[0]!r}): a later stage "
                    "changed its layers; set train.keep_best: false, or use surgery.norm: auto"
                )

    def _evaluate_test(self) -> dict[str, Any]:
        """The test split (``data.test_dir`` or ``data.test_csv``) once, with the weights the adapter holds and the
        validation transform: ``test_*``."""
        loader = self.data_loaders.get("test")
        if loader is None:
            return {}
        assert self.acc is not None and self.model is not None
        result = evaluate_result(self.acc, self.model, loader, self.loss, self._input, self.class_names)
        if result is None:
            return {}
        out: dict[str, Any] = dict(result.scalars("test_"))
        out["test_per_class"] = result.per_class()
        if self.out is not None and self.acc.is_main_process:
            from surgery.metrics import write_confusion_png

            names = result.class_names or [str(i) for i in range(result.num_classes)]
            write_confusion_png(
                result.confusion, names, self.out / run_folder.TEST_CONFUSION, title="test confusion matrix"
            )
        return out

    def _write_outputs(self, metrics: dict[str, Any]) -> None:
        from surgery import adapter

        out = self.out
        assert out is not None and self.model is not None and self.plan is not None and self.first is not None
        recipe_yaml = yaml.safe_dump(resolved_data(self.recipe, predicates="repr"), sort_keys=False)
        (out / run_folder.RECIPE).write_text(recipe_yaml)
        (out / run_folder.PLAN).write_text(self.plan.to_json())
        if self.class_names is not None:
            (out / run_folder.CLASSES).write_text(json.dumps(self.class_names, indent=1))
        (out / run_folder.METRICS).write_text(json.dumps(metrics, indent=1))
        if self.state.history:
            model = self.recipe.model.label if self.recipe.model else type(self.model).__name__
            best = self.state.best["epoch"] if self.state.best else None
            run_folder.plot(self.state.history, out / run_folder.CURVE, title=f"{out.name}: {model}", best=best)
        if self.recipe.model is None:
            self._log_line(
                "no adapter written: the recipe has no model: section to name the base; "
                f"{run_folder.WEIGHTS} holds the trained model"
            )
            return
        adapter.save_adapter(
            self.model,
            self.plan,
            out,
            base=self.base_fingerprint,
            class_names=self.class_names,
            metrics=metrics,
            data_config=self.data_config,
            recipe=self.recipe,
        )
        if self.recipe.hub.repo:
            pushed = adapter.push_from_recipe(out, self.recipe.hub, progress=self.progress)
            if pushed is not None:
                self.pushed_url = pushed.url
                self._log_line(f"pushed {out} to {pushed.url}")
