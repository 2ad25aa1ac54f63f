"""Training progress as one dataclass: where the run is (stage, epoch, batch, steps), the running loss of the epoch,
the per-epoch history, and the best evaluation so far (``train.monitor``) with the evaluations since it improved
(``train.early_stopping``). A checkpoint stores it in ``trainer_state.json`` and a resumed run starts from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Progress of a run. ``batch`` is the next batch of the current epoch (0 at an epoch's start); ``loss_sum`` /
    ``loss_n`` are the running train loss of that epoch, so a run resumed mid-epoch reports the same mean."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    stage: int = 0
    stage_step: int = 0
    stage_epoch: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch", "stage", "monitor", "value"} of the best evaluation so far
    bad_evals: int = 0  # evaluations since the monitored metric last improved (by more than min_delta)
    stopped: bool = False  # early stopping ended the run (a resumed run goes straight to the outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the history is copied)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint record holds (unknown keys are the record's other fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def next_stage(self) -> None:
        """Move to the first epoch of the next stage."""
        self.stage, self.stage_step, self.stage_epoch = self.stage + 1, 0, 0

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """Record an epoch's metrics and move to the next epoch."""
        self.epoch, self.stage_epoch, self.batch = self.epoch + 1, self.stage_epoch + 1, 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.history.append(metrics)

    def observe(self, metrics: dict[str, Any], monitor: str, min_delta: float) -> bool:
        """Compare an evaluation's ``monitor`` value with the best so far; True when it is the new best.

        Losses (``*_loss``) are minimised, everything else maximised; an improvement must exceed ``min_delta`` (the
        first evaluation always is one). ``bad_evals`` counts the evaluations since the last improvement.
        """
        value = float(metrics[monitor])
        if self.best is not None:
            sign = -1.0 if monitor.endswith("_loss") else 1.0
            if sign * (value - float(self.best["value"])) <= min_delta:
                self.bad_evals += 1
                return False
        self.best = {"epoch": metrics["epoch"], "stage": metrics.get("stage"), "monitor": monitor, "value": value}
        self.bad_evals = 0
        return True
