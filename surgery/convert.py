"""Importing foreign weights: a state dict in another project's key layout becomes a timm model's safetensors.

Two ways to pair keys:

- ``order``: the i-th tensor of the source goes to the i-th tensor of the timm model; every shape must agree.
- ``names``: by key, after an optional rename table (``prefix``/``regex`` renames, ``drop`` patterns) read from a YAML
  or JSON file; every timm key must be covered, with the same shape.

Anything else is refused with the first mismatch named. Pickle files are read with ``torch.load(weights_only=True)``
only (a pickle that needs more cannot run code here); the output is always safetensors. The result can be checked
against known answers (an image and its expected top-1 class through timm's eval transform) and published to a hub
repo in timm's own format, so ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` loads it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import HubError, ModelError

log = logging.getLogger(__name__)

ORDER = "order"
NAMES = "names"
_BN_COUNTER = "num_batches_tracked"
# Containers training scripts wrap a state dict in; the first one holding tensors is used.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "module")


@dataclass
class RenameTable:
    """Key renames for ``names`` mapping: prefixes first (in order), then regexes (in order); ``drop`` leaves keys out.

    File form (YAML or JSON)::

        prefix: {"module.": "", "backbone.": ""}
        regex: {'^blocks\\.(\\d+)\\.': 'stages.\\1.'}
        drop: ['^aux_head\\.']
    """

    prefix: list[tuple[str, str]] = field(default_factory=list)
    regex: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    drop: list[re.Pattern[str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RenameTable:
        """Read a rename table file; a malformed one is a ModelError naming the file and key."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ModelError(f"--map {path}: cannot read the rename table: {str(err).splitlines()[0]}") from None
        return cls.from_mapping(data or {}, where=f"--map {path}")

    @classmethod
    def from_mapping(cls, data: Any, *, where: str = "mapping") -> RenameTable:
        """Build from ``{"prefix": {...}, "regex": {...}, "drop": [...]}``."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{where}: a rename table is a mapping with prefix, regex and drop")
        unknown = set(data) - {"prefix", "regex", "drop"}
        if unknown:
            raise ModelError(f"{where}: unknown key {sorted(unknown)[0]!r}; a rename table has prefix, regex, drop")
        table = cls()
        for section in ("prefix", "regex"):
            items = data.get(section) or {}
            if not isinstance(items, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str | type(None)) for k, v in items.items()
            ):
                raise ModelError(f"{where}: {section} must map strings to strings (old: new)")
            for old, new in items.items():
                if section == "prefix":
                    table.prefix.append((old, new or ""))
                else:
                    table.regex.append((_compile(old, f"{where}: regex {old!r}"), new or ""))
        drop = data.get("drop") or []
        if isinstance(drop, str):
            drop = [drop]
        if not isinstance(drop, list) or not all(isinstance(d, str) for d in drop):
            raise ModelError(f"{where}: drop must be a list of regular expressions")
        table.drop = [_compile(d, f"{where}: drop {d!r}") for d in drop]
        return table

    def rename(self, key: str) -> str | None:
        """The timm key for source ``key`` (None: dropped)."""
        if any(p.search(key) for p in self.drop):
            return None
        for old, new in self.prefix:
            if key.startswith(old):
                key = new + key[len(old) :]
        for pattern, new in self.regex:
            key = pattern.sub(new, key)
        return key


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ModelError(f"{where}: not a regular expression ({err})") from None


@dataclass
class ConvertResult:
    """What :func:`convert` did: the output file, the model holding the weights and the key pairs used."""

    out: Path
    model: nn.Module
    pairs: list[tuple[str, str]]
    checks: list[tuple[str, int, float]] = field(default_factory=list)  # image, top-1 class, its probability
    pushed: str | None = None


def read_state_dict(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a pickle read with ``weights_only=True`` (never full unpickling)."""
    from surgery.models import read_safetensors

    src = Path(src)
    if not src.is_file():
        raise ModelError(f"{src}: no such file")
    if src.suffix == ".safetensors":
        return read_safetensors(src, where=str(src))
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and torch raise many types for a damaged file
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and "global" in text.lower():
            what = re.search(r"GLOBAL (\S+)", text)
            needs = f" (it needs {what.group(1)})" if what else ""
            raise ModelError(
                f"{src}: refused: this pickle needs more than torch.load(weights_only=True){needs}, and unpickling "
                "it could run code; re-save its state_dict() (tensors only) or as .safetensors where you trust it"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # torch's own first line is generic advice
        first = detail.group(1) if detail else (text.strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{src}: not a readable PyTorch weights file ({first[:200]})") from None
    return _tensors(obj, src)


def _tensors(obj: Any, src: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("%s: using the state dict under %r", src, key)
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{src}: holds no state dict (a mapping of names to tensors)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        log.warning("%s: %d entries are not tensors and are left out (e.g. %s)", src, len(skipped), skipped[0])
    if not tensors:
        raise ModelError(f"{src}: holds no tensors")
    return tensors


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def pair_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pair the i-th source tensor with the i-th target tensor; refuse at the first shape or count mismatch."""
    src, tgt = list(source), list(target)
    for i, (s, t) in enumerate(zip(src, tgt, strict=False)):
        if source[s].shape != target[t].shape:
            raise ModelError(
                f"--map order: tensor {i} does not fit: source {s!r} {_shape(source[s])} vs timm {t!r} "
                f"{_shape(target[t])}; map by names with a rename table (--map FILE) instead"
            )
    if len(src) != len(tgt):
        i = min(len(src), len(tgt))
        first = f"source {src[i]!r} has no partner" if len(src) > len(tgt) else f"timm {tgt[i]!r} has no partner"
        raise ModelError(
            f"--map order: the source has {len(src)} tensors, the timm model {len(tgt)}; shapes agree up to tensor "
            f"{i}, where {first}"
        )
    return list(zip(src, tgt, strict=True))


def pair_by_names(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], table: RenameTable | None = None
) -> list[tuple[str, str]]:
    """Pair keys by name after ``table``'s renames; refuse a key left over on either side or a shape mismatch."""
    table = table or RenameTable()
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for key in source:
        new = table.rename(key)
        if new is None:
            continue
        if new in seen:
            raise ModelError(f"--map names: source keys {seen[new]!r} and {key!r} both become {new!r}")
        seen[new] = key
        if new not in target:
            raise ModelError(
                f"--map names: source {key!r}" + (f" (renamed {new!r})" if new != key else "") + " is not a key of "
                "the timm model; add a rename (prefix/regex) or drop it in the rename table"
            )
        if source[key].shape != target[new].shape:
            raise ModelError(
                f"--map names: source {key!r} {_shape(source[key])} vs timm {new!r} {_shape(target[new])}: "
                "shapes differ"
            )
        pairs.append((key, new))
    missing = [k for k in target if k not in seen]
    if missing:
        raise ModelError(
            f"--map names: {len(missing)} timm keys get no tensor, first {missing[0]!r} {_shape(target[missing[0]])}; "
            "add a rename for the source key that holds it"
        )
    return pairs


def convert(
    src: str | os.PathLike,
    model_name: str,
    out: str | os.PathLike,
    *,
    mapping: str | os.PathLike | Mapping[str, Any] = ORDER,
    kwargs: Mapping[str, Any] | None = None,
    expect: Sequence[tuple[str | os.PathLike, int]] = (),
    push: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> ConvertResult:
    """Convert the state dict in ``src`` to timm model ``model_name`` and write ``out`` (safetensors).

    ``mapping`` is ``"order"``, ``"names"``, a rename table file or its mapping (names after renames). ``kwargs`` are
    architecture arguments (checked like ``model.kwargs``). ``expect`` holds (image, class index) known answers that
    must be the converted model's top-1. ``push`` publishes it to hub repo ``ORG/NAME`` (``HF_ENDPOINT``) in timm's
    format. Counters such as BatchNorm's ``num_batches_tracked`` keep the model's values when the source has none.
    """
    from surgery.io import atomic_write
    from surgery.models import build_model
    from surgery.recipe import ModelSpec

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ModelError(f"--out {out}: the output is safetensors; name it *.safetensors")
    source = read_state_dict(src)
    model = build_model(ModelSpec(name=model_name, kwargs=dict(kwargs or {})), where="--model")
    target = model.state_dict()
    if not any(k.endswith(_BN_COUNTER) for k in source):
        target = {k: v for k, v in target.items() if not k.endswith(_BN_COUNTER)}
    if mapping == ORDER:
        if Path(src).suffix == ".safetensors":
            # safetensors writers sort tensors (by dtype and name): the source's own order is gone, and BatchNorm's
            # four same-shaped tensors would pair silently wrong.
            raise ModelError(
                f"--map order: {src} is safetensors, which does not keep the source's tensor order; map it by names "
                "(--map names, or --map FILE with a rename table)"
            )
        pairs = pair_by_order(source, target)
    elif mapping == NAMES:
        pairs = pair_by_names(source, target)
    elif isinstance(mapping, Mapping):
        pairs = pair_by_names(source, target, RenameTable.from_mapping(mapping))
    else:
        path = Path(mapping)
        if not path.is_file():
            raise ModelError(f"--map {mapping}: expected order, names or a rename table file (YAML/JSON)")
        pairs = pair_by_names(source, target, RenameTable.load(path))
    for s, t in pairs:
        if source[s].is_floating_point() != target[t].is_floating_point():
            raise ModelError(
                f"{src}: source {s!r} is {source[s].dtype} but timm {t!r} is {target[t].dtype}; the pairing is wrong"
            )
    state = {t: source[s].to(target[t].dtype) for s, t in pairs}
    result = model.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not k.endswith(_BN_COUNTER)]
    if left or result.unexpected_keys:  # cannot happen after pairing; a guard, not a path
        raise ModelError(f"{src}: {len(left)} timm keys were not filled (e.g. {(left or result.unexpected_keys)[0]})")
    model.eval()
    checks = [check_top1(model, image, cls) for image, cls in expect]
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    pushed = publish(model, push, private=private, token=token) if push else None
    return ConvertResult(out=out, model=model, pairs=pairs, checks=checks, pushed=pushed)


def check_top1(model: nn.Module, image: str | os.PathLike, expected: int) -> tuple[str, int, float]:
    """Run ``image`` through timm's eval transform for ``model``; raise unless its top-1 class is ``expected``."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    try:
        with Image.open(image) as img:
            x = transform(img.convert("RGB")).unsqueeze(0)
    except (OSError, UnidentifiedImageError) as err:
        raise ModelError(f"--expect {image}: cannot read the image ({str(err).splitlines()[0]})") from None
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    top = int(probs.argmax())
    if not 0 <= expected < probs.numel():
        raise ModelError(f"--expect {image}={expected}: the model has {probs.numel()} classes")
    if top != expected:
        raise ModelError(
            f"--expect {image}={expected}: the converted model says class {top} (p={float(probs[top]):.2f}), "
            f"class {expected} has p={float(probs[expected]):.2f}; the mapping is probably wrong"
        )
    log.info("%s: top-1 class %d (p=%.2f) as expected", image, top, float(probs[top]))
    return str(image), top, float(probs[top])


def publish(model: nn.Module, repo: str, *, private: bool = False, token: str | None = None) -> str:
    """Push ``model`` to hub repo ``repo`` in timm's format (``config.json`` + ``model.safetensors``); returns its URL.

    The folder comes from timm's own ``save_for_hf``, uploaded with huggingface_hub's ``HfApi`` against
    ``HF_ENDPOINT`` (read now, not at import) so ``timm.create_model("hf-hub:REPO", pretrained=True)`` loads it.
    """
    import timm
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        raise HubError(f"--push {repo}: expected ORG/NAME")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token or os.environ.get("HF_TOKEN") or None)
    with tempfile.TemporaryDirectory(prefix="surgery-convert-") as tmp:
        folder = Path(tmp) / "model"
        timm.models.save_for_hf(model, folder, safe_serialization=True)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config.get("pretrained_cfg"), dict):
            raise ModelError(f"--push {repo}: timm wrote no pretrained_cfg to config.json")
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"Add {model_name(model)}")
        except HfHubHTTPError as err:
            raise HubError(f"--push {repo}: the hub refused: {str(err).splitlines()[0]}") from None
        except OSError as err:
            raise HubError(f"--push {repo}: cannot reach the hub at {api.endpoint}: {err}") from None
    return str(getattr(info, "commit_url", None) or f"{api.endpoint}/{repo}")


def model_name(model: nn.Module) -> str:
    """timm's architecture name of ``model`` (for messages)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)
