"""Tokens: created once, shown once, stored as sha256 with the user and role in ROOT/tokens.json."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from surgery.errors import HubError
from surgery.hub.server.common import ROLES, ApiError, mkdir_private, now_iso, open_lock, validate_name

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None  # type: ignore[assignment]

DEFAULT_ROLE = "read"  # least privilege: writing needs an explicit --role write


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Tokens


def _tokens_file(root: Path) -> Path:
    return Path(root) / "tokens.json"


def _read_tokens(root: Path) -> list[dict]:
    path = _tokens_file(root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise HubError(f"Cannot read {path}: {err}") from err
    return list(data.get("tokens", []))


@contextlib.contextmanager
def _tokens_locked(root: Path) -> Iterator[list[dict]]:
    """Read-modify-write tokens.json under a file lock, written atomically with mode 0600."""
    root = Path(root)
    mkdir_private(root)
    with open_lock(root / ".tokens.lock") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        tokens = _read_tokens(root)
        yield tokens
        tmp = root / f".tokens.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "tokens": tokens}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _tokens_file(root))


def add_token(root: Path | str, user: str, role: str = DEFAULT_ROLE) -> str:
    """Create a new token for ``user`` with ``role`` (``read``, the default, or ``write``) and return it.

    Only its sha256 is kept, so the token is shown once.
    """
    try:
        validate_name(user, "user name")
    except ApiError as err:
        raise HubError(err.message) from None
    if role not in ROLES:
        raise HubError(f"Invalid role {role!r}: use 'write' or 'read'")
    token = "hf_" + secrets.token_urlsafe(30)
    digest = _token_hash(token)
    with _tokens_locked(Path(root)) as tokens:
        tokens.append({"id": digest[:12], "sha256": digest, "user": user, "role": role, "created": now_iso()})
    return token


def list_tokens(root: Path | str) -> list[dict]:
    """Return ``{id, user, role, created}`` for each token (never the secret, which is not stored)."""
    return [{k: t[k] for k in ("id", "user", "role", "created")} for t in _read_tokens(Path(root))]


def revoke_token(root: Path | str, token_id: str) -> bool:
    """Delete the token whose id (as shown by :func:`list_tokens`) is ``token_id``; True if one was removed."""
    with _tokens_locked(Path(root)) as tokens:
        kept = [t for t in tokens if t.get("id") != token_id]
        removed = len(kept) != len(tokens)
        tokens[:] = kept
    return removed


class TokenStore:
    """Token lookup that re-reads tokens.json when it changes, so ``token add`` works on a running server."""

    def __init__(self, root: Path):
        self.root, self._stamp, self._by_hash = root, None, {}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        try:
            st = _tokens_file(self.root).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                tokens = _read_tokens(self.root) if stamp else []
                self._by_hash = {t["sha256"]: t for t in tokens}
                self._stamp = stamp

    def lookup(self, token: str) -> dict | None:
        self._refresh()
        return self._by_hash.get(_token_hash(token))

    def empty(self) -> bool:
        self._refresh()
        return not self._by_hash
