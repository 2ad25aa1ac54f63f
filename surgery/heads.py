"""Finding, building and replacing classifier heads.

A head is named by meaning (``classifier``: timm's ``pretrained_cfg['classifier']``, which may be a tuple such as
DeiT-distilled's ``('head', 'head_dist')``) or by module path (``fc``, ``head.fc``, ``6`` in an ``nn.Sequential``).
The same builder makes the head for planning (on the meta device, to learn its parameter names) and for applying.
"""

from __future__ import annotations

import difflib

import torch
from timm.layers import trunc_normal_
from torch import nn

from surgery.errors import HeadError
from surgery.recipe import HeadSpec

_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_COMMON_NAMES = ("fc", "classifier", "head", "head.fc", "last_linear")


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def resolve_targets(model: nn.Module, key: str, *, where: str) -> list[str]:
    """Module paths a head key refers to: ``classifier`` by meaning, else the module path itself."""
    modules = _modules(model)
    if key == "classifier":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        classifier = cfg.get("classifier")
        if classifier:
            paths = [classifier] if isinstance(classifier, str) else list(classifier)
            missing = [p for p in paths if p not in modules]
            if missing:
                raise HeadError(
                    f"{where}: the model's pretrained_cfg names classifier {missing[0]!r} but it has no such module; "
                    "name the head's module path instead"
                )
            return paths
        found = [name for name in _COMMON_NAMES if isinstance(modules.get(name), nn.Linear)]
        hint = f"; this model's classifier looks like {found[0]!r}" if found else ""
        raise HeadError(
            f"{where}: this model has no pretrained_cfg['classifier'] (not a timm model?); "
            f"key the head by its module path instead{hint}"
        )
    if key not in modules or key == "":
        close = difflib.get_close_matches(key, [n for n in modules if n], n=3, cutoff=0.4)
        hint = f"; closest modules: {', '.join(close)}" if close else ""
        raise HeadError(f"{where}: the model has no module {key!r} to replace{hint}")
    return [key]


def in_features(model: nn.Module, path: str, *, where: str) -> int:
    """Input width of the head at ``path``: the replaced module's, else the model's ``num_features``."""
    module = model.get_submodule(path)
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d | nn.Conv1d) and module.kernel_size in ((1, 1), (1,)):
        return module.in_channels
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0 and isinstance(module, nn.Identity):
            return value
    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[0].in_features
    raise HeadError(
        f"{where}: cannot tell the input width of {path!r} ({type(module).__name__}); "
        "target the Linear layer inside it (e.g. head.fc)"
    )


def is_conv_head(model: nn.Module, path: str) -> bool:
    """timm models such as MobileNetV3 variants may use a 1x1 conv as classifier; the new head must be one too."""
    return isinstance(model.get_submodule(path), nn.Conv2d)


def build_head(
    spec: HeadSpec,
    in_features: int,
    *,
    conv: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A new head as the spec says, initialized like timm's heads (trunc-normal weights, constant bias)."""
    kwargs = {"device": device, "dtype": dtype}
    if conv:
        if spec.type != "linear":
            raise HeadError("an mlp head cannot replace a 1x1-conv classifier; use type: linear")
        head: nn.Module = nn.Conv2d(in_features, spec.num_classes, 1, **kwargs)
        last = head
    elif spec.type == "linear":
        head = last = nn.Linear(in_features, spec.num_classes, **kwargs)
    else:
        layers: list[nn.Module] = []
        width = in_features
        for hidden in spec.hidden:
            layers.append(nn.Linear(width, hidden, **kwargs))
            if spec.norm == "layernorm":
                layers.append(nn.LayerNorm(hidden, **kwargs))
            elif spec.norm == "batchnorm":
                layers.append(nn.BatchNorm1d(hidden, **kwargs))
            layers.append(_ACTS[spec.act]())
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = hidden
        last = nn.Linear(width, spec.num_classes, **kwargs)
        layers.append(last)
        head = nn.Sequential(*layers)
    if (device is None or torch.device(device).type != "meta") and not _on_meta(head):
        with torch.no_grad():
            for module in head.modules():
                if isinstance(module, nn.Linear | nn.Conv2d):
                    trunc_normal_(module.weight, std=spec.init_std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            last.weight.mul_(spec.init_scale)
            if last.bias is not None:
                last.bias.fill_(spec.init_bias)
    return head


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` and keep ``num_classes`` attributes along the path truthful."""
    model.set_submodule(path, new)
    out = new[-1].out_features if isinstance(new, nn.Sequential) else getattr(new, "out_features", None)
    out = out if out is not None else getattr(new, "out_channels", None)
    parts = path.split(".")
    for i in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:i])) if i else model
        if hasattr(owner, "num_classes") and isinstance(owner.num_classes, int):
            owner.num_classes = out
