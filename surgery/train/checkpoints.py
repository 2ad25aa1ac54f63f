"""Checkpoints: Accelerate's state plus ``trainer_state.json`` (progress, what trains, the recipe), written last so a
checkpoint without it is incomplete. The JSON is read once per run (:func:`latest`), into a :class:`Checkpoint`."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import RecipeError, SurgeryError
from surgery.train.run_folder import CHECKPOINTS, STATE_FILE
from surgery.train.state import TrainState


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder and its parsed ``trainer_state.json``."""

    path: Path
    record: dict[str, Any]

    @property
    def state(self) -> TrainState:
        """The progress to resume from."""
        return TrainState.from_dict(self.record)

    def check_recipe(self, recipe: dict[str, Any]) -> None:
        """Refuse to resume with another recipe, naming the keys that differ (dotted, both values)."""
        saved = self.record.get("recipe")
        if saved is not None and saved != recipe:
            diffs = differences(saved, recipe)
            shown = "; ".join(f"{k}: {a} in the checkpoint, {b} now" for k, a, b in diffs[:5])
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise RecipeError(
                f"the checkpoint {self.path} was made with another recipe: {shown}{more}; resume with the same recipe "
                "and overrides, or train into a new output folder"
            )

    def check_run(self, trainable: list[str], processes: int) -> None:
        """Refuse to resume when other parameters train or the number of processes differs."""
        if self.record.get("trainable") != trainable:
            raise SurgeryError(f"the checkpoint {self.path} trains other parameters than this recipe; start a new run")
        if self.record.get("processes", processes) != processes:
            raise SurgeryError(
                f"the checkpoint {self.path} was made with {self.record['processes']} process(es), this run has "
                f"{processes}; resume with the same number (the data position is per process)"
            )


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(dotted key, value in ``a``, value in ``b``) for every leaf that differs; a missing key shows as ``unset``."""
    fa: dict[str, Any] = {}
    fb: dict[str, Any] = {}
    _flatten(a, "", fa)
    _flatten(b, "", fb)
    missing = object()
    out = []
    for key in sorted(set(fa) | set(fb)):
        x, y = fa.get(key, missing), fb.get(key, missing)
        if x != y:
            show = ["unset" if v is missing else json.dumps(v) for v in (x, y)]
            out.append((key, show[0], show[1]))
    return out


def complete(out: Path) -> list[Path]:
    """Complete checkpoints (their state file written last), oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in an output folder, or None."""
    found = complete(Path(out))
    return found[-1] if found else None


def latest(out: Path) -> Checkpoint | None:
    """The newest complete checkpoint, its state file parsed (the one read of it)."""
    path = latest_checkpoint(out)
    if path is None:
        return None
    try:
        record = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise SurgeryError(f"cannot read {path / STATE_FILE}: {err}; delete that checkpoint folder") from None
    return Checkpoint(path, record)


def name(state: TrainState) -> str:
    """The folder name of a checkpoint at ``state`` (sorts in training order)."""
    return f"step_{state.global_step:08d}_e{state.epoch:04d}_b{state.batch:06d}"


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write the state file last, atomically: a checkpoint without it is incomplete."""
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path / STATE_FILE)


def prune(out: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints."""
    for old in complete(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
