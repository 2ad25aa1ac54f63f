"""Pushing a folder to a hub: which files (the adapter set, a merged timm model, or what the caller opts into), the
model card with the real repo id, then one commit through :func:`surgery.hub.client.push_files`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from surgery.adapter.card import REPO_PLACEHOLDER, write_card
from surgery.adapter.format import ADAPTER_FILE, CARD_FILE, CONFIG_FILE, HF_HUB, MERGED_CONFIG, MERGED_WEIGHTS
from surgery.errors import HubError
from surgery.hub.client import PICKLE_SUFFIXES, PushResult, parse_ref, push_files
from surgery.io import write_text

log = logging.getLogger(__name__)

# The adapter set: what loading needs, plus the run's small records that hold no path of this machine. recipe.yaml,
# classes.json and metrics.json stay home: surgery.json already holds the resolved recipe (paths removed), the class
# names and the meaningful metrics, while those files carry local paths, histories and internal counters.
ADAPTER_SET = (
    ADAPTER_FILE,
    CONFIG_FILE,
    CARD_FILE,
    "plan.json",
    "learning_curve.png",
    "adapter_config.json",  # PEFT's files, in a LoRA run's folder (surgery.lora.CONFIG_NAME, WEIGHTS_NAME)
    "adapter_model.safetensors",
)
MERGED_SET = (MERGED_WEIGHTS, MERGED_CONFIG, CARD_FILE)
CHECKPOINTS = "checkpoints"


def _all_files(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            path.is_file()
            and not path.is_symlink()
            and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts)
        ):
            out.append(rel.as_posix())
    return out


def select_files(
    folder: Path, *, include_checkpoints: bool = False, everything: bool = False
) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to push, [(file left out, why)]) for ``folder``.

    An adapter folder (with ``surgery.json``) pushes :data:`ADAPTER_SET`; a merged timm folder (``config.json``)
    pushes :data:`MERGED_SET`; any other folder pushes its files. ``include_checkpoints`` adds ``checkpoints/``,
    ``everything`` every file. Pickle files and hidden files are never pushed. A ``config.json`` without safetensors
    weights is refused: timm could not load it, and pushing it alone would look like a model.
    """
    present = _all_files(folder)
    pushed: list[str] = []
    left: list[tuple[str, str]] = []
    if (folder / CONFIG_FILE).is_file():
        chosen = set(ADAPTER_SET)
        kind = "not part of the adapter set (--all pushes it)"
    elif (folder / MERGED_CONFIG).is_file():
        chosen = set(MERGED_SET)
        kind = "not part of a timm model folder (--all pushes it)"
    else:
        chosen = set(present)
        kind = ""
    for rel in present:
        if Path(rel).suffix in PICKLE_SUFFIXES:
            left.append((rel, "pickle: loading it can run code, so it is never pushed"))
        elif rel in chosen or everything or (include_checkpoints and rel.startswith(f"{CHECKPOINTS}/")):
            pushed.append(rel)
        elif rel.startswith(f"{CHECKPOINTS}/"):
            left.append((rel, "a training checkpoint (--include-checkpoints pushes them)"))
        else:
            left.append((rel, kind))
    if MERGED_CONFIG in pushed and not (folder / CONFIG_FILE).is_file() and MERGED_WEIGHTS not in pushed:
        why = "; ".join(f"{rel} left out: {reason}" for rel, reason in left if Path(rel).suffix in PICKLE_SUFFIXES)
        raise HubError(
            f"push: {folder} has {MERGED_CONFIG} but no {MERGED_WEIGHTS}, so timm could not load what would be "
            f"pushed{f' ({why})' if why else ''}; write safetensors weights (surgery merge, or "
            "timm.models.save_for_hf(model, dir, safe_serialization=True)) and push again"
        )
    if not pushed:
        raise HubError(f"push: {folder} has no files to push" + (f" ({left[0][0]}: {left[0][1]})" if left else ""))
    return pushed, left


def _card_for(folder: Path, repo_id: str) -> None:
    """Make README.md say how to load from ``repo_id``: regenerate an adapter's card from ``surgery.json``; in a
    merged folder's card (ours), replace the placeholder."""
    card = folder / CARD_FILE
    ours = not card.is_file() or "timm-surgery" in card.read_text(encoding="utf-8", errors="replace")
    if not ours:
        return  # a card the user wrote: theirs to keep
    if (folder / CONFIG_FILE).is_file():
        from surgery.adapter.base import base_model_id, warn_local_base
        from surgery.adapter.format import read_config

        config = read_config(folder)
        warn_local_base(config.base.model_dump(), when="push")
        write_card(card, config, base_model_id=base_model_id(None, config.base.model_dump()), repo=repo_id)
    elif card.is_file():
        text = card.read_text(encoding="utf-8")
        if f"{HF_HUB}{REPO_PLACEHOLDER}" in text:
            write_text(card, text.replace(f"{HF_HUB}{REPO_PLACEHOLDER}", f"{HF_HUB}{repo_id}"))


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    include_checkpoints: bool = False,
    everything: bool = False,
    progress: bool = True,
    retries: int = 3,
) -> PushResult:
    """Push ``folder`` to ``repo_id`` as one commit: an adapter folder's adapter set, a merged folder's timm files
    (see :func:`select_files`). An adapter is verified first, so a tampered adapter is never pushed, and its model card
    is rewritten to load from ``repo_id``. Returns the commit; ``left_out`` lists the files not pushed and why,
    ``ref`` is the pinned reference ``hf-hub:org/name@<sha>``."""
    from surgery.adapter.load import verify_files

    folder = Path(folder)
    repo, _ = parse_ref(repo_id)
    if not folder.is_dir():
        raise HubError(f"push: {folder} is not a folder; give the output folder of `surgery train` or `surgery merge`")
    if (folder / CONFIG_FILE).is_file():
        verify_files(folder)
    files, left = select_files(folder, include_checkpoints=include_checkpoints, everything=everything)
    for rel, why in left:
        log.info("not pushed: %s (%s)", rel, why)
    _card_for(folder, repo)
    result = push_files(
        folder,
        repo_id,
        files,
        private=private,
        revision=revision,
        message=message,
        token=token,
        progress=progress,
        retries=retries,
    )
    return dataclasses.replace(result, left_out=tuple(left))


push_folder = push
"""Alias of :func:`push` (``surgery.push_folder``)."""


def push_from_recipe(
    folder: str | Path, spec: Any, *, token: str | None = None, progress: bool = True
) -> PushResult | None:
    """Push ``folder`` as a recipe's ``hub:`` section says (the adapter set); ``None`` when it names no repo. For
    `surgery train`, from the main process only."""
    if not spec.repo:
        return None
    return push(
        folder, spec.repo, private=spec.private, revision=spec.revision, message=spec.message, token=token,
        progress=progress,
    )  # fmt: skip
