"""Randomness as a function of (seed, epoch, batch), never of a global generator's history: exact resume.

Each sample's augmentation is drawn from generators seeded by (seed, epoch, index) (:class:`SeededDataset`), each
step's dropout from one seeded by (seed, epoch, batch, rank) (:func:`seed_step`), and the data order from
(seed, epoch) (:class:`EpochSampler`). A run resumed at any step therefore sees the same numbers as one that never
stopped.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

__all__ = ["EpochSampler", "SeededDataset", "balanced_weights", "mix", "needs_seeding", "seed_step"]


def mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochSampler(Sampler[int]):
    """Shuffled order that depends only on (seed, epoch): the same on every process and after a resume.

    The trainer sets ``epoch`` itself. There is deliberately no ``set_epoch`` method: Accelerate's loaders call it
    with their own iteration count, which restarts at 0 in a resumed run.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.weights = weights  # per-sample weights: draw n with replacement (data.sampler: balanced)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        gen = torch.Generator().manual_seed(mix(self.seed, self.epoch))
        if self.weights is not None:  # as torch's WeightedRandomSampler, with the (seed, epoch) generator
            return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=gen).tolist())
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
        seed = mix(self.seed, self.epoch, index)
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
    from surgery.data.transforms import is_deterministic_transform

    return not is_deterministic_transform(transform) or getattr(dataset, "target_transform", None) is not None


def balanced_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that make every class equally likely: 1 / (samples of its class)."""
    counts = torch.bincount(targets.long())
    return 1.0 / counts[targets.long()].double()


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout, drop-path on ``device``; NumPy for timm's Mixup)."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
