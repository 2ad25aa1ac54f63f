"""Hub client: push files as one commit, download snapshots, resolve revisions. It knows nothing of adapters
(``surgery.adapter`` decides what to push and verifies it; this module only moves files).

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
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from surgery.errors import HubError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

HF_HUB = "hf-hub:"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Pickle formats: never uploaded (loading them can run code); weights are only ever safetensors.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"})
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    """What a push made: the commit (``sha``, ``url``) on ``repo_id`` at ``revision``, the files pushed (``paths``)."""

    repo_id: str
    revision: str
    sha: str
    url: str
    files: int
    bytes: int
    paths: tuple[str, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()  # (file, why) the caller chose not to push

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
                log.warning(
                    "%s", _scrub(f"{what}: {type(err).__name__} ({_first_line(err)}); retrying in {delay:.0f}s", token)
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


def push_files(
    folder: str | Path,
    repo_id: str,
    files: Sequence[str],
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    progress: bool = True,
    retries: int = 3,
) -> PushResult:
    """Upload ``files`` (paths relative to ``folder``) to ``repo_id`` (created if missing) as one commit.

    The caller decides which files (``surgery.adapter.push`` picks an adapter's set); this is the one filter: exactly
    these files become the commit's operations. ``revision`` is a branch, created from ``main`` if missing. A pickle
    file is refused whoever asks. Pushing the same files again makes no commit (``huggingface_hub`` skips no-ops).
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    repo_id, pinned = parse_ref(repo_id)
    if pinned:
        raise HubError(f"{repo_id}@{pinned}: push to a branch with --revision {pinned}, not @{pinned}")
    if not files:
        raise HubError(f"push: no files to upload from {folder}")
    paths = []
    for rel in files:
        path = folder / rel
        if not path.is_file() or path.is_symlink() or ".." in Path(rel).parts or Path(rel).is_absolute():
            raise HubError(f"push: {rel} is not a regular file inside {folder}")
        if path.suffix in PICKLE_SUFFIXES:
            raise HubError(f"push: {rel} is a pickle file; pickle can run code when loaded and is never pushed")
        paths.append(path)
    size = sum(p.stat().st_size for p in paths)
    branch = revision or "main"
    api = _api(token)
    log.info("pushing %d file(s), %.1f MB, from %s to %s/%s (%s)", len(paths), size / 1e6, folder, endpoint(), repo_id,
             branch)  # fmt: skip

    def create() -> None:
        # Only create what is missing: huggingface_hub's create_repo(exist_ok=True) answers a 403 on an existing repo
        # by building a URL from the endpoint it read at import, which fails when HF_ENDPOINT was set later.
        if not api.repo_exists(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)

    _with_retries(create, what=f"creating {repo_id}", repo_id=repo_id, token=token, retries=retries)

    def upload() -> Any:
        operations = [CommitOperationAdd(path_in_repo=str(rel), path_or_fileobj=str(folder / rel)) for rel in files]
        with _progress(progress):
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                revision=revision,
                commit_message=message or f"Upload {folder.name} with timm-surgery",
            )

    info = _with_retries(upload, what=f"pushing to {repo_id}", repo_id=repo_id, token=token, retries=retries)
    log.info("pushed %s@%s (%s): %s", repo_id, info.oid[:12], branch, info.commit_url)
    return PushResult(repo_id, branch, info.oid, info.commit_url, len(paths), size, tuple(str(f) for f in files))
