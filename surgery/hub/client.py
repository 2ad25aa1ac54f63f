"""Hub client: push a folder as one commit, download adapters and base models, resolve revisions.

Everything goes through the real ``huggingface_hub`` client, so any server speaking the Hugging Face Hub API works:
huggingface.co or the project's own ``surgery.hub.server``. Configuration is what Hugging Face users already know:

- ``HF_ENDPOINT``: the hub's base URL. Read at every call (not only when ``huggingface_hub`` is imported), so setting it
  late in a notebook works for this module. timm's own ``hf-hub:`` loading reads it once, at import.
- ``HF_TOKEN`` (or a token stored by ``hf auth login``): used by ``huggingface_hub`` itself. This module never prints,
  logs or puts the token into an error message.
- ``HF_HUB_DISABLE_XET=1``: needed for uploads to servers without Xet storage (the project's own server).

Transient failures (connection errors, timeouts, 408/429/5xx answers) are retried with backoff. Pushing the same
files again is harmless: ``huggingface_hub`` skips a commit that changes nothing, so a retry never makes two commits.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from surgery.errors import HubError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from surgery.schema import HubSpec

HF_HUB = "hf-hub:"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Never uploaded: hidden files, caches and pickle formats (weights are only ever safetensors).
DEFAULT_IGNORE = (".*", "**/.*", "__pycache__/*", "**/__pycache__/*", "*.pt", "*.pth", "*.bin", "*.pkl", "*.ckpt")
# What `surgery train` pushes from its output folder: the adapter and the small records of the run, not the full
# weights (the adapter reproduces them), checkpoints or logs.
TRAIN_OUTPUTS = (
    "adapter.safetensors",
    "surgery.json",
    "README.md",
    "recipe.yaml",
    "plan.json",
    "classes.json",
    "metrics.json",
    "metrics.jsonl",
    "learning_curve.png",
)
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """What a push made: the commit (``sha``, ``url``) on ``repo_id`` at ``revision``."""

    repo_id: str
    revision: str
    sha: str
    url: str
    files: int
    bytes: int

    @property
    def ref(self) -> str:
        """The pinned reference to load this exact commit: ``hf-hub:org/name@sha``."""
        return f"{HF_HUB}{self.repo_id}@{self.sha}"


# ------------------------------------------------------------------------------------------------ configuration


def endpoint() -> str:
    """The hub's base URL: ``HF_ENDPOINT`` now, else what ``huggingface_hub`` read at import (huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _api(token: str | None = None) -> HfApi:
    from huggingface_hub import HfApi

    from surgery import __version__

    return HfApi(endpoint=endpoint(), token=token, library_name="timm-surgery", library_version=__version__)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@revision]`` (the prefix is optional) -> ``("org/name", revision or None)``."""
    body = ref[len(HF_HUB) :] if ref.startswith(HF_HUB) else ref
    repo_id, _, revision = body.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise HubError(f"{ref!r} is not a hub reference; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo_id, revision or None


def _secrets(token: str | None) -> list[str]:
    found = [t for t in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t]
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            found.append(stored)
    return found


def _scrub(text: str, token: str | None) -> str:
    for secret in _secrets(token):
        text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------------------------------------------ errors


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def is_transient(err: BaseException) -> bool:
    """A failure worth retrying: the network, a timeout, or a 408/429/5xx answer."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return _status(err) in TRANSIENT_STATUS
    return isinstance(err, httpx2.TransportError | ConnectionError | TimeoutError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_error(err: BaseException, what: str, repo_id: str, token: str | None) -> HubError:
    """Turn a client exception into one actionable line (never containing the token)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{endpoint()}/{repo_id}"
    status = _status(err)
    if isinstance(err, RevisionNotFoundError):
        msg = f"{what}: {where} has no such revision; check the @revision (a branch, tag or commit sha)"
    elif isinstance(err, GatedRepoError):
        msg = f"{what}: {where} is gated; request access on the hub, then set HF_TOKEN"
    elif isinstance(err, RepositoryNotFoundError):
        msg = (
            f"{what}: {where} does not exist or is private; check the name and HF_ENDPOINT, and set HF_TOKEN "
            "to a token that can read it"
        )
    elif isinstance(err, RemoteEntryNotFoundError):
        msg = f"{what}: a file is missing in {where}: {_first_line(err)}"
    elif status == 401:
        msg = f"{what}: {where} refused the token (401); set HF_TOKEN to a valid token for {endpoint()}"
    elif status == 403:
        msg = (
            f"{what}: {where} refused to write (403): {_first_line(err)}; use a token with write access to the "
            f"{repo_id.split('/')[0]!r} namespace"
        )
    elif isinstance(err, LocalEntryNotFoundError):
        msg = f"{what}: cannot reach {endpoint()} and the files are not cached; check HF_ENDPOINT and the network"
    elif isinstance(err, HfHubHTTPError):
        msg = f"{what}: {where} answered {status}: {_first_line(err)}"
    elif is_transient(err):
        msg = f"{what}: cannot reach {endpoint()} ({type(err).__name__}: {_first_line(err)}); check HF_ENDPOINT"
    else:
        msg = f"{what}: {type(err).__name__}: {_first_line(err)}"
    return HubError(_scrub(msg, token))


def _with_retries(fn: Callable[[], T], *, what: str, repo_id: str, token: str | None, retries: int) -> T:
    """Run ``fn``, retrying transient failures with exponential backoff (1 s, 2 s, 4 s, ...)."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return fn()
        except HubError:
            raise
        except Exception as err:  # noqa: BLE001 - every client failure becomes a HubError below
            if attempt < retries and is_transient(err):
                delay = 2.0**attempt
                print(
                    _scrub(f"{what}: {type(err).__name__} ({_first_line(err)}); retrying in {delay:.0f}s", token),
                    file=sys.stderr,
                )
                time.sleep(delay)
                continue
            if isinstance(err, HfHubHTTPError | OSError | ValueError) or is_transient(err):
                raise _hub_error(err, what, repo_id, token) from None
            raise
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


# -------------------------------------------------------------------------------------------------------- reads


def resolve_revision(repo_id: str, revision: str | None = None, *, token: str | None = None, retries: int = 3) -> str:
    """The commit sha that ``revision`` (branch, tag, sha; default ``main``) of a model repo points to now."""
    info = _with_retries(
        lambda: _api(token).model_info(repo_id, revision=revision),
        what=f"resolving {repo_id}@{revision or 'main'}",
        repo_id=repo_id,
        token=token,
        retries=retries,
    )
    if not info.sha:
        raise HubError(f"{endpoint()}/{repo_id} did not report a commit sha for {revision or 'main'}")
    return info.sha


def download(
    ref: str,
    *,
    allow_patterns: Sequence[str] | None = None,
    token: str | None = None,
    progress: bool = False,
    retries: int = 3,
) -> Path:
    """Download ``hf-hub:org/name[@revision]`` (only ``allow_patterns``) into the local cache; returns the snapshot
    folder, named after the resolved commit sha. Files already cached are not downloaded again."""
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_ref(ref)

    def run() -> str:
        with _progress(progress):
            return snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(allow_patterns) if allow_patterns else None,
                endpoint=endpoint(),
                token=token,
            )

    path = _with_retries(run, what=f"downloading {ref}", repo_id=repo_id, token=token, retries=retries)
    return Path(path)


# ------------------------------------------------------------------------------------------------------- writes


def _files(folder: Path, ignore: Sequence[str], only: Sequence[str] | None) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if only is not None and not any(fnmatch.fnmatchcase(rel.as_posix(), p) for p in only):
            continue
        if path.is_file() and not any(rel.match(p) or rel.as_posix() == p for p in ignore):
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            out.append(path)
    return out


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    only: Sequence[str] | None = None,
    progress: bool = True,
    retries: int = 3,
) -> PushResult:
    """Upload every file of ``folder`` to ``repo_id`` (created if missing) as one commit; returns the commit.

    ``revision`` is a branch, created from ``main`` if missing. An adapter folder (one with ``surgery.json``) is
    verified first, so a tampered adapter is never pushed. Hidden files and pickle formats are never uploaded;
    ``only`` (glob patterns) restricts the upload further.
    """
    folder = Path(folder)
    repo_id, pinned = parse_ref(repo_id)
    if pinned:
        raise HubError(f"{repo_id}@{pinned}: push to a branch with --revision {pinned}, not @{pinned}")
    if not folder.is_dir():
        raise HubError(f"push: {folder} is not a folder; give the output folder of `surgery train` or `surgery merge`")
    if (folder / "surgery.json").is_file():
        from surgery.adapter import verify_files

        verify_files(folder)
    files = _files(folder, ignore, only)
    if not files:
        raise HubError(f"push: {folder} has no files to upload")
    size = sum(p.stat().st_size for p in files)
    branch = revision or "main"
    api = _api(token)
    if progress:
        print(
            f"Pushing {len(files)} file(s), {size / 1e6:.1f} MB, from {folder} to {endpoint()}/{repo_id} ({branch})",
            file=sys.stderr,
        )

    def create() -> None:
        # Only create what is missing: huggingface_hub's create_repo(exist_ok=True) answers a 403 on an existing repo
        # by building a URL from the endpoint it read at import, which fails when HF_ENDPOINT was set later.
        if not api.repo_exists(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)

    _with_retries(create, what=f"creating {repo_id}", repo_id=repo_id, token=token, retries=retries)

    def upload() -> Any:
        with _progress(progress):
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=message or f"Upload {folder.name} with timm-surgery",
                allow_patterns=[glob.escape(p.relative_to(folder).as_posix()) for p in files],
            )

    info = _with_retries(upload, what=f"pushing to {repo_id}", repo_id=repo_id, token=token, retries=retries)
    sha = info.oid
    result = PushResult(repo_id, branch, sha, info.commit_url, len(files), size)
    if progress:
        print(f"Pushed {repo_id}@{sha[:12]} ({branch}): {info.commit_url}", file=sys.stderr)
    return result


def push_from_recipe(
    folder: str | Path, spec: HubSpec, *, token: str | None = None, progress: bool = True
) -> PushResult | None:
    """Push ``folder`` as a recipe's ``hub:`` section says; ``None`` when it names no repo. For `surgery train`
    (main process only): from an adapter folder only the adapter and the run's small records (:data:`TRAIN_OUTPUTS`).
    """
    if not spec.repo:
        return None
    only = TRAIN_OUTPUTS if (Path(folder) / "surgery.json").is_file() else None
    return push_folder(
        folder,
        spec.repo,
        private=spec.private,
        revision=spec.revision,
        message=spec.message,
        token=token,
        only=only,
        progress=progress,
    )


push = push_folder
"""Alias of :func:`push_folder` (``surgery.push(folder, "org/name")``)."""
