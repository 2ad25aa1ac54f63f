"""Loading an adapter: verify its files, build (or take) the base, check the fingerprint, replay the stages, load the
tensors strictly. Nothing in the folder is trusted before it is checked (see docs/security.md)."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapter.base import build_base
from surgery.adapter.format import (
    ADAPTER_FILE,
    CARD_FILE,
    CONFIG_FILE,
    FINGERPRINT,
    HF_HUB,
    AdapterConfig,
    check_tensors,
    dtype_name,
    is_commit,
    read_config,
    read_header,
)
from surgery.adapter.format import fingerprint as fingerprint_of
from surgery.adapter.save import expected_tensors, replay
from surgery.errors import AdapterError, SurgeryError
from surgery.io import sha256_file
from surgery.plan import Plan

log = logging.getLogger(__name__)

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # surgery.lora.CONFIG_NAME, WEIGHTS_NAME

AdapterInfo = dict[str, Any]
"""The parsed ``surgery.json`` as plain data (``AdapterConfig.to_dict()``), plus ``source`` after a load."""

BaseLike = nn.Module | str | Path | None
"""What ``load(..., base=)`` takes: a model, a timm name, an ``hf-hub:`` reference or a ``.safetensors`` checkpoint
file of the base."""


@dataclass(frozen=True)
class Source:
    """Where an adapter was read from: a local folder, or a hub repo at the commit it resolved to."""

    folder: Path
    ref: str
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"ref", "revision"}``."""
        return {"ref": self.ref, "revision": self.revision}


def resolve(ref: str | Path, *, token: str | None = None) -> Source:
    """A local adapter folder, or the snapshot of ``hf-hub:org/name[@revision]`` (adapter files only), with the commit
    it resolved to. A full commit sha in the reference is the integrity anchor: the snapshot must be that commit."""
    from surgery.hub import client as hub

    text = str(ref)
    if text.startswith(HF_HUB):
        _, pinned = hub.parse_ref(text)
        folder = hub.download(text, allow_patterns=[ADAPTER_FILE, CONFIG_FILE, CARD_FILE, *PEFT_FILES], token=token)
        revision = folder.name if is_commit(folder.name) else None  # huggingface_hub names snapshots by commit
        if is_commit(pinned) and revision != pinned:
            raise AdapterError(f"{text}: the hub served commit {revision}, not the pinned {pinned}; refused")
        return Source(folder, text, revision)
    folder = Path(text)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder; give a folder or hf-hub:ORG/NAME[@revision]")
    return Source(folder, text)


def read_info(ref: str | Path, *, token: str | None = None) -> AdapterInfo:
    """The validated ``surgery.json`` of an adapter folder or ``hf-hub:`` reference, as plain data."""
    return read_config(resolve(ref, token=token).folder).to_dict()


def _verify(folder: Path) -> tuple[AdapterConfig, dict[str, tuple[list[int], str]]]:
    config = read_config(folder)
    path = folder / ADAPTER_FILE
    header = read_header(path)
    listed = {n: (t.shape, t.dtype) for n, t in config.tensors.items()}
    check_tensors(
        path,
        header,
        listed,
        {n: f"listed in {CONFIG_FILE}; the file is incomplete: save or download the adapter again" for n in listed},
        extra=lambda n: f" not listed in {CONFIG_FILE}; the file was changed after saving: save or download it again",
        mismatch=f"in {CONFIG_FILE}; the file comes from another adapter: use the matching pair",
    )
    if sha256_file(path) != config.adapter_sha256:
        raise AdapterError(
            f"{path}: sha256 differs from the one recorded in {CONFIG_FILE}: the file was tampered with or damaged; "
            "save or download the adapter again"
        )
    return config, header


def verify_files(ref: str | Path, *, token: str | None = None) -> AdapterInfo:
    """Check an adapter's files against each other, without building a model: ``surgery.json`` is valid, the tensors
    it lists are those in ``adapter.safetensors`` (names, shapes, dtypes) and the file's sha256 is the recorded one.

    This detects damage and edits of one file; it cannot detect an uploader who changed both (see docs/security.md).
    """
    return _verify(resolve(ref, token=token).folder)[0].to_dict()


# -------------------------------------------------------------------------------------------------------- load


def _where(config: AdapterConfig) -> str:
    base = config.base
    where = f"{base.model}" + (f"@{base.revision[:12]}" if base.revision else "")
    return where + (f" + checkpoint {base.checkpoint}" if base.checkpoint else "")


def _wrong_base(config: AdapterConfig, got: str, want: str, *, supplied: str) -> AdapterError:
    base = config.base
    if supplied == "model":
        why = "the base model you passed is not the one the adapter was trained on"
        fix = "pass the original base model, or load without base= to rebuild it from surgery.json"
    elif supplied == "fingerprint":
        why = "the base is not the one whose fingerprint you trust (fingerprint=...)"
        fix = "the adapter was made on another base, or surgery.json was edited: do not use it"
    elif not base.reproducible:
        why = (
            f"the base {_where(config)} has random weights (pretrained: false, no checkpoint), so it cannot be rebuilt"
        )
        fix = "pass the original base model: surgery.load(ref, base=model)"
    else:
        why = f"the rebuilt base {_where(config)} is not the one the adapter was trained on"
        fix = "restore the original checkpoint/revision, or pass the original base with base= (--base)"
    return AdapterError(f"wrong base model: {why} (fingerprint {got[:19]}... != {want[:19]}...); {fix}")


def _base_from(
    config: AdapterConfig, base: BaseLike, *, token: str | None, where: str, depth: int = 0
) -> tuple[nn.Module, str]:
    """The base model and how it was supplied ("model", "fingerprint", "reference" or "recorded")."""
    if isinstance(base, nn.Module):  # the adapter it continued, loaded by the caller: made continuable as in training
        return (continuable(copy.deepcopy(base)) if config.base.adapter else copy.deepcopy(base)), "model"
    if base is not None and config.base.adapter:  # continued from an adapter: its folder, or the innermost checkpoint
        text = str(base)
        if Path(text).expanduser().is_dir():
            from surgery.models import build_recipe_model
            from surgery.recipe import ModelSpec

            spec = ModelSpec(adapter=str(Path(text).expanduser().resolve()))
            return build_recipe_model(spec, where=f"{where}: base", depth=depth), "reference"
        if not Path(text).expanduser().is_file():
            raise AdapterError(
                f"{where}: the base is the adapter {config.base.adapter}; pass its folder (--base DIR), the base "
                "checkpoint it names, or nothing to fetch it from the hub"
            )
    if base is not None:
        text = str(base)
        recorded = config.base.model_dump()
        if text.endswith(".safetensors") or Path(text).is_file():  # the local checkpoint the adapter names
            if recorded.get("model") is None:
                raise AdapterError(f"{where}: the base architecture is not recorded; pass the model: base=model")
            checkpoint = Path(text).expanduser().resolve()
            return build_base(recorded, checkpoint=checkpoint, token=token, where=where, depth=depth), "reference"
        # another reference to the base: a timm name or hf-hub:, with the recorded architecture arguments
        ref = {**recorded, "model": text, "revision": None, "checkpoint": None, "checkpoint_sha256": None}
        ref["pretrained"] = recorded.get("pretrained") or text.startswith(HF_HUB)
        return build_base(ref, token=token, where="--base"), "reference"
    if config.base.model is None:
        raise AdapterError(f"{where}: the base model is not recorded; pass it: load(ref, base=model)")
    return build_base(config.base.model_dump(), token=token, where=where, depth=depth), "recorded"


def apply_data_config(model: nn.Module, config: AdapterConfig) -> None:
    """Keep timm's ``pretrained_cfg`` truthful: the new classes and the data config training used, so that
    ``timm.data.resolve_data_config(model=model)`` gives the training input size and preprocessing."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    cfg = dict(cfg)
    if config.num_classes is not None:
        if cfg.get("num_classes") != config.num_classes:
            for key in ("label_names", "label_descriptions", "label_offset"):
                cfg.pop(key, None)
        cfg["num_classes"] = config.num_classes
    if config.class_names:
        cfg["label_names"] = list(config.class_names)
    if config.data_config is not None:
        data = config.data_config.to_timm()
        cfg.update(data)
        if tuple(data["input_size"]) != tuple(cfg.get("test_input_size") or data["input_size"]):
            cfg.pop("test_input_size", None)  # the size trained at wins over the source's test-time advice
        cfg.pop("test_crop_pct", None)
    model.pretrained_cfg = cfg


@dataclass
class Loaded:
    """What loading produces: the model, stage 0's plan, the config, the base state before surgery, the source."""

    model: nn.Module
    plan: Plan
    config: AdapterConfig
    base_state: dict[str, torch.Tensor]
    source: Source


def _replay_checked(model: nn.Module, recipe: Any, *, where: str) -> list[Plan]:
    try:
        return replay(model, recipe)
    except SurgeryError as err:
        raise AdapterError(f"{where}: the recipe does not apply to its base: {err}") from None


def _check_layout(path: Path, header: dict[str, tuple[list[int], str]], model: nn.Module, plans: list[Plan]) -> None:
    """The one tensor check against what the recipe makes of the base: required, allowed, shapes and dtypes."""
    required, optional = expected_tensors(model, plans)
    state = model.state_dict()
    allowed = {n: (list(t.shape), dtype_name(t)) for n, t in state.items() if n in required or n in optional}

    def extra(name: str) -> str:
        if name not in state:
            return f": the model built from {CONFIG_FILE} has no such tensor; the adapter belongs to another model"
        return ": the recipe keeps it frozen, so an adapter never changes it; the adapter was saved from another recipe"

    check_tensors(
        path,
        header,
        allowed,
        {n: f"{kind}; the recipe trains it but the adapter lacks it" for n, kind in required.items()},
        extra=extra,
        mismatch="in the model; the adapter was trained with another head size or model",
    )


def load_folder(
    source: Source,
    *,
    base: BaseLike = None,
    fingerprint: str | None = None,
    token: str | None = None,
    depth: int = 0,
) -> Loaded:
    """Load a resolved adapter (see :func:`load`); ``depth``: adapters continued from adapters so far."""
    from safetensors.torch import load_file

    from surgery.recipe import load_recipe

    folder = source.folder
    config, header = _verify(folder)
    where = str(folder / CONFIG_FILE)
    try:
        recipe = load_recipe(config.recipe)
    except SurgeryError as err:
        raise AdapterError(f"{where}: recipe: {err}") from None
    if fingerprint is not None and re.fullmatch(FINGERPRINT, fingerprint) is None:
        raise AdapterError(f"fingerprint={fingerprint[:20]!r}: expected 'sha256:' and 64 hex digits")
    model, supplied = _base_from(config, base, token=token, where=where, depth=depth)
    got = fingerprint_of(model)
    if fingerprint is not None and got != fingerprint:  # the anchor the user trusts, checked first
        raise _wrong_base(config, got, fingerprint, supplied="fingerprint")
    if got != config.base.fingerprint:
        raise _wrong_base(config, got, config.base.fingerprint, supplied=supplied)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    # A dry run on a meta-device copy first: the tensors the recipe would create (say, a hostile head of a billion
    # classes) are checked against the file's header, which was checked against the file size, before any allocation.
    layout = copy.deepcopy(model).to("meta")
    _check_layout(folder / ADAPTER_FILE, header, layout, _replay_checked(layout, recipe, where=where))
    plans = _replay_checked(model, recipe, where=where)
    path = folder / ADAPTER_FILE
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - the header was checked; anything left is damage
        raise AdapterError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
    model.load_state_dict(tensors, strict=False)
    model.eval()
    apply_data_config(model, config)
    info = config.to_dict()
    info["source"] = source.to_dict()
    model.adapter_info = info  # type: ignore[assignment] - provenance for callers (surgery.json + where it came from)
    return Loaded(model, plans[0], config, base_state, source)


def load_chained(
    ref: str | Path, *, checkpoint: str | Path | None = None, depth: int = 1, where: str = "model.adapter"
) -> nn.Module:
    """The model a recipe's ``model.adapter`` continues from: the adapter ``ref`` loaded as :func:`load` does (its
    base rebuilt and fingerprint-checked; ``checkpoint``: the base's local checkpoint when it names one), in train
    mode for the trainer to plan on. Only adapters with ``surgery.json`` (runs and adapter folders) can be continued.
    """
    try:
        source = resolve(ref)
    except AdapterError as err:
        raise AdapterError(f"{where}: {err}") from None
    if not (source.folder / CONFIG_FILE).is_file():
        raise AdapterError(
            f"{where}: {ref} has no {CONFIG_FILE}, so the base it was made on is unknown; continue from an adapter "
            "or run folder of surgery, or start from the base (model.name) and load PEFT weights with surgery.load"
        )
    return continuable(load_folder(source, base=checkpoint, depth=depth).model)


def continuable(model: nn.Module) -> nn.Module:
    """A loaded adapter's model made ready for a new recipe to plan on (in place; train mode).

    Planning starts from the model's ``requires_grad`` and norm classes: as loaded they are the old recipe's (a linear
    probe's frozen backbone and BatchNorms), which would silently keep a full fine-tune frozen. So they become what a
    freshly built model has, and this recipe decides. A model carrying LoRA keeps PEFT's frozen base: the new plan
    continues its LoRA layers.
    """
    from surgery import lora, norms

    if lora.peft_of(model) is None:
        norms.thaw(model)
        for param in model.parameters():
            param.requires_grad_(True)
    return model.train()


def load(
    ref: str | Path | nn.Module,
    *,
    base: BaseLike = None,
    fingerprint: str | None = None,
    token: str | None = None,
    adapters: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
) -> nn.Module:
    """The trained model of an adapter (folder or ``hf-hub:org/name[@revision]``), in eval mode.

    Builds the base from ``surgery.json`` (only through :func:`surgery.models.build_model`), or takes ``base``: a model
    (a copy is used) or a reference (timm name, ``hf-hub:``, a ``.safetensors`` checkpoint file of the recorded
    architecture). Its fingerprint must be the recorded one and, when given, ``fingerprint`` (a ``"sha256:..."`` you
    trust, e.g. from :func:`surgery.adapter.fingerprint` of your own base): the recorded one is the uploader's word,
    yours is not. Then applies the
    recipe's stages (heads, norm conversions) and loads ``adapter.safetensors`` strictly: outputs equal the trained
    model's. A wrong base, a missing or extra tensor, a shape mismatch or a tampered file raises
    :class:`AdapterError`. ``model.adapter_info`` holds ``surgery.json`` and ``source`` (the ref and the commit a hub
    ref resolved to: pin it as ``hf-hub:org/name@<sha>``). ``model.pretrained_cfg`` carries the training data config.

    A LoRA run loads with its LoRA layers (PEFT's, injected by the replayed plan). A folder PEFT itself saved (no
    ``surgery.json``) needs ``base`` and gives a ``PeftModel`` (:func:`load_peft_folder`). With ``adapters``, ``ref``
    is the base and several LoRA adapters share it (:func:`load_adapters`).
    """
    if adapters is not None:
        return load_adapters(ref, adapters, fingerprint=fingerprint, token=token)
    if isinstance(ref, nn.Module):
        raise AdapterError(
            "load: a model as the first argument is a base; name its adapters: load(base, adapters=[...])"
        )
    source = resolve(ref, token=token)
    if not (source.folder / CONFIG_FILE).is_file() and (source.folder / PEFT_FILES[0]).is_file():
        return load_peft_folder(source, base=base)
    return load_folder(source, base=base, fingerprint=fingerprint, token=token).model


def load_adapters(
    base: BaseLike | str | Path,
    adapters: Sequence[str | Path] | Mapping[str, str | Path],
    *,
    fingerprint: str | None = None,
    token: str | None = None,
) -> nn.Module:
    """Several LoRA adapters over one base: a :class:`surgery.lora.MultiAdapterModel` (``.use(name)`` switches,
    ``.predict_all(x)`` runs each; the base is loaded once).

    ``adapters``: folders or ``hf-hub:`` references (named by their last path part), or a mapping name -> reference;
    each is a LoRA run's folder or a folder PEFT saved. ``base``: a model (a copy is used) or a reference built
    pretrained with the first adapter's class count. An adapter with ``surgery.json`` must record this base's
    fingerprint (and ``fingerprint``, when given, is checked first), as :func:`load` does.
    """
    from surgery import lora

    named = (
        dict(adapters)
        if isinstance(adapters, Mapping)
        else {str(a).rstrip("/").split("/")[-1].split("@")[0]: a for a in adapters}
    )
    if not named or len(named) != len(adapters):
        raise AdapterError(
            "load: adapters= needs distinct adapters; pass a mapping name -> folder or hf-hub: reference"
        )
    folders = {name: resolve(ref, token=token) for name, ref in named.items()}
    for source in folders.values():
        if not (source.folder / PEFT_FILES[0]).is_file():
            raise AdapterError(
                f"{source.ref}: not a LoRA adapter (no {PEFT_FILES[0]}); adapters= takes LoRA runs or PEFT folders"
            )
    first = next(iter(folders.values()))
    model, got = _peft_base(first.folder, base)
    if fingerprint is not None and got != fingerprint:
        raise AdapterError(f"load: the base's fingerprint {got[:19]}... is not the trusted {fingerprint[:19]}...")
    for source in folders.values():
        if (source.folder / CONFIG_FILE).is_file():
            config = read_config(source.folder)
            if config.base.fingerprint != got:
                raise _wrong_base(config, got, config.base.fingerprint, supplied="model")
    return lora.MultiAdapterModel(model, {name: source.folder for name, source in folders.items()})


def _peft_base(folder: Path, base: BaseLike | str | Path) -> tuple[nn.Module, str]:
    """(the base for a PEFT adapter folder, its fingerprint before its head is fitted): a copy of a model, or a
    reference built pretrained; a timm classifier is then sized to the adapter's saved head (its rows), which replaces
    it anyway (PEFT ``modules_to_save``)."""
    from surgery import lora
    from surgery.models import build_model
    from surgery.recipe import ModelSpec

    if base is None:
        raise AdapterError(
            f"{folder}: a PEFT adapter (adapter_config.json, no {CONFIG_FILE}) names its base without weights or "
            "fingerprint; pass the base: surgery.load(ref, base=model) or --base NAME"
        )
    if isinstance(base, nn.Module):
        model = copy.deepcopy(base)
    else:
        model = build_model(ModelSpec(name=str(base), pretrained=True), where="--base")
    got = fingerprint_of(model)
    config = lora.read_peft_config(folder)
    tensors = lora.read_peft_weights(folder)
    widths = {
        tensors[key].shape[0]
        for path in config.modules_to_save or ()
        for key in [f"base_model.model.{path}.weight"]
        if key in tensors and tensors[key].ndim >= 2
    }
    if len(widths) == 1 and hasattr(model, "reset_classifier") and getattr(model, "num_classes", None) != min(widths):
        model.reset_classifier(widths.pop())
    return model, got


def load_peft_folder(source: Source, *, base: BaseLike) -> nn.Module:
    """A LoRA adapter PEFT itself saved for a timm model (``adapter_config.json``, no ``surgery.json``) on ``base``.

    PEFT records its base by name only (``base_model_name_or_path``, never fetched here: the folder is untrusted), so
    the base is the caller's: a model (a copy is used) or a reference (timm name, ``hf-hub:``) built pretrained with the
    class count of the adapter's head. Loading is :func:`surgery.lora.load_peft`: the config checked key by key,
    weights from ``adapter_model.safetensors`` only, every tensor fitting the base. Returns the ``PeftModel``.
    """
    from surgery import lora

    folder = source.folder
    model, _ = _peft_base(folder, base)
    peft_model = lora.load_peft(model, folder)
    peft_model.adapter_info = {"source": source.to_dict(), "format": "peft"}  # type: ignore[assignment]
    return peft_model


def data_config_of(model: nn.Module) -> Mapping[str, Any]:
    """timm's resolved data config for ``model`` (its ``pretrained_cfg``, which :func:`load` sets from training)."""
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)
