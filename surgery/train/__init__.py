"""Training a recipe (`surgery train`). The rooms of this package:

- :mod:`~surgery.train.trainer`: :func:`train`, the Accelerate loop (setup, fit, finish, cleanup);
- :mod:`~surgery.train.state`: :class:`TrainState`, the progress a checkpoint holds;
- :mod:`~surgery.train.checkpoints`: save, find and check checkpoints (the state file read once);
- :mod:`~surgery.train.seeding`: randomness as a function of (seed, epoch, batch), for exact resume;
- :mod:`~surgery.train.feature_cache`: the linear-probe feature cache;
- :mod:`~surgery.train.evaluate`: the loss and the evaluation loop;
- :mod:`~surgery.train.run_folder`: every file name of a run folder, the default folder, --resume/--overwrite.

Importing this package is light (no torch, no accelerate): the names below load their module on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "train": "surgery.train.trainer",
    "Trainer": "surgery.train.trainer",
    "TrainResult": "surgery.train.trainer",
    "Interrupted": "surgery.train.trainer",
    "default_output_dir": "surgery.train.trainer",
    "TrainState": "surgery.train.state",
    "latest_checkpoint": "surgery.train.checkpoints",
    "feature_cache_reason": "surgery.train.feature_cache",
    "EpochSampler": "surgery.train.seeding",
    "SeededDataset": "surgery.train.seeding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery.train' has no attribute {name!r}")
    return getattr(import_module(module), name)


if TYPE_CHECKING:
    from surgery.train.checkpoints import latest_checkpoint  # noqa: F401
    from surgery.train.feature_cache import feature_cache_reason  # noqa: F401
    from surgery.train.seeding import EpochSampler, SeededDataset  # noqa: F401
    from surgery.train.state import TrainState  # noqa: F401
    from surgery.train.trainer import Interrupted, Trainer, TrainResult, default_output_dir, train  # noqa: F401
