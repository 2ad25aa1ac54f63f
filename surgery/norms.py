"""BatchNorm handling for frozen parts: the classic bug is a "frozen" BatchNorm whose running statistics still move.

Two conversions, both keeping the module's tensors:

- ``frozen``: timm's ``freeze_batch_norm_2d`` (BatchNorm2d, SyncBatchNorm, BatchNormAct2d -> FrozenBatchNorm2d /
  FrozenBatchNormAct2d), computed with the eval-mode BatchNorm kernel so outputs match a plain BatchNorm bit for bit.
  timm has no 1-d version, so BatchNorm1d becomes :class:`FrozenBatchNorm1d` here.
- ``eval``: the module becomes ``StatsFixed<its class>``, a subclass whose ``train()`` keeps it in eval mode, so running
  statistics stay fixed while its affine parameters may still train. Subclassing keeps every attribute, the state-dict
  names and ``isinstance`` checks of the original class.

Every class here is defined statically (none is built at run time), so a model after :func:`surgery.apply` pickles
(``torch.save(model)``) and deep-copies. A conversion changes the module's ``__class__`` to a subclass that adds no
state, or back. :func:`stats_move` is the one test of "are this norm's running statistics updating".
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d, SplitBatchNorm2d, SyncBatchNormAct, freeze_batch_norm_2d
from timm.layers import FrozenBatchNormAct2d as TimmFrozenBatchNormAct2d
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """timm's frozen BatchNorm (torchvision's class), computed by the same kernel as an eval-mode BatchNorm2d.

    The parent computes ``x * scale + shift``, which differs from ``BatchNorm2d`` in the last float bits; computing it
    with ``F.batch_norm`` makes a trained model, its reloaded adapter and its merged export (plain BatchNorm2d, as
    timm rebuilds it) give identical outputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FrozenBatchNormAct2d(TimmFrozenBatchNormAct2d):
    """timm's FrozenBatchNormAct2d, computed like an eval-mode BatchNormAct2d (see :class:`FrozenBatchNorm2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


_EXACT: dict[type[nn.Module], type[nn.Module]] = {
    TorchvisionFrozenBatchNorm2d: FrozenBatchNorm2d,
    TimmFrozenBatchNormAct2d: FrozenBatchNormAct2d,
}


def _exact(module: nn.Module) -> nn.Module:
    """timm's frozen module as the subclass above (which adds no state), in place."""
    cls = _EXACT.get(type(module))
    if cls is not None:
        module.__class__ = cls
    return module


class FrozenBatchNorm1d(nn.Module):
    """BatchNorm1d with fixed statistics and affine parameters (buffers), like timm's FrozenBatchNorm2d."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the eval-mode BatchNorm1d kernel: identical outputs
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, D401
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm1d checkpoints carry this counter
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class StatsFixed:
    """Mixin: the BatchNorm stays in eval mode (running statistics fixed) whatever ``model.train()`` says."""

    def train(self, mode: bool = True):  # noqa: ANN201
        return super().train(False)  # type: ignore[misc]


class StatsFixedBatchNorm1d(StatsFixed, nn.BatchNorm1d):
    """BatchNorm1d with fixed running statistics."""


class StatsFixedBatchNorm2d(StatsFixed, nn.BatchNorm2d):
    """BatchNorm2d with fixed running statistics."""


class StatsFixedBatchNorm3d(StatsFixed, nn.BatchNorm3d):
    """BatchNorm3d with fixed running statistics."""


class StatsFixedSyncBatchNorm(StatsFixed, nn.SyncBatchNorm):
    """SyncBatchNorm with fixed running statistics."""


class StatsFixedBatchNormAct2d(StatsFixed, BatchNormAct2d):
    """timm's BatchNormAct2d with fixed running statistics."""


class StatsFixedSyncBatchNormAct(StatsFixed, SyncBatchNormAct):
    """timm's SyncBatchNormAct with fixed running statistics."""


class StatsFixedSplitBatchNorm2d(StatsFixed, SplitBatchNorm2d):
    """timm's SplitBatchNorm2d with fixed running statistics."""


# BatchNorm class -> its stats-fixed subclass. Another BatchNorm class has no stats-fixed form: the plan says so.
_STATS_FIXED: dict[type[nn.Module], type[nn.Module]] = {
    cls.__mro__[2]: cls
    for cls in (
        StatsFixedBatchNorm1d,
        StatsFixedBatchNorm2d,
        StatsFixedBatchNorm3d,
        StatsFixedSyncBatchNorm,
        StatsFixedBatchNormAct2d,
        StatsFixedSyncBatchNormAct,
        StatsFixedSplitBatchNorm2d,
    )
}
_RELEASED = {fixed: base for base, fixed in _STATS_FIXED.items()}


def stats_fixed_class(cls: type[nn.Module]) -> type[nn.Module] | None:
    """``StatsFixed<cls>`` (``cls`` itself when already stats-fixed); None for a class with no stats-fixed form."""
    if cls in _RELEASED:
        return cls
    return _STATS_FIXED.get(cls)


def stats_move(module: nn.Module) -> bool:
    """Whether training changes this module's running statistics: a BatchNorm that tracks them and is not fixed.

    The one test of "moving statistics": the plan, the feature cache and the adapter's optional buffers read it.
    """
    return isinstance(module, _BatchNorm) and bool(module.track_running_stats) and not isinstance(module, StatsFixed)


def batchnorms(model: nn.Module, *, include_fixed: bool = False) -> dict[str, _BatchNorm]:
    """Every BatchNorm-like module whose running statistics move in training (:func:`stats_move`: BatchNorm1d/2d/3d,
    SyncBatchNorm, BatchNormAct2d); ``include_fixed`` adds those already converted by :func:`fix_stats`."""
    return {
        name: m
        for name, m in model.named_modules()
        if stats_move(m) or (include_fixed and isinstance(m, StatsFixed) and m.track_running_stats)
    }


def fix_stats(module: _BatchNorm) -> nn.Module:
    """The module, now of its ``StatsFixed`` class: running statistics fixed (in place; tensors unchanged)."""
    cls = stats_fixed_class(type(module))
    if cls is None:
        raise TypeError(f"{type(module).__name__} has no stats-fixed form")  # the plan never asks for it
    module.__class__ = cls
    module.training = False
    return module


def released_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The class :func:`release` gives a module of class ``cls``."""
    return _RELEASED.get(cls, cls)


def release(module: nn.Module) -> nn.Module:
    """Undo :func:`fix_stats`: the module, as its original class, whose statistics update in training again."""
    base = _RELEASED.get(type(module))
    if base is not None:
        module.__class__ = base
    return module


def freeze(module: _BatchNorm) -> nn.Module:
    """A frozen copy (statistics and affine as buffers) of a BatchNorm module, on the module's device."""
    # timm builds the frozen module on the default device, then assigns the old tensors; building it on the module's
    # own device keeps that valid for CUDA and meta (planning) models alike.
    with torch.device(module.running_mean.device):
        if not isinstance(module, nn.BatchNorm1d):
            return _exact(freeze_batch_norm_2d(module))
        frozen = FrozenBatchNorm1d(module.num_features, module.eps)
    with torch.no_grad():
        if module.affine:
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
    return frozen


def thaw(model: nn.Module) -> nn.Module:
    """Undo every conversion in ``model``, in place: BatchNorms as a freshly built model has them, statistics and
    affine parameters free to train (a model loaded from an adapter that training continues from, ``model.adapter``).

    2-d (and BatchNormAct2d) modules go back through timm's ``unfreeze_batch_norm_2d``, the inverse of the
    ``freeze_batch_norm_2d`` used by :func:`freeze`; timm has no 1-d version, so :class:`FrozenBatchNorm1d` is undone
    here. A BatchNorm's ``momentum`` is not kept by a frozen module and returns as the default 0.1.
    """
    from timm.layers import unfreeze_batch_norm_2d

    unfreeze_batch_norm_2d(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, FrozenBatchNorm1d):
            bn = nn.BatchNorm1d(module.num_features, eps=module.eps, device=module.running_mean.device)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(getattr(module, name))
            model.set_submodule(path, bn)
        else:
            release(module)
    return model


def frozen_class_name(module: _BatchNorm) -> str:
    """The class a ``frozen`` conversion produces, for the plan (without converting)."""
    if isinstance(module, nn.BatchNorm1d):
        return FrozenBatchNorm1d.__name__
    return "FrozenBatchNormAct2d" if isinstance(module, BatchNormAct2d | SyncBatchNormAct) else "FrozenBatchNorm2d"


FROZEN_CLASSES: tuple[type[nn.Module], ...] = (
    TorchvisionFrozenBatchNorm2d,
    TimmFrozenBatchNormAct2d,
    FrozenBatchNorm1d,
)


def frozen_batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm already converted by :func:`freeze` (its affine tensors are buffers, so no rule reaches them)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FROZEN_CLASSES)}
