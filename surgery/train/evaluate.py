"""The loss (cross-entropy, or binary cross-entropy on one logit) and the evaluation loop over a val loader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import DataError


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
        """Per-sample (loss, top-1 hit, top-k hit) rows with k = min(5, classes); top-1 hits; the k used."""
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


@torch.no_grad()
def evaluate(
    acc: Any, net: nn.Module, loader: Any, loss: Loss, prefix: str = "", to_input: Callable[[Any], Any] | None = None
) -> dict[str, float]:
    """``{prefix}val_loss``, ``val_top1`` and (k > 1) ``val_top5`` of ``net`` over ``loader``, gathered over every
    process (Accelerate's ``gather_for_metrics`` drops the samples repeated to even out the last batch)."""
    was = net.training
    net.eval()
    rows, k = [], 1
    try:
        for batch in loader:
            x, y = split_batch(batch)
            if to_input is not None:
                x = to_input(x)
            with acc.autocast():
                logits = net(x)
            per, _, k = loss.counts(logits, y)
            rows.append(acc.gather_for_metrics(per))
    finally:
        net.train(was)
    if not rows:
        return {}
    allrows = torch.cat(rows)
    out = {f"{prefix}val_loss": float(allrows[:, 0].mean()), f"{prefix}val_top1": float(allrows[:, 1].mean())}
    if k > 1:
        out[f"{prefix}val_top5"] = float(allrows[:, 2].mean())  # top-k, k = min(5, classes)
    return out
