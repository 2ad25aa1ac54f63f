"""The run folder: every file name `surgery train` writes (as PEFT names ``WEIGHTS_NAME``), the default folder of a
run, and the rule for re-running into a folder (``--resume`` continues, ``--overwrite`` replaces, else an error).

The adapter's own files (``adapter.safetensors``, ``surgery.json``, ``README.md``) are named by
:mod:`surgery.adapter.format`; they are listed here too, so :func:`clear` knows everything a run owns.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

WEIGHTS = "model.safetensors"  # the whole trained model
EMA_WEIGHTS = "model_ema.safetensors"  # its weight average (train.ema)
RECIPE = "recipe.yaml"  # the resolved recipe, num_classes filled from the data
PLAN = "plan.json"  # the first stage's plan
CLASSES = "classes.json"  # class names, in label order
METRICS = "metrics.json"  # final metrics and the per-epoch history
METRICS_LOG = "metrics.jsonl"  # one line per optimizer update and one per epoch (Accelerate tracker)
TRAIN_LOG = "train.log"  # the lines the run printed
CURVE = "learning_curve.png"
SKIPPED = "skipped_images.txt"  # undecodable images left out (data.skip_bad_images), one path a line
LOGS = "logs"  # TensorBoard
CHECKPOINTS = "checkpoints"
BEST = "best"  # the best epoch's weights (train.keep_best), also kept inside each checkpoint
BEST_RECORD = "best.json"  # inside BEST: which epoch, monitor and value
TEST_CONFUSION = "test_confusion.png"  # the confusion matrix of data.test_dir
STATE_FILE = "trainer_state.json"  # inside each checkpoint, written last
ADAPTER_FILES = ("adapter.safetensors", "surgery.json", "README.md")  # surgery.adapter.format's names

FILES = (
    WEIGHTS,
    EMA_WEIGHTS,
    RECIPE,
    PLAN,
    CLASSES,
    METRICS,
    METRICS_LOG,
    TRAIN_LOG,
    CURVE,
    SKIPPED,
    TEST_CONFUSION,
    *ADAPTER_FILES,
)
FOLDERS = (LOGS, CHECKPOINTS, BEST)
DEFAULT_ROOT = Path("output") / "train"


def default_output_dir(model: str | None, recipe_name: str | None, *, root: Path = DEFAULT_ROOT) -> Path:
    """A fresh folder ``output/train/<date>-<time>-<model>-<recipe>`` (as timm's train.py), never an existing one."""
    parts = [time.strftime("%Y%m%d-%H%M%S")]
    for part in (model, recipe_name):
        if part:
            parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "_", part.split("/")[-1]).strip("._") or "x")
    base = root / "-".join(parts)
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def owned(out: Path) -> list[Path]:
    """The entries of ``out`` a run wrote (files and folders of :data:`FILES` / :data:`FOLDERS`)."""
    return [out / name for name in (*FILES, *FOLDERS) if (out / name).exists()]


def check_reuse(out: Path, *, resume: bool, overwrite: bool, has_checkpoint: bool) -> None:
    """Refuse to mix two runs in one folder: resuming needs a checkpoint; a new run needs a folder with no run in it,
    or ``overwrite``."""
    if resume and overwrite:
        raise SurgeryError("--resume and --overwrite contradict each other: resume continues a run, overwrite drops it")
    if resume:
        if not has_checkpoint:
            raise SurgeryError(
                f"--resume: '{out}' holds no checkpoint of a run ({CHECKPOINTS}/*/{STATE_FILE}); give the output "
                "folder of the interrupted run, or drop --resume to start a new one"
            )
        return
    found = owned(out) if out.is_dir() else []
    if found and not overwrite:
        raise SurgeryError(
            f"'{out}' already holds a run ({found[0].name}); pass --resume (resume=True) to continue it, "
            "--overwrite (overwrite=True) to replace it, or choose another output folder"
        )


def clear(out: Path) -> None:
    """Delete what an earlier run wrote into ``out`` (only the run's own files: anything else stays)."""
    for path in owned(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def trim_metrics_log(out: Path, global_step: int, epoch: int) -> None:
    """Drop the ``metrics.jsonl`` lines a resumed run logs again: those after update ``global_step``, and epoch lines
    after ``epoch`` (an epoch's line has the step of its last update, and the checkpoint may be of that update)."""
    jsonl = out / METRICS_LOG
    if jsonl.exists():
        keep = []
        for line in jsonl.read_text().splitlines():
            if not line:
                continue
            rec = json.loads(line)
            step = rec.get("step") or 0
            if step < global_step or (step == global_step and rec.get("epoch", 0) <= epoch):
                keep.append(line)
        jsonl.write_text("".join(line + "\n" for line in keep))


def write_skipped(out: Path, skipped: Sequence[Path]) -> None:
    """List undecodable images left out of training, one path a line (none: no file)."""
    if skipped:
        (out / SKIPPED).write_text("".join(f"{p}\n" for p in skipped))


def plot(history: list[dict[str, Any]], path: Path, title: str = "learning curve", best: int | None = None) -> Any:
    """The learning curve: train and val loss per epoch, val top-1 and macro-F1 on a second axis; integer epoch
    ticks, a dotted line where a stage begins, the ``best`` epoch marked, ``title`` naming the run. Returns the
    (closed) matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    evaluated = [h for h in history if "val_loss" in h]
    if evaluated:
        ax.plot([h["epoch"] for h in evaluated], [h["val_loss"] for h in evaluated], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for prev, h in zip(history, history[1:], strict=False):
        if h.get("stage") != prev.get("stage"):
            ax.axvline(h["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                str(h.get("stage")),
                (h["epoch"] - 0.5, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )
    lines, labels = ax.get_legend_handles_labels()
    if evaluated:
        ax2 = ax.twinx()
        top1 = [h["val_top1"] for h in evaluated]
        ax2.plot([h["epoch"] for h in evaluated], top1, "s--", color="tab:green", label="val top-1")
        if all("val_macro_f1" in h for h in evaluated):
            f1 = [h["val_macro_f1"] for h in evaluated]
            ax2.plot([h["epoch"] for h in evaluated], f1, "^:", color="tab:purple", label="val macro-F1")
        if best is not None:
            ax2.axvline(best, color="tab:red", linewidth=1, alpha=0.5, label=f"best epoch ({best})")
        ax2.set_ylabel("top-1 / macro-F1")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
