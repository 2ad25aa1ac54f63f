"""Classification evaluation: an accumulator over ``(logits, targets)`` batches, class weights and result writers.

The numbers are the ones timm's ``validate.py`` and scikit-learn users know (the tests check each against
scikit-learn, which is only a dev dependency): mean cross-entropy (binary cross-entropy for one-logit outputs),
top-1, top-5 (only with more than 5 classes), per-class precision / recall / F1 / support, macro-F1, balanced accuracy
and the confusion matrix (rows = true class, columns = predicted class).

Conventions for classes that the evaluated data never mentions (no NaN anywhere):

- per class, scikit-learn's ``zero_division=0``: a class never predicted has precision 0, a class with no samples
  has recall 0, and F1 is 0 when precision + recall is 0;
- ``macro_f1`` averages F1 over the classes present in the targets or the predictions, exactly as
  ``sklearn.metrics.f1_score(y_true, y_pred, average="macro")`` without ``labels=``;
- ``balanced_accuracy`` averages recall over the classes present in the targets, as
  ``sklearn.metrics.balanced_accuracy_score``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from surgery.errors import DataError, RecipeError
from surgery.io import atomic_write, write_text

__all__ = [
    "EvalResult",
    "MetricsAccumulator",
    "Prediction",
    "class_weights",
    "read_predictions_csv",
    "write_confusion_png",
    "write_predictions_csv",
]

LossKind = Literal["auto", "cross_entropy", "bce"]
TOPK = 5  # top-5 is reported only when there are more than TOPK classes, as timm's validate.py does in spirit


@dataclass(frozen=True)
class EvalResult:
    """What :meth:`MetricsAccumulator.compute` returns. Fractions are in [0, 1]; per-class lists follow class order."""

    num_samples: int
    num_classes: int
    loss: float
    top1: float
    top5: float | None  # None when there are 5 classes or fewer
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro_f1: float
    balanced_accuracy: float
    confusion: list[list[int]]  # confusion[true][predicted]
    binary: bool  # one-logit output scored with binary cross-entropy (class 1 = logit > 0)
    class_names: list[str] = field(default_factory=list)

    def scalars(self, prefix: str = "val_") -> dict[str, float]:
        """The flat numbers a trainer logs and monitors: ``{prefix}loss``, ``top1``, ``top5`` (when defined),
        ``macro_f1``, ``balanced_acc``."""
        out = {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1}
        if self.top5 is not None:
            out[f"{prefix}top5"] = self.top5
        out[f"{prefix}macro_f1"] = self.macro_f1
        out[f"{prefix}balanced_acc"] = self.balanced_accuracy
        return out

    def per_class(self) -> list[dict[str, Any]]:
        """One dict per class: name, precision, recall, f1, support (for tables and JSON)."""
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        return [
            {"class": n, "precision": p, "recall": r, "f1": f, "support": s}
            for n, p, r, f, s in zip(names, self.precision, self.recall, self.f1, self.support, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-serialisable values."""
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """One row of the per-image predictions CSV. ``topk`` holds (label, probability), most probable first."""

    path: str
    target: str
    predicted: str
    probability: float
    topk: tuple[tuple[str, float], ...] = ()

    @property
    def correct(self) -> bool:
        return self.target == self.predicted


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities of a batch of logits ``(N, C)``: a softmax, or for a one-logit (binary cross-entropy)
    model ``(N, 1)`` the two classes ``[1 - sigmoid, sigmoid]`` (a softmax over one logit would always say 1.0).
    Evaluation and prediction both read probabilities here."""
    if logits.shape[-1] == 1:
        p1 = torch.sigmoid(logits.float().reshape(-1))
        return torch.stack([1 - p1, p1], 1)
    return logits.float().softmax(-1)


class MetricsAccumulator:
    """Feed ``update(logits, targets)`` batch by batch, then ``compute()``; batch order and size do not matter.

    ``logits`` is ``(N, C)`` with C >= 2 (cross-entropy, prediction = argmax) or ``(N,)`` / ``(N, 1)`` for a
    one-logit binary model (binary cross-entropy, prediction = logit > 0, reported as 2 classes), chosen by
    ``loss`` like the trainer's ``loss: auto``. ``targets`` are integer class indices. In a multi-process run, pass
    what ``accelerator.gather_for_metrics((logits, targets))`` returns, so padding duplicates are already dropped.

    Memory is a C x C confusion matrix plus, with ``keep_predictions=True``, the top-k of every sample (for
    :meth:`predictions` and the predictions CSV). The loss is the plain mean over samples: evaluation ignores
    training's class weights and label smoothing, as timm's validate.py does.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        loss: LossKind = "auto",
        class_names: Sequence[str] | None = None,
        keep_predictions: bool = False,
    ) -> None:
        if loss not in ("auto", "cross_entropy", "bce"):
            raise ValueError(f"loss must be auto, cross_entropy or bce, got {loss!r}")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.loss_kind = loss
        self.num_classes = num_classes if num_classes is not None else (len(class_names) if class_names else None)
        self.class_names = list(class_names) if class_names is not None else None
        self.keep_predictions = keep_predictions
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._binary: bool | None = None
        self._confusion: torch.Tensor | None = None
        self._loss_sum = 0.0
        self._topk_hits = 0
        self._n = 0
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # targets, top-k indices, top-k probs

    def _is_binary(self, logits: torch.Tensor) -> bool:
        one = logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)
        if self.loss_kind == "bce" and not one:
            raise ValueError(f"loss bce needs one logit per sample, got logits of shape {tuple(logits.shape)}")
        if self.loss_kind == "cross_entropy" and one:
            raise ValueError("loss cross_entropy needs at least 2 logits per sample; use loss auto or bce")
        return one

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch. Tensors may live on any device; they are moved to the CPU."""
        logits = logits.detach().float().cpu()
        targets = targets.detach().cpu().reshape(-1)
        if targets.is_floating_point():
            if not torch.equal(targets, targets.round()):
                raise ValueError("targets must be class indices, got fractional values (soft targets are for training)")
        targets = targets.long()
        binary = self._is_binary(logits)
        if not binary and logits.ndim != 2:
            raise ValueError(f"logits must be (N, C) or (N,), got shape {tuple(logits.shape)}")
        if self._binary is None:
            self._binary = binary
            classes = 2 if binary else logits.shape[1]
            if self.num_classes is not None and self.num_classes != classes:
                raise DataError(
                    f"the model has {classes} outputs for {self.num_classes} classes; "
                    "evaluate with the classifier trained for these classes"
                )
            self.num_classes = classes
            self._confusion = torch.zeros(classes, classes, dtype=torch.long)
        elif binary != self._binary or (not binary and logits.shape[1] != self.num_classes):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match earlier batches")
        n, c = targets.numel(), self.num_classes
        assert c is not None and self._confusion is not None
        if logits.shape[0] != n:
            raise ValueError(f"{logits.shape[0]} logits for {n} targets")
        if n == 0:
            return
        if int(targets.min()) < 0 or int(targets.max()) >= c:
            bad = int(targets[(targets < 0) | (targets >= c)][0])
            raise DataError(f"target class {bad} is outside the model's {c} classes (0..{c - 1}); check the labels")
        probs = class_probabilities(logits)
        if binary:
            flat = logits.reshape(-1)
            loss = F.binary_cross_entropy_with_logits(flat.double(), targets.double(), reduction="none")
            score = torch.stack([torch.zeros_like(flat), flat], 1)  # class 1 iff logit > 0 (not a rounded sigmoid)
        else:
            loss = F.cross_entropy(logits.double(), targets, reduction="none")
            score = logits
        # A stable sort breaks ties towards the lower index, as argmax does: the prediction, the top-k and the
        # confusion matrix agree even for an untrained zero-initialised head whose logits are all equal.
        order = score.sort(dim=1, descending=True, stable=True).indices[:, : min(TOPK, c)]
        pred = order[:, 0]
        self._loss_sum += float(loss.sum())  # per-sample in float64: batching changes the total only at 1e-16
        self._confusion += torch.bincount(targets * c + pred, minlength=c * c).reshape(c, c)
        if c > TOPK:
            self._topk_hits += int((order == targets[:, None]).any(1).sum())
        self._n += n
        if self.keep_predictions:
            self._kept.append((targets, order, probs.gather(1, order)))

    def compute(self) -> EvalResult:
        """The metrics over every batch fed so far (see the module docstring for the zero-division rules)."""
        if self._n == 0 or self._confusion is None:
            raise DataError("no samples were evaluated; the evaluation data is empty")
        cm = self._confusion.numpy().astype(np.int64)
        tp = np.diag(cm).astype(np.float64)
        predicted, support = cm.sum(0), cm.sum(1)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        seen = (predicted > 0) | (support > 0)
        c = cm.shape[0]
        return EvalResult(
            num_samples=self._n,
            num_classes=c,
            loss=self._loss_sum / self._n,
            top1=float(tp.sum() / self._n),
            top5=self._topk_hits / self._n if c > TOPK else None,
            precision=precision.tolist(),
            recall=recall.tolist(),
            f1=f1.tolist(),
            support=support.tolist(),
            macro_f1=float(f1[seen].mean()),
            balanced_accuracy=float(recall[support > 0].mean()),
            confusion=cm.tolist(),
            binary=bool(self._binary),
            class_names=list(self.class_names) if self.class_names else [],
        )

    def predictions(self, paths: Sequence[str | os.PathLike]) -> list[Prediction]:
        """Per-sample rows for :func:`write_predictions_csv`, in the order the samples were fed.

        ``paths`` names the samples in that same order (a non-shuffled loader over the dataset; in a multi-process
        run, the order of ``gather_for_metrics``). Labels are class names when known, else class indices.
        """
        if not self.keep_predictions:
            raise ValueError("create the accumulator with keep_predictions=True to list predictions")
        if len(paths) != self._n:
            raise ValueError(f"{len(paths)} paths for {self._n} evaluated samples")
        names = self.class_names or [str(i) for i in range(self.num_classes or 0)]
        rows, i = [], 0
        for targets, top_i, top_p in self._kept:
            for t, idx, prob in zip(targets.tolist(), top_i.tolist(), top_p.tolist(), strict=True):
                topk = tuple((names[j], float(p)) for j, p in zip(idx, prob, strict=True))
                rows.append(Prediction(str(paths[i]), names[t], topk[0][0], topk[0][1], topk))
                i += 1
        return rows


def class_weights(
    counts: Sequence[int] | Mapping[str, int], mode: str | Sequence[float] = "auto"
) -> torch.Tensor | None:
    """Per-class loss weights for ``train.class_weights``: ``auto``, ``none`` or one number per class.

    ``counts`` is the number of training samples per class, in class order (a list, or a name -> count mapping such
    as ``FolderReport.train_counts``). ``auto`` is scikit-learn's "balanced" rule ``n_samples / (n_classes * count)``
    (weights average 1 over the samples); ``none`` returns None (no weighting). Use the result as
    ``F.cross_entropy(weight=...)``; for a one-logit binary model, ``pos_weight = w[1] / w[0]`` is the equivalent.
    Raises :class:`~surgery.errors.RecipeError` naming ``train.class_weights`` for a list of the wrong length, a
    negative, non-finite or all-zero list, or ``auto`` with a class that has no samples.
    """
    names = [str(k) for k in counts] if isinstance(counts, Mapping) else [str(i) for i in range(len(counts))]
    values = [int(v) for v in (counts.values() if isinstance(counts, Mapping) else counts)]
    n = len(values)
    if isinstance(mode, str):
        if mode == "none":
            return None
        if mode != "auto":
            raise RecipeError(f"train.class_weights must be auto, none or a list of numbers, got '{mode}'")
        empty = [names[i] for i, v in enumerate(values) if v <= 0]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise RecipeError(
                f"train.class_weights: auto cannot weight class '{empty[0]}' with no training samples{more}; "
                "add samples for it or give explicit weights"
            )
        total = sum(values)
        return torch.tensor([total / (n * v) for v in values], dtype=torch.float32)
    weights = list(mode)
    if len(weights) != n:
        raise RecipeError(
            f"train.class_weights has {len(weights)} values but the data has {n} classes; "
            "give one weight per class in class order, or use auto"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise RecipeError(
                f"train.class_weights[{i}] (class '{names[i]}') is {w!r}; weights must be finite numbers >= 0"
            )
    if not any(weights):
        raise RecipeError("train.class_weights are all 0, which leaves no loss; give at least one positive weight")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def write_confusion_png(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "confusion matrix",
) -> Path:
    """Plot a confusion matrix (rows = true class) as a PNG, atomically.

    Colours are row-normalised (recall per true class, so rare classes are as visible as common ones); each cell shows
    its count, and its share of the row when there is room. Figure size and fonts scale with the class count; counts
    are written up to 50 classes, beyond that only the colours remain.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is slow to import
    from matplotlib.figure import Figure

    cm = np.asarray(matrix, dtype=np.int64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {c} class names")
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = min(30.0, max(4.5, 0.32 * c + 2.5))
    font = max(6.0, min(10.0, 120 / max(c, 1)))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ticks = np.arange(c)
    rotate = {"rotation": 90, "ha": "center"} if c > 8 else {"rotation": 30, "ha": "right", "rotation_mode": "anchor"}
    ax.set_xticks(ticks, [str(n) for n in class_names], fontsize=font, **rotate)
    ax.set_yticks(ticks, [str(n) for n in class_names], fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 50:
        for i in range(c):
            for j in range(c):
                if cm[i, j] == 0 and c > 12:
                    continue  # empty cells stay blank on big matrices, so the mistakes stand out
                text = f"{cm[i, j]}\n{norm[i, j]:.0%}" if c <= 12 else str(cm[i, j])
                colour = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=font, color=colour)
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return out


PREDICTION_COLUMNS = ("path", "true_label", "predicted_label", "probability", "correct", "top_k")


def write_predictions_csv(rows: Iterable[Prediction], path: str | os.PathLike) -> Path:
    """Write per-image predictions as CSV, atomically.

    Columns: ``path, true_label, predicted_label, probability`` (of the predicted label), ``correct`` (0/1) and
    ``top_k``: a JSON list of ``[label, probability]`` pairs, most probable first (JSON, so any class name is safe).
    """
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for r in rows:
        topk = json.dumps([[label, float(f"{p:.6g}")] for label, p in r.topk], separators=(",", ":"))
        writer.writerow([r.path, r.target, r.predicted, f"{r.probability:.6g}", int(r.correct), topk])
    return write_text(path, buf.getvalue())


def read_predictions_csv(path: str | os.PathLike) -> list[Prediction]:
    """Read a file written by :func:`write_predictions_csv` (probabilities as written: 6 significant digits)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PREDICTION_COLUMNS:
            raise DataError(f"{path}: not a predictions file; its header must be {','.join(PREDICTION_COLUMNS)}")
        rows = []
        for rec in reader:
            topk = tuple((str(label), float(p)) for label, p in json.loads(rec["top_k"] or "[]"))
            rows.append(
                Prediction(rec["path"], rec["true_label"], rec["predicted_label"], float(rec["probability"]), topk)
            )
    return rows
