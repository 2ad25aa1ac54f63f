"""The model's layer list: what Keras-style ranges and layer-wise lr decay count over.

For timm models the layers are timm's own parameter groups, ``group_matcher(coarse=False)`` fed to timm's
``group_with_matcher``: exactly the ids timm's ``param_groups_layer_decay`` uses (stem first, each block, head last).
Other models (torchvision, any ``nn.Module``) get one layer per top-level child that holds parameters.

Everything here works on parameter *names*, so the planner can lay out a model whose head it has not replaced yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from timm.models._manipulate import group_with_matcher  # timm exports it only from this module
from torch import nn


@dataclass(frozen=True)
class Layer:
    """One layer: its position, a readable name and the parameter names it holds."""

    index: int
    name: str
    params: tuple[str, ...]


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _name_layer(index: int, names: Sequence[str], last: bool) -> str:
    """A readable, unambiguous name: the group's common module path, or its parts joined by '+'."""
    prefix = _common_prefix(names) if len(names) > 1 else names[0].rsplit(".", 1)[0] if "." in names[0] else names[0]
    if prefix:
        return prefix
    parts: dict[str, list[str]] = {}
    for name in names:
        parts.setdefault(name.split(".")[0], []).append(name)
    if len(parts) > 1 and index == 0:
        return "stem"
    if len(parts) > 1 and last:
        return "head"
    return "+".join(_common_prefix(group) or group[0].split(".")[0] for group in parts.values())


def layers_from_names(model: nn.Module, names: Sequence[str]) -> list[Layer]:
    """Group parameter names into the model's ordered layers (see module docstring)."""
    groups: list[list[str]] = []
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        by_id = group_with_matcher(((n, None) for n in names), matcher(coarse=False), return_values=False)
        groups = [list(v) for _, v in sorted(by_id.items())]
    else:
        order: dict[str, list[str]] = {}
        for name in names:
            order.setdefault(name.split(".")[0], []).append(name)
        groups = list(order.values())
    groups = [g for g in groups if g]
    return [Layer(i, _name_layer(i, g, i == len(groups) - 1), tuple(g)) for i, g in enumerate(groups)]


def layer_of(layers: Sequence[Layer]) -> dict[str, int]:
    """Parameter name -> layer index."""
    return {name: layer.index for layer in layers for name in layer.params}
