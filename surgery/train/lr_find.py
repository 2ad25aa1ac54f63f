"""The learning-rate finder (Leslie Smith's range test, as fastai's ``lr_find``): a short exponential sweep of the
base learning rate over the plan's param groups, the loss at each step, and a suggestion.

The run is set up exactly as :func:`surgery.train` sets it up (same :class:`~surgery.train.trainer.Trainer` setup:
data checks, model, stage 0's plan, transforms, timm optimizer), but in memory: nothing is written except the plot,
the model and the recipe on disk are only read. Each step sets every param group to ``lr * ratio``, where ``ratio``
is the group's lr over ``optim.lr`` in the plan (the first stage's ``lr`` when it sets one), so the head-to-backbone
lr ratios a recipe sets are kept and the suggestion is a value for that key.

The suggestion is fastai's ``steep``: the lr where the smoothed loss (an exponential moving average with bias
correction, beta 0.98) falls fastest against log(lr), leaving out the first tenth and the last 5 steps. The sweep stops
early when the smoothed loss passes 4 times its minimum (it diverged).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.errors import DataError, RecipeError
from surgery.io import atomic_write

__all__ = ["LrFindResult", "lr_find", "steepest", "write_lr_plot"]

SKIP_END = 5  # fastai's lr_find leaves out the last 5 losses (and the first tenth) when it suggests


@dataclass(frozen=True)
class LrFindResult:
    """The sweep: the base lr and the loss at each step, the smoothed loss, the suggestion (None when too few steps
    were left to suggest from) and each param group's lr ratio to the base lr (``key``: ``optim.lr``, or the first
    stage's ``lr`` when it sets one)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    ratios: list[float]
    diverged: bool
    key: str = "optim.lr"  # the recipe key the swept lr stands for (`train.stages[0].lr` when the first stage sets one)
    plot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``surgery lr-find --json``)."""
        return {
            "suggestion": self.suggestion,
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": self.smoothed,
            "ratios": self.ratios,
            "diverged": self.diverged,
            "key": self.key,
            "plot": str(self.plot) if self.plot is not None else None,
        }


def steepest(lrs: Sequence[float], smoothed: Sequence[float]) -> float | None:
    """fastai's ``steep`` suggestion: the lr of the most negative slope of the smoothed loss against log(lr), without
    the first tenth and the last :data:`SKIP_END` steps; None with fewer than 3 steps left."""
    n = len(lrs)
    lo, hi = n // 10, n - SKIP_END
    if hi - lo < 3:
        return None
    x = np.log(np.asarray(lrs[lo:hi], dtype=np.float64))
    y = np.asarray(smoothed[lo:hi], dtype=np.float64)
    slopes = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    return float(lrs[lo + int(np.argmin(slopes))])


def write_lr_plot(result: LrFindResult, path: str | os.PathLike) -> Path:
    """Loss against the base lr (log scale): the raw and smoothed losses and the suggestion, as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is slow to import
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", label="smoothed loss")
    if result.suggestion is not None:
        i = result.lrs.index(result.suggestion)
        ax.plot(
            [result.suggestion], [result.smoothed[i]], "o", color="tab:red", label=f"suggestion {result.suggestion:.2e}"
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"learning rate ({result.key}; every param group keeps its ratio to it)")
    ax.set_ylabel("training loss")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    raw = [v for v in result.losses if math.isfinite(v)]
    if finite:  # the divergence at the end would flatten the interesting part
        low, top = min(finite + raw), min(max(finite), 4 * min(finite) if min(finite) > 0 else max(finite))
        ax.set_ylim(low - 0.05 * (top - low + 1e-12), top + 0.05 * (top - low + 1e-12))
    ax.legend(loc="best")
    ax.set_title("learning-rate finder")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return out


def lr_find(
    recipe: Any,
    overrides: Sequence[str] = (),
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    diverge: float = 4.0,
    beta: float = 0.98,
    plot: str | os.PathLike | None = None,
    num_classes: int | None = None,
) -> LrFindResult:
    """Sweep ``optim.lr`` from ``start_lr`` to ``end_lr`` exponentially over ``steps`` training steps (see the module
    docstring); returns the losses and the suggestion, and writes the plot to ``plot`` when given.

    ``recipe`` is what :func:`surgery.train` takes (a path, a built-in name, a mapping or a loaded recipe); its data
    is checked and loaded as training would. The sweep trains a copy in memory: nothing on disk changes.
    """
    from surgery.recipe import LoadedRecipe, load_recipe
    from surgery.train.trainer import Trainer

    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise RecipeError(f"lr-find: need 0 < start lr < end lr, got {start_lr:g} and {end_lr:g}")
    if steps < 2:
        raise RecipeError(f"lr-find: need at least 2 steps, got {steps}")
    loaded = recipe if isinstance(recipe, LoadedRecipe) and not overrides else load_recipe(recipe, overrides)
    # in memory only: no output folder, no push, whatever train.output_dir and hub.repo say
    spec = loaded.train.model_copy(update={"output_dir": None})
    quiet = loaded.model_copy(update={"train": spec, "hub": loaded.hub.model_copy(update={"repo": None})})
    quiet._origins, quiet._source = loaded._origins, loaded._source
    trainer = Trainer(quiet, None, None, None, None, num_classes=num_classes, progress=False)
    trainer.setup_checks()
    try:
        trainer.setup()
        result = _sweep(trainer, start_lr, end_lr, steps, diverge, beta)
    finally:
        trainer.cleanup()
    if plot is not None:
        result = replace(result, plot=write_lr_plot(result, plot))
    return result


def _sweep(trainer: Any, start: float, end: float, steps: int, diverge: float, beta: float) -> LrFindResult:
    from surgery.train.evaluate import split_batch

    acc, model, optimizer, spec = trainer.acc, trainer.model, trainer.optimizer, trainer.spec
    first = trainer.stages[0].lr if trainer.stages else None
    base, key = (first, "train.stages[0].lr") if first is not None else (trainer.recipe.optim.lr, "optim.lr")
    ratios = [g["lr"] / base for g in optimizer.param_groups]
    loader = trainer.data_loaders["train"]
    if len(loader) == 0:
        raise DataError("lr-find: the training data is empty")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    best, avg, diverged, epoch = math.inf, 0.0, False, 0
    model.train()
    while len(lrs) < steps and not diverged:
        if trainer.sampler is not None:  # a new order each pass, as training's epochs
            trainer.sampler.epoch = epoch
        if trainer.seeded is not None:
            trainer.seeded.epoch = epoch
        for batch in loader:
            i = len(lrs)
            if i >= steps:
                break
            lr = start * (end / start) ** (i / (steps - 1))
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            x, y = split_batch(batch)
            with acc.autocast():
                loss = trainer.loss(model(trainer._input(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
            optimizer.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            avg = beta * avg + (1 - beta) * value
            smoothed.append(avg / (1 - beta ** (i + 1)))
            best = min(best, smoothed[-1])
            if not math.isfinite(smoothed[-1]) or (i > 0 and smoothed[-1] > diverge * best):
                diverged = True
                break
        epoch += 1
    return LrFindResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=steepest(lrs, smoothed),
        ratios=ratios,
        diverged=diverged,
        key=key,
    )
