"""The training loss (cross-entropy with class weights and label smoothing, timm's soft-target loss under
mixup/CutMix, or binary cross-entropy on one logit) and the evaluation loop over a loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import DataError, RecipeError
from surgery.metrics import EvalResult, MetricsAccumulator


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch: a tuple/list, or a dict with 'image'/'x'/'input' and 'label'/'y'/'target'."""
    if isinstance(batch, dict):
        x = batch.get("image", batch.get("x", batch.get("input")))
        y = batch.get("label", batch.get("y", batch.get("target")))
        if x is None or y is None:
            raise DataError(f"a batch dict needs 'image'/'x' and 'label'/'y' keys, got {sorted(batch)}")
        return x, y
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise DataError("each batch must be (inputs, targets) or a dict with 'x'/'image' and 'y'/'label'")


class Loss:
    """The training loss: cross-entropy, or binary cross-entropy for one-logit outputs (``loss: auto`` decides from
    the output); ``weights`` are per-class weights (``train.class_weights``), soft targets (timm's ``Mixup``) go to
    timm's ``SoftTargetCrossEntropy``.

    Hard targets use ``F.cross_entropy(weight=, label_smoothing=)`` rather than timm's ``LabelSmoothingCrossEntropy``:
    the same smoothed loss, but torch's also takes class weights.
    """

    def __init__(self, kind: str, label_smoothing: float, weights: torch.Tensor | None = None) -> None:
        self.kind, self.label_smoothing, self.weights = kind, label_smoothing, weights
        self._soft: nn.Module | None = None

    def binary(self, logits: torch.Tensor) -> bool:
        return self.kind == "bce" or (self.kind == "auto" and (logits.ndim == 1 or logits.shape[-1] == 1))

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        binary = self.binary(logits)
        if self.weights is not None and not binary and self.weights.numel() != logits.shape[-1]:
            raise RecipeError(
                f"train.class_weights has {self.weights.numel()} values but the model has {logits.shape[-1]} outputs; "
                "give one weight per class"
            )
        if target.is_floating_point() and target.ndim == 2 and target.shape == logits.shape and not binary:
            if self._soft is None:
                from timm.loss import SoftTargetCrossEntropy

                self._soft = SoftTargetCrossEntropy()
            return self._soft(logits, target)
        if binary:
            if target.ndim == 2 and target.shape[-1] > 1:
                raise RecipeError(
                    "train.mixup/cutmix need a model with one output per class; a one-logit (bce) model cannot mix"
                )
            pos_weight = None
            if self.weights is not None:
                w = self.weights.to(logits.device)
                pos_weight = (w[1] / w[0]).reshape(1) if w.numel() == 2 and w[0] > 0 else None
                if pos_weight is None:
                    raise RecipeError(
                        "train.class_weights for a one-logit (bce) model need 2 values with a positive first one"
                    )
            return F.binary_cross_entropy_with_logits(
                logits.reshape(-1), target.float().reshape(-1), pos_weight=pos_weight
            )
        weight = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits, target.long(), weight=weight, label_smoothing=self.label_smoothing)


@torch.no_grad()
def evaluate_result(
    acc: Any,
    net: nn.Module,
    loader: Any,
    loss: Loss,
    to_input: Callable[[Any], Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> EvalResult | None:
    """Every metric of :class:`surgery.metrics.MetricsAccumulator` for ``net`` over ``loader``, gathered over every
    process (Accelerate's ``gather_for_metrics`` drops the samples repeated to even out the last batch); None for
    an empty loader. The loss is unweighted and unsmoothed, as timm's validate.py reports it."""
    was = net.training
    net.eval()
    names = list(class_names) if class_names else None
    metrics = MetricsAccumulator(loss=loss.kind, class_names=names)  # type: ignore[arg-type]
    seen = False
    try:
        for batch in loader:
            x, y = split_batch(batch)
            if to_input is not None:
                x = to_input(x)
            with acc.autocast():
                logits = net(x)
            logits, y = acc.gather_for_metrics((logits.float(), y))
            if names is not None and (logits.ndim == 1 or logits.shape[-1] == 1 or logits.shape[-1] != len(names)):
                metrics.class_names, names = None, None  # a one-logit model is scored as 2 classes: plain indices
            metrics.update(logits, y)
            seen = True
    finally:
        net.train(was)
    return metrics.compute() if seen else None


def evaluate(
    acc: Any,
    net: nn.Module,
    loader: Any,
    loss: Loss,
    prefix: str = "",
    to_input: Callable[[Any], Any] | None = None,
    split: str = "val",
) -> dict[str, float]:
    """``{prefix}{split}_loss``, ``_top1``, ``_top5`` (more than 5 classes), ``_macro_f1`` and ``_balanced_acc`` of
    ``net`` over ``loader`` (see :func:`evaluate_result`); empty for an empty loader."""
    result = evaluate_result(acc, net, loader, loss, to_input)
    return result.scalars(f"{prefix}{split}_") if result is not None else {}
