"""Training a recipe: the Accelerate loop, stages, evaluation, checkpoints and resume, the linear-probe feature cache.

One loop for one process or many (``accelerate launch``): Accelerate's config decides processes and mixed precision;
only the main process writes files, logs and progress. The recipe's plan is applied to the model, the plan's param
groups go to a timm optimizer as they are, and each stage re-plans the model as it is and updates the optimizer.

Exact resume: randomness is a function of (seed, epoch, batch) rather than of a global generator's history. Each
sample's augmentation is drawn from a generator seeded by (seed, epoch, index), each step's dropout from one seeded by
(seed, epoch, batch, rank), and the data order from (seed, epoch). A checkpoint (Accelerate's state plus stage, freeze
state and data position) therefore resumes to exactly the weights an uninterrupted run reaches (deterministic mode).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from surgery import features as feat
from surgery import stages as stages_mod
from surgery.apply import apply_plan
from surgery.errors import DataError, RecipeError, SurgeryError
from surgery.optim import build_optimizer, build_scheduler, current_lrs, set_param_groups
from surgery.plan import Plan, RecipeLike, plan
from surgery.recipe import LoadedRecipe, load_recipe, resolved_data

__all__ = ["TrainResult", "feature_cache_reason", "train"]

feature_cache_reason = feat.feature_cache_reason
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


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


# ------------------------------------------------------------------------------------------------- determinism


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochSampler(Sampler[int]):
    """Shuffled order that depends only on (seed, epoch): the same on every process and after a resume.

    The trainer sets ``epoch`` itself. There is deliberately no ``set_epoch`` method: Accelerate's loaders call it
    with their own iteration count, which restarts at 0 in a resumed run.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class SeededDataset(Dataset):
    """Each sample is produced under RNGs seeded by (seed, epoch, index), leaving the global RNG states untouched,
    so random augmentation does not depend on prefetching, workers or where a resumed run starts."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = _mix(self.seed, self.epoch, index)
        gen = torch.default_generator  # the CPU generator transforms draw from (torch.manual_seed is far slower)
        torch_state, py_state, np_state = gen.get_state(), random.getstate(), np.random.get_state()
        gen.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.dataset[index]
        finally:
            gen.set_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


def needs_seeding(dataset: Dataset) -> bool:
    """False for datasets that draw no random numbers: tensors, or a transform with no random step."""
    if isinstance(dataset, TensorDataset):
        return False
    transform = getattr(dataset, "transform", "unknown")
    if transform == "unknown":
        return True
    from surgery.data import is_deterministic_transform

    return not is_deterministic_transform(transform) or getattr(dataset, "target_transform", None) is not None


def _seed_step(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ helpers


def _load(recipe: RecipeLike, overrides: Sequence[str]) -> LoadedRecipe:
    if isinstance(recipe, LoadedRecipe) and not overrides:
        return recipe
    return load_recipe(recipe, overrides)  # type: ignore[arg-type]


def _recipe_hash(recipe: LoadedRecipe) -> str:
    data = resolved_data(recipe, predicates="repr")
    data.get("train", {}).pop("output_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def default_output_dir(recipe: LoadedRecipe) -> Path:
    """``train.output_dir``, else ``runs/<recipe file name>``."""
    if recipe.train.output_dir:
        return Path(recipe.train.output_dir)
    stem = Path(recipe.source).stem if not recipe.source.startswith("<") else "train"
    return Path("runs") / stem


def _as_loader(
    data: Dataset | DataLoader, batch_size: int, sampler: Sampler | None, num_workers: int, *, training: bool = False
) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    # BatchNorm cannot train on a batch of one sample: drop a lone trailing sample (a different one each epoch, since
    # the order is shuffled) instead of failing at the end of the first epoch.
    drop_last = training and len(data) > batch_size and len(data) % batch_size == 1
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last)


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("x", batch.get("input")))
        y = batch.get("label", batch.get("y", batch.get("target")))
        if x is None or y is None:
            raise DataError(f"a batch dict needs 'image'/'x' and 'label'/'y' keys, got {sorted(batch)}")
        return x, y
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise DataError("each batch must be (inputs, targets) or a dict with 'x'/'image' and 'y'/'label'")


class _Loss:
    """Cross-entropy, or binary cross-entropy for one-logit outputs (``loss: auto`` decides from the output)."""

    def __init__(self, kind: str, label_smoothing: float) -> None:
        self.kind, self.label_smoothing = kind, label_smoothing

    def binary(self, logits: torch.Tensor) -> bool:
        return self.kind == "bce" or (self.kind == "auto" and (logits.ndim == 1 or logits.shape[-1] == 1))

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.binary(logits):
            return F.binary_cross_entropy_with_logits(logits.reshape(-1), target.float().reshape(-1))
        return F.cross_entropy(logits, target.long(), label_smoothing=self.label_smoothing)

    def counts(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-sample loss, top-1 hits, top-5 hits (k = min(5, classes)); the k used."""
        logits = logits.float()
        if self.binary(logits):
            flat = logits.reshape(-1)
            t = target.float().reshape(-1)
            loss = F.binary_cross_entropy_with_logits(flat, t, reduction="none")
            hit = ((flat > 0).float() == t).float()
            return torch.stack([loss, hit, hit], 1), hit, 1
        loss = F.cross_entropy(logits, target.long(), reduction="none")
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == target.long().unsqueeze(1)
        return torch.stack([loss, hits[:, 0].float(), hits.any(1).float()], 1), hits[:, 0].float(), k


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
        log_with = [_jsonl_tracker(out / "metrics.jsonl"), "tensorboard"]
        project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    try:
        return Accelerator(
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


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (their state file written last), oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in an output folder, or None."""
    found = _checkpoints(Path(out))
    return found[-1] if found else None


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    evaluated = [h for h in history if "val_loss" in h]
    if evaluated:
        ax.plot([h["epoch"] for h in evaluated], [h["val_loss"] for h in evaluated], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    if evaluated:
        ax2 = ax.twinx()
        top1 = [h["val_top1"] for h in evaluated]
        ax2.plot([h["epoch"] for h in evaluated], top1, "s--", color="tab:green", label="val top-1")
        ax2.set_ylabel("top-1")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="best")
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_outputs(model: nn.Module, the_plan: Plan, folder: Path) -> None:
    """Hook for the adapter format: ``surgery.adapter.save_outputs(model, plan, folder)`` when that module has it."""
    try:
        from surgery import adapter  # type: ignore[attr-defined]
    except ImportError:
        return
    hook: Callable[[nn.Module, Plan, Path], None] | None = getattr(adapter, "save_outputs", None)
    if hook is not None:
        hook(model, the_plan, folder)


# --------------------------------------------------------------------------------------------------------- train


def train(
    recipe: RecipeLike,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | DataLoader | None = None,
    val_data: Dataset | DataLoader | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Apply ``recipe`` to ``model`` (built from ``recipe.model`` when None) and train it; see the module docstring.

    ``train_data``/``val_data`` are Datasets or DataLoaders yielding ``(inputs, targets)``; when omitted, the image
    folders of ``recipe.data.root`` are validated (before anything else) and loaded through timm. ``output_dir``
    (default ``recipe.train.output_dir``; None keeps everything in memory) receives checkpoints, ``model.safetensors``,
    ``recipe.yaml``, ``classes.json``, ``metrics.json``/``metrics.jsonl``, TensorBoard logs and ``learning_curve.png``.
    ``resume=True`` continues from the newest checkpoint there.
    """
    return _Trainer(_load(recipe, overrides), model, train_data, val_data, output_dir, resume, progress).run()


class _Trainer:
    def __init__(
        self,
        recipe: LoadedRecipe,
        model: nn.Module | None,
        train_data: Dataset | DataLoader | None,
        val_data: Dataset | DataLoader | None,
        output_dir: str | os.PathLike | None,
        resume: bool,
        progress: bool,
    ) -> None:
        self.recipe, self.spec = recipe, recipe.train
        self.user_model, self.train_data, self.val_data = model, train_data, val_data
        out = output_dir if output_dir is not None else self.spec.output_dir
        self.out = Path(out).expanduser() if out is not None else None
        self.resume, self.progress = resume, progress
        self.stages = stages_mod.stage_specs(self.spec)
        self.class_names: list[str] | None = None
        self.history: list[dict[str, Any]] = []
        self.interrupted = False

    # ----------------------------------------------------------------------------------------------- setup
    def run(self) -> TrainResult:
        from accelerate.utils import set_seed

        recipe, spec = self.recipe, self.spec
        ckpt = self._find_checkpoint()
        report = self._validate_data()  # bad data is reported before any model is built or trained
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        self.acc = acc = _make_accelerator(recipe, self.out)
        set_seed(spec.seed, deterministic=spec.deterministic)
        try:
            self.model = self._build_model()
            self.model.to(acc.device)
            # every stage's selectors are resolved now, so a typo in a late stage fails before any training
            if spec.stages:
                stages_mod.check_stage_rules(self.model, recipe, 0)
            self.first = plan(self.model, stages_mod.stage_recipe(recipe, self.stages, 0, None))
            apply_plan(self.model, self.first)
            self.plan = self.first
            for index in range(1, len(spec.stages)):
                stages_mod.check_stage_rules(self.model, recipe, index)
            self._build_data(report)
            self.loss = _Loss(spec.loss, spec.label_smoothing)
            self.optimizer = build_optimizer(self.plan.param_groups(self.model), recipe.optim, where="optim")
            self.ema = None
            if spec.ema:
                from timm.utils import ModelEmaV3

                self.ema = ModelEmaV3(self.model, decay=spec.ema_decay)
                acc.register_for_checkpointing(self.ema)
            if self.out is not None and acc.is_main_process:
                self._prepare_folder(ckpt)
            if self.out is not None:
                acc.init_trackers("tensorboard", config=self._hparams())
            state = self._initial_state(ckpt)
            self._loop(state, ckpt)
            metrics = self._finish(state)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            acc.end_training()
            acc.free_memory()
        return TrainResult(
            model=self.model,
            metrics=metrics,
            output_dir=self.out,
            plan=self.plan,
            class_names=self.class_names,
            history=self.history,
            is_main_process=acc.is_main_process,
        )

    def _prepare_folder(self, ckpt: Path | None) -> None:
        """Create the output folder; drop logs of epochs after the checkpoint (or all of them on a fresh start)."""
        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        done = json.loads((ckpt / STATE_FILE).read_text())["epoch"] if ckpt is not None else 0
        jsonl = self.out / "metrics.jsonl"
        if jsonl.exists():
            keep = [line for line in jsonl.read_text().splitlines() if line and json.loads(line).get("step", 0) <= done]
            jsonl.write_text("".join(line + "\n" for line in keep))
        if ckpt is None:
            (self.out / "train.log").unlink(missing_ok=True)

    def _find_checkpoint(self) -> Path | None:
        if self.out is None:
            if self.resume:
                raise SurgeryError("resume needs an output folder: pass output_dir (--output DIR)")
            return None
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None and not self.resume:
            raise SurgeryError(
                f"'{self.out}' already holds checkpoints of a run; pass --resume (resume=True) to continue it, "
                "or choose another output folder"
            )
        if ckpt is not None:
            saved = json.loads((ckpt / STATE_FILE).read_text())
            if saved.get("recipe_hash") != _recipe_hash(self.recipe):
                raise RecipeError(
                    f"the checkpoint {ckpt} was made with a different recipe or overrides; resume with the same "
                    "ones, or train into a new output folder"
                )
        return ckpt

    def _validate_data(self) -> Any:
        if self.train_data is not None:
            return None
        data = self.recipe.data
        if data.root is None:
            raise DataError(
                f"{self.recipe.where('data', 'root')}: no training data: set data.root to a folder with train/ and "
                "val/ (one subfolder per class), or pass train_data in the Python API"
            )
        from surgery.data import validate_image_folders

        return validate_image_folders(
            data.root, train_dir=data.train_dir, val_dir=data.val_dir, skip_bad_images=data.skip_bad_images
        )

    def _build_model(self) -> nn.Module:
        if self.user_model is not None:
            return self.user_model
        if self.recipe.model is None:
            raise RecipeError(f"{self.recipe.source}: the recipe has no model: add model.name, or pass model=")
        from surgery.models import build_model

        where = self.recipe.where("model")
        return build_model(self.recipe.model, where=where)

    def _build_data(self, report: Any) -> None:
        spec, data, acc = self.spec, self.recipe.data, self.acc
        self.custom_data = self.train_data is not None
        if self.train_data is None:
            from surgery.data import build_image_datasets

            train_ds, val_ds, self.class_names = build_image_datasets(
                data.root, self.model, img_size=data.img_size, augment=data.augment, report=report
            )
            for h in self.first.heads:
                if h.num_classes != len(self.class_names):
                    raise RecipeError(
                        f"{self.recipe.where('surgery', 'heads', h.key, 'num_classes')}: the head has {h.num_classes} "
                        f"outputs but the data has {len(self.class_names)} classes; set "
                        f"surgery.heads.{h.key}.num_classes={len(self.class_names)}"
                    )
            self.train_ds: Dataset | None = train_ds
            self.val_ds: Dataset | None = val_ds
        else:
            self.train_ds = None if isinstance(self.train_data, DataLoader) else self.train_data
            self.val_ds = None if isinstance(self.val_data, DataLoader) or self.val_data is None else self.val_data
            names = getattr(self.train_ds, "classes", None)
            self.class_names = list(names) if names else None
        self.sampler: EpochSampler | None = None
        self.seeded: SeededDataset | None = None
        if self.train_ds is not None:
            if needs_seeding(self.train_ds):
                self.seeded = SeededDataset(self.train_ds, spec.seed)
            self.sampler = EpochSampler(len(self.train_ds), spec.seed)
            source = self.seeded if self.seeded is not None else self.train_ds
            raw_train = _as_loader(source, spec.batch_size, self.sampler, data.num_workers, training=True)
        else:
            raw_train = self.train_data  # a caller's DataLoader, used as it is
        self.raw_train = acc.prepare_data_loader(raw_train)
        self.train_loader = self.raw_train
        self.val_loader = None
        if self.val_data is not None and isinstance(self.val_data, DataLoader):
            self.val_loader = acc.prepare_data_loader(self.val_data)
        elif self.val_ds is not None:
            self.val_loader = acc.prepare_data_loader(_as_loader(self.val_ds, spec.batch_size, None, data.num_workers))
        self.raw_val = self.val_loader
        if len(self.raw_train) == 0:
            raise DataError("the training data is empty: add images (or samples) to train on")
        self.cached: dict[str, DataLoader] | None = None

    def _hparams(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "model": r.model.name if r.model else type(self.model).__name__,
            "optim": r.optim.name,
            "lr": r.optim.lr,
            "batch_size": self.spec.batch_size,
            "epochs": self.spec.total_epochs,
            "seed": self.spec.seed,
            "processes": self.acc.num_processes,
        }

    # ----------------------------------------------------------------------------------------------- stages
    def _enter_stage(self, index: int) -> tuple[int, int]:
        """Re-plan for stage ``index`` > 0 on the model as it is, apply it, give the optimizer the new groups."""
        stage_recipe = stages_mod.stage_recipe(self.recipe, self.stages, index, self.first)
        stages_mod.check_stage_rules(self.model, self.recipe, index)
        new_plan = plan(self.model, stage_recipe)
        if self.ema is not None and any(n.action == "frozen" for n in new_plan.norms):
            raise RecipeError(
                f"{self.recipe.where('train', 'stages', index)}: this stage turns BatchNorms into FrozenBatchNorm "
                "(surgery.norm: frozen), which changes the state the EMA averages; use surgery.norm: auto or drop ema"
            )
        self.plan = apply_plan(self.model, new_plan)
        return set_param_groups(self.optimizer, self.plan.param_groups(self.model))

    def _cache_reason(self) -> str | None:
        reason = feat.feature_cache_reason(self.plan, self.recipe, custom_data=self.custom_data)
        if reason is None and self.train_ds is not None:
            head = feat.head_path(self.plan)
            assert head is not None
            sample = self.train_ds[0][0].unsqueeze(0).to(self.acc.device)
            reason = feat.runtime_reason(self.model, head, sample)
        return reason

    def _setup_stage(self, index: int) -> None:
        """Choose the trained module (whole model, or the head on cached features) and (re)prepare it."""
        acc = self.acc
        self.cache_reason = self._cache_reason()
        head = feat.head_path(self.plan) if self.cache_reason is None else None
        if head is not None:
            if self.cached is None:
                self.cached = self._build_cache()
            raw_net = self.model.get_submodule(head)
            self.train_loader, self.val_loader = self.cached["train"], self.cached.get("val")
        else:
            raw_net = self.model
            self.train_loader, self.val_loader = self.raw_train, self.raw_val
        # A new stage may change what trains; DDP only reduces gradients of the parameters that required them when
        # it was built, so the module is wrapped again (DDP broadcasts rank 0's weights, which all ranks share).
        previous = getattr(self, "net", None)
        if previous is not None and (acc.num_processes > 1 or previous is not raw_net):
            acc.unwrap_model(previous, keep_fp32_wrapper=False)
        acc.free_memory()
        self.raw_net = raw_net
        self.net, self.prepared_optimizer = acc.prepare(raw_net, self.optimizer)
        updates = math.ceil(len(self.train_loader) / self.spec.grad_accum_steps)
        stage = self.stages[index]
        self.scheduler = build_scheduler(self.optimizer, self.spec, epochs=stage.epochs, updates_per_epoch=updates)

    def _build_cache(self) -> dict[str, DataLoader]:
        spec, acc = self.spec, self.acc
        assert self.train_ds is not None and self.sampler is not None
        start = time.perf_counter()
        x, y = feat.compute_features(self.model, self.train_ds, batch_size=spec.batch_size, device=acc.device)
        loaders = {
            "train": acc.prepare_data_loader(DataLoader(TensorDataset(x, y), spec.batch_size, sampler=self.sampler))
        }
        if self.val_ds is not None:
            vx, vy = feat.compute_features(self.model, self.val_ds, batch_size=spec.batch_size, device=acc.device)
            loaders["val"] = acc.prepare_data_loader(DataLoader(TensorDataset(vx, vy), spec.batch_size))
        self.cache_seconds = time.perf_counter() - start
        return loaders

    # ------------------------------------------------------------------------------------------------ state
    def _initial_state(self, ckpt: Path | None) -> dict[str, Any]:
        state = {"epoch": 0, "batch": 0, "global_step": 0, "stage": 0, "stage_step": 0, "stage_epoch": 0}
        state.update(loss_sum=0.0, loss_n=0)
        if ckpt is None:
            return state
        saved = json.loads((ckpt / STATE_FILE).read_text())
        self.history = list(saved.get("history", []))
        return {k: saved.get(k, v) for k, v in state.items()}

    def _save_checkpoint(self, state: dict[str, Any]) -> Path | None:
        if self.out is None:
            return None
        acc = self.acc
        name = f"step_{state['global_step']:08d}_e{state['epoch']:04d}_b{state['batch']:06d}"
        path = self.out / CHECKPOINTS / name
        if (path / STATE_FILE).exists():
            return path
        acc.wait_for_everyone()
        acc.save_state(str(path), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            record = {
                **state,
                "history": self.history,
                "recipe_hash": _recipe_hash(self.recipe),
                "trainable": self.plan.trainable_names,
                "stage_name": stages_mod.stage_name(self.stages, state["stage"]),
                "feature_cache": self.cache_reason is None,
                "processes": acc.num_processes,
            }
            tmp = path / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path / STATE_FILE)  # the state file last: a checkpoint without it is incomplete
            for old in _checkpoints(self.out)[: -self.spec.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------------- loop
    def _loop(self, state: dict[str, Any], ckpt: Path | None) -> None:
        acc = self.acc
        # Replay the stage transitions up to the checkpoint's stage, so the optimizer gets the same groups in the same
        # order as in the interrupted run (its state is then loaded by position).
        for s in range(1, min(state["stage"], len(self.stages) - 1) + 1):
            self._enter_stage(s)
        if ckpt is not None:
            saved = json.loads((ckpt / STATE_FILE).read_text())
            if saved.get("trainable") != self.plan.trainable_names:
                raise SurgeryError(f"the checkpoint {ckpt} trains other parameters than this recipe; start a new run")
            if saved.get("processes", acc.num_processes) != acc.num_processes:
                raise SurgeryError(
                    f"the checkpoint {ckpt} was made with {saved['processes']} process(es), this run has "
                    f"{acc.num_processes}; resume with the same number (the data position is per process)"
                )
        # Ctrl-C, and the SIGTERM of schedulers and of torchrun's agent shutting its workers down, end the run at the
        # next update with a checkpoint.
        handler_set = _in_main_thread()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        if handler_set:
            for sig in previous:
                signal.signal(sig, self._on_signal)
        self.samples_seen, self.train_seconds = 0, 0.0
        try:
            while state["stage"] < len(self.stages):
                self._setup_stage(state["stage"])
                if ckpt is not None:
                    acc.load_state(str(ckpt))
                    ckpt = None
                self._run_stage(state)
                state.update(stage=state["stage"] + 1, stage_step=0, stage_epoch=0)
                if state["stage"] < len(self.stages):
                    added, kept = self._enter_stage(state["stage"])
                    if acc.is_main_process:
                        self._log_line(
                            f"{stages_mod.stage_name(self.stages, state['stage'])}: {self.plan.trainable_params:,} "
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

    def _interrupt_requested(self) -> bool:
        flag = self.interrupted
        if self.acc.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
            flag = bool(self.acc.reduce(t, reduction="sum").item() > 0)
        self.interrupted = flag
        return flag

    def _run_stage(self, state: dict[str, Any]) -> None:
        stage = self.stages[state["stage"]]
        while state["stage_epoch"] < stage.epochs:
            self._run_epoch(state)  # a signal ends the run inside, at an update, after a checkpoint
            metrics = self._evaluate(state)
            state.update(epoch=state["epoch"] + 1, stage_epoch=state["stage_epoch"] + 1, batch=0)
            state.update(loss_sum=0.0, loss_n=0)
            self.history.append(metrics)
            self.acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=metrics["epoch"])
            if self.acc.is_main_process:
                self._log_line(_format_epoch(metrics))
            self._save_checkpoint(state)

    def _run_epoch(self, state: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        acc, spec = self.acc, self.spec
        epoch = state["epoch"]
        if self.sampler is not None:
            self.sampler.epoch = epoch
        if self.seeded is not None:
            self.seeded.epoch = epoch
        loader = self.train_loader
        skip = state["batch"]
        if skip:
            from accelerate.data_loader import skip_first_batches

            loader = skip_first_batches(loader, skip)
        self.net.train()
        total = len(self.train_loader)
        bar = tqdm(
            total=total,
            initial=skip,
            desc=f"epoch {epoch + 1}/{spec.total_epochs}",
            disable=not (self.progress and acc.is_main_process),
            leave=False,
            dynamic_ncols=True,
        )
        loss_sum, loss_n = (state["loss_sum"], state["loss_n"]) if skip else (0.0, 0)  # a resumed epoch's mean
        tic = time.perf_counter()
        seen = 0
        params = [p for p in self.raw_net.parameters() if p.requires_grad]
        batch_index = skip
        for batch in loader:
            x, y = _split(batch)
            with acc.accumulate(self.net):
                _seed_step(_mix(spec.seed, epoch, batch_index, acc.process_index), acc.device)
                if self.scheduler is not None:
                    self.scheduler.step_update(state["stage_step"])
                logits = self.net(x)
                loss = self.loss(logits, y)
                acc.backward(loss)
                if acc.sync_gradients and spec.clip_grad_norm is not None:
                    acc.clip_grad_norm_(params, spec.clip_grad_norm)
                self.prepared_optimizer.step()
                self.prepared_optimizer.zero_grad(set_to_none=True)
            batch_index += 1
            seen += len(y) * acc.num_processes
            loss_sum += float(loss.detach())
            loss_n += 1
            bar.update(1)
            if acc.sync_gradients:
                state["stage_step"] += 1
                state["global_step"] += 1
                state.update(batch=batch_index, loss_sum=loss_sum, loss_n=loss_n)
                if self.ema is not None:
                    self.ema.update(self.model, step=state["global_step"])
                elapsed = time.perf_counter() - tic
                bar.set_postfix(
                    loss=f"{loss_sum / loss_n:.4f}",
                    lr=f"{max(current_lrs(self.optimizer)):.2e}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                )
                if self._interrupt_requested():
                    path = self._save_checkpoint(state)
                    bar.close()
                    if acc.is_main_process:
                        where = f"; checkpoint saved to {path}, continue with --resume" if path else ""
                        self._log_line(f"interrupted at step {state['global_step']}{where}")
                    raise KeyboardInterrupt
                every = spec.checkpoint_every_steps
                if every and state["global_step"] % every == 0 and batch_index < total:
                    self._save_checkpoint(state)
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

    @torch.no_grad()
    def _evaluate(self, state: dict[str, Any]) -> dict[str, Any]:
        acc = self.acc
        metrics: dict[str, Any] = {
            "epoch": state["epoch"] + 1,
            "stage": stages_mod.stage_name(self.stages, state["stage"]),
            "global_step": state["global_step"],
            **self.epoch_train,
            "lr": max(current_lrs(self.optimizer)),
            "feature_cache": self.cache_reason is None,
        }
        last = state["epoch"] + 1 == self.spec.total_epochs
        if self.val_loader is None or ((state["epoch"] + 1) % self.spec.eval_every_epochs and not last):
            return metrics
        nets = {"": self.net}
        if self.ema is not None:
            ema_net = self.ema.module
            if self.cache_reason is None:
                head = feat.head_path(self.plan)
                assert head is not None
                ema_net = ema_net.get_submodule(head)
            nets["ema_"] = ema_net
        for prefix, net in nets.items():
            was = net.training
            net.eval()
            rows, k = [], 1
            for batch in self.val_loader:
                x, y = _split(batch)
                with acc.autocast():
                    logits = net(x)
                per, _, k = self.loss.counts(logits, y)
                rows.append(acc.gather_for_metrics(per))
            net.train(was)
            if rows:
                allrows = torch.cat(rows)
                metrics[f"{prefix}val_loss"] = float(allrows[:, 0].mean())
                metrics[f"{prefix}val_top1"] = float(allrows[:, 1].mean())
                if k > 1:
                    metrics[f"{prefix}val_top5"] = float(allrows[:, 2].mean())  # top-k, k = min(5, classes)
        return metrics

    # ------------------------------------------------------------------------------------------------ outputs
    def _log_line(self, line: str) -> None:
        from tqdm.auto import tqdm

        if self.progress:
            tqdm.write(line)
        if self.out is not None:
            with (self.out / "train.log").open("a") as f:
                f.write(line + "\n")

    def _finish(self, state: dict[str, Any]) -> dict[str, Any]:
        acc = self.acc
        acc.wait_for_everyone()
        last = self.history[-1] if self.history else {}
        metrics: dict[str, Any] = {
            **{k: v for k, v in last.items() if k.startswith(("val_", "ema_val_", "train_loss"))},
            "epochs": state["epoch"],
            "steps": state["global_step"],
            "processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "images_per_s": self.samples_seen / self.train_seconds if self.train_seconds else None,
            "feature_cache": getattr(self, "cache_reason", "no training") is None,
            "feature_cache_reason": getattr(self, "cache_reason", None),
            "feature_cache_seconds": getattr(self, "cache_seconds", None),
            "trainable_params": self.plan.trainable_params,
            "frozen_params": self.plan.frozen_params,
            "class_names": self.class_names,
            "history": self.history,
        }
        if self.out is not None and acc.is_main_process:
            self._write_outputs(metrics)
        acc.wait_for_everyone()
        return metrics

    def _write_outputs(self, metrics: dict[str, Any]) -> None:
        from safetensors.torch import save_model

        out = self.out
        assert out is not None
        save_model(self.model, str(out / "model.safetensors"))
        if self.ema is not None:
            save_model(self.ema.module, str(out / "model_ema.safetensors"))
        (out / "recipe.yaml").write_text(yaml.safe_dump(resolved_data(self.recipe, predicates="repr"), sort_keys=False))
        (out / "plan.json").write_text(self.plan.to_json())
        if self.class_names is not None:
            (out / "classes.json").write_text(json.dumps(self.class_names, indent=1))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if self.history:
            _plot(self.history, out / "learning_curve.png")
        save_outputs(self.model, self.plan, out)
        if self.recipe.hub.repo:
            from surgery.hub.client import push_from_recipe

            pushed = push_from_recipe(out, self.recipe.hub, progress=self.progress)
            if pushed is not None:
                self._log_line(f"pushed {out} to {pushed.url}")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _format_epoch(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']} ({m['stage']})", f"train_loss {m['train_loss']:.4f}"]
    for key in ("val_loss", "val_top1", "val_top5", "ema_val_top1"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"{m['images_per_s']:.0f} img/s")
    return "  ".join(parts)
