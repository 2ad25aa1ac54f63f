"""The base an adapter is made on: how ``surgery.json`` records it (name, commit, checkpoint by name and sha256) and how
it is built again, through :func:`surgery.models.build_model` only."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from surgery.adapter.format import CONFIG_FILE, HF_HUB, is_commit
from surgery.errors import AdapterError, SurgeryError
from surgery.io import sha256_file
from surgery.paths import absolute


def checkpoint_path(recipe: Any) -> Path | None:
    """A recipe's ``model.checkpoint`` as an absolute path (a loaded recipe's already is: :mod:`surgery.paths`)."""
    spec = recipe.model
    if spec is None or not spec.checkpoint:
        return None
    return Path(absolute(spec.checkpoint))


def base_ref(recipe: Any, *, token: str | None, loaded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``surgery.json: base`` (without the fingerprint) for a recipe's ``model:`` section.

    A hub base is recorded with the commit its revision resolves to now. A local checkpoint is recorded by file name
    and sha256, never by its path: the path means nothing on another machine and tells strangers about this one.
    ``loaded``: the ``adapter_info`` of the model a ``model.adapter`` run started from (see :func:`_adapter_base_ref`).
    """
    from surgery.hub import client as hub

    spec = recipe.model
    if spec.adapter is not None:
        return _adapter_base_ref(spec.adapter, token=token, loaded=loaded)
    checkpoint = checkpoint_path(recipe)
    revision = None
    if spec.name.startswith(HF_HUB):
        repo_id, rev = hub.parse_ref(spec.name)
        if is_commit(rev):
            revision = rev
        else:
            try:
                revision = hub.resolve_revision(repo_id, rev, token=token, retries=1)
            except SurgeryError:
                revision = None  # offline: the fingerprint still pins the weights
    ref: dict[str, Any] = {
        "model": spec.name,
        "revision": revision,
        "pretrained": spec.pretrained,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "kwargs": dict(spec.kwargs),
        "reproducible": bool(spec.pretrained or spec.checkpoint),
    }
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise AdapterError(f"save_adapter: model.checkpoint {checkpoint} does not exist; the base is unknown")
        ref["checkpoint"] = checkpoint.name
        ref["checkpoint_sha256"] = sha256_file(checkpoint)
    return ref


def _adapter_base_ref(ref: str, *, token: str | None, loaded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``surgery.json: base`` of an adapter continued from ``ref`` (recipe ``model.adapter``): the base that adapter
    records (so the card and PEFT name the real base model), plus the adapter itself: a hub repo pinned to its commit,
    or a local folder by name only (whoever loads needs that folder: ``--base``).

    ``loaded`` is the ``adapter_info`` of the model training started from: its record and the commit it was read at,
    so the commit recorded is the one trained on, not whatever an unpinned reference resolves to at the end. Without
    it (a Python API caller) the adapter is resolved again.
    """
    from surgery.adapter.format import read_config
    from surgery.adapter.load import resolve
    from surgery.hub import client as hub

    source = (loaded or {}).get("source") or {}
    if loaded is not None and source.get("ref") == ref and isinstance(loaded.get("base"), Mapping):
        inner, revision = dict(loaded["base"]), source.get("revision")
    else:
        resolved = resolve(ref, token=token)
        inner, revision = read_config(resolved.folder).base.model_dump(), resolved.revision
    inner.pop("fingerprint", None)
    if ref.startswith(HF_HUB):
        repo_id, _ = hub.parse_ref(ref)
        return {**inner, "adapter": f"{HF_HUB}{repo_id}", "adapter_revision": revision}
    return {**inner, "adapter": Path(ref).resolve().name, "adapter_revision": None, "reproducible": False}


def warn_local_base(base: Mapping[str, Any], *, when: str) -> None:
    """A base that is a local checkpoint cannot be rebuilt elsewhere: say so (at save and at push time)."""
    if base.get("checkpoint"):
        warnings.warn(
            f"{when}: the base is {base.get('model')} + the local checkpoint {base['checkpoint']} (sha256 "
            f"{str(base.get('checkpoint_sha256'))[:12]}...); whoever loads this adapter needs that file: "
            f"surgery load ADAPTER --base {base['checkpoint']}, or publish the base on a hub and train from hf-hub:",
            UserWarning,
            stacklevel=3,
        )


def build_base(
    base: Mapping[str, Any],
    *,
    checkpoint: Path | None = None,
    token: str | None = None,
    where: str = CONFIG_FILE,
    depth: int = 0,
) -> nn.Module:
    """Build the base an adapter records, through :func:`surgery.models.build_model` only (its kwargs allow-list).

    The base of an adapter continued from another (``adapter``) is that adapter loaded (:func:`surgery.models.
    build_recipe_model`'s chain, at most ``MAX_ADAPTER_CHAIN`` deep), from the hub at the recorded commit.

    ``hf-hub:`` bases come through this package's hub client, pinned to the recorded commit, safetensors only, and are
    built by timm from that folder. A local checkpoint is ``checkpoint`` (a file the caller names). Every failure is
    an :class:`AdapterError` or :class:`~surgery.errors.ModelError`.
    """
    from surgery.hub import client as hub
    from surgery.models import build_model
    from surgery.recipe import ModelSpec

    if base.get("adapter"):
        from surgery.recipe import ModelSpec

        adapter = str(base["adapter"])
        if not adapter.startswith(HF_HUB):
            raise AdapterError(
                f"{where}: the base is the local adapter folder {adapter}, which is not here; pass it: surgery load "
                f"ADAPTER --base PATH/{adapter}, or surgery.load(ref, base=PATH)"
            )
        revision = base.get("adapter_revision")
        spec = ModelSpec(
            adapter=adapter + (f"@{revision}" if revision else ""), checkpoint=checkpoint and str(checkpoint)
        )
        from surgery.models import build_recipe_model

        return build_recipe_model(spec, where=f"{where}: base", depth=depth)
    extra_kwargs = dict(base.get("kwargs") or {})
    name = str(base["model"])
    pretrained = bool(base.get("pretrained"))
    if base.get("checkpoint") and checkpoint is None:
        raise AdapterError(
            f"{where}: the base is {name} + the local checkpoint {base['checkpoint']}, which is not here; pass it: "
            f"surgery load ADAPTER --base PATH/{base['checkpoint']}, or surgery.load(ref, base=model)"
        )
    if checkpoint is not None and base.get("checkpoint_sha256"):
        if not checkpoint.is_file():
            raise AdapterError(f"--base {checkpoint}: no such file")
        got = sha256_file(checkpoint)
        if got != base["checkpoint_sha256"]:
            raise AdapterError(
                f"wrong base model: {checkpoint} has sha256 {got[:12]}..., the adapter was made on "
                f"{base['checkpoint']} with sha256 {str(base['checkpoint_sha256'])[:12]}...; pass the original file"
            )
    if name.startswith(HF_HUB):
        repo_id, rev = hub.parse_ref(name)
        rev = base.get("revision") or rev
        patterns = ["config.json", "model.safetensors"] if pretrained else ["config.json"]
        folder = hub.download(f"{HF_HUB}{repo_id}" + (f"@{rev}" if rev else ""), allow_patterns=patterns, token=token)
        if not (folder / "config.json").is_file():
            raise AdapterError(f"base {name}: the repo has no config.json, so timm cannot build it")
        if pretrained and not (folder / "model.safetensors").is_file():
            raise AdapterError(
                f"base {name}: the repo has no model.safetensors; only safetensors weights are loaded (never pickle)"
            )
        name = f"local-dir:{folder}"
        # timm passes config.json's model_args to the model as kwargs; route them through build_model's allow-list
        # like any other kwargs (the repo may be a stranger's), with the recorded kwargs taking precedence.
        extra_kwargs = {**_hub_model_args(folder / "config.json", where=f"base {base['model']}"), **extra_kwargs}
    try:
        spec = ModelSpec(
            name=name,
            pretrained=pretrained,
            checkpoint=str(checkpoint) if checkpoint else None,
            kwargs=extra_kwargs,
        )
    except ValueError as err:
        raise AdapterError(f"{where}: base: {err}") from None
    try:
        return build_model(spec, where=f"{where}: base")
    except SurgeryError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever timm raises on a hostile or broken base becomes one line
        raise AdapterError(
            f"{where}: base {base.get('model')}: cannot build it ({type(err).__name__}: {err})"
        ) from None


MAX_HUB_CONFIG_BYTES = 1 << 20


def _hub_model_args(path: Path, *, where: str) -> dict[str, Any]:
    """``model_args`` of a hub base's config.json: architecture arguments as JSON scalars or lists, else refused."""
    import json

    if path.stat().st_size > MAX_HUB_CONFIG_BYTES:
        raise AdapterError(f"{where}: config.json is {path.stat().st_size:,} bytes; refused")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{where}: config.json is not readable JSON ({err})") from None
    args = config.get("model_args") if isinstance(config, dict) else None
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise AdapterError(f"{where}: config.json: model_args is not a mapping; refused")
    for key, value in args.items():
        items = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, bool | int | float | str) for v in items):
            raise AdapterError(
                f"{where}: config.json: model_args.{key} is not an architecture argument (a {type(value).__name__}); "
                "refused"
            )
    return dict(args)


def base_model_id(model: nn.Module | None, base: Mapping[str, Any]) -> str | None:
    """The hub id for the model card's ``base_model``, when there is one."""
    from surgery.hub import client as hub

    name = str(base.get("model") or "")
    if name.startswith(HF_HUB):
        return hub.parse_ref(name)[0]
    if not base.get("pretrained") or base.get("checkpoint") or not name:
        return None
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if cfg is None:  # no model at hand (push): timm's registry knows the pretrained config of a name
        import timm.models

        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - an unknown name simply has no hub id
            return None
        cfg = cfg.to_dict() if cfg is not None else {}
    return (cfg or {}).get("hf_hub_id") or None
