"""Constants, limits, typed HTTP errors, name/path validation and small helpers of the hub server.

The bottom of the server's import graph: ``common`` <- ``schema``, ``card``, ``tokens``, ``storage`` <- ``gc``,
``wire`` <- ``endpoints`` <- ``server`` <- ``cli``. Nothing here imports another module of the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
WEB_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
ROLES = ("read", "write")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1024 * 1024
MAX_JSON_BODY = 16 * 1024 * 1024
MAX_COMMIT_LINE = 16 * 1024 * 1024  # one inline file: below the 10 MiB LFS threshold, base64-encoded, plus JSON
UPLOAD_URL_TTL = 3600
COMMITS_PAGE = 50
TREE_PAGE = 1000
TOKEN_HELP = "create one with `surgery hub token add USER --role write --root DIR`"
DIR_MODE = 0o700  # every directory and file under the root is the server's alone: private repos stay private
FILE_MODE = 0o600
GB = 1000**3
RESERVED_NAMES = {"api", "datasets", "spaces", "models", "lfs-upload", "lfs-verify", "resolve"}
LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
    "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
REF_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@=/-]{0,199}")
HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one server; every request that exceeds one is refused before any work is done.

    ``max_lfs_size``: largest LFS object the batch endpoint signs an upload for (the Hub's 50 GB);
    ``max_json_body``: largest JSON request body; ``max_commit_body``: largest commit (NDJSON) body, whose inline
    files are each below the 10 MiB LFS threshold; ``max_connections``: connections served at once (more get 503);
    ``idle_timeout``: seconds a connection may stay silent (between requests or mid-body) before it is closed;
    ``header_timeout``: seconds from a request's first byte to the end of its headers (a client trickling its request
    line or headers a byte at a time, never silent for ``idle_timeout``, is cut off here).
    """

    max_lfs_size: int = 50 * GB
    max_json_body: int = MAX_JSON_BODY
    max_commit_body: int = 2 * GB
    max_connections: int = 64
    idle_timeout: float = 60.0
    header_timeout: float = 30.0

    @property
    def max_body(self) -> int:
        """No request body may be larger than this, whatever the endpoint."""
        return max(self.max_lfs_size, self.max_commit_body, self.max_json_body)


# --------------------------------------------------------------------------------------------------------------
# Errors, validation, small helpers


class ApiError(Exception):
    """An HTTP error answer: status, message, and the ``X-Error-Code`` the client maps to its typed errors."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.extra = extra


class ClientGone(Exception):
    """The client closed the connection mid-request: nothing to answer."""


def bad(message: str) -> ApiError:
    return ApiError(400, message, "BadRequest")


def validate_name(value: Any, what: str = "name") -> str:
    """Check a user, namespace or repo name: ASCII letters, digits, ``_.-``, no ``..``/``--``, no ``.git`` end."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise bad(f"Invalid {what} {value!r}: use 1-96 ASCII letters, digits, '_', '.', '-', starting alphanumeric")
    if ".." in value or "--" in value or value.endswith((".git", ".")) or value.lower() in RESERVED_NAMES:
        raise bad(f"Invalid {what} {value!r}: no '..' or '--', no trailing '.'/'.git', not a reserved word")
    return value


def validate_path(value: Any) -> str:
    """Check a file path inside a repo: relative, ``/``-separated, no ``.``/``..``/``.git`` parts, no controls."""
    if not isinstance(value, str) or not value:
        raise bad("Invalid path: empty")
    if CONTROL_CHARS.search(value) or "\\" in value:
        raise bad(f"Invalid path {value!r}: control characters and backslashes are not allowed")
    if value.startswith("/") or len(value.encode()) > 1000:
        raise bad(f"Invalid path {value!r}: must be relative and at most 1000 bytes")
    if any(part in ("", ".", "..", ".git") for part in value.split("/")):
        raise bad(f"Invalid path {value!r}: empty, '.', '..' and '.git' segments are not allowed")
    return value


def validate_ref(value: Any, what: str = "branch") -> str:
    """Check a branch or tag name: git-like, no ``..``, no ``refs/`` prefix, not a commit id."""
    if not isinstance(value, str) or not REF_RE.fullmatch(value):
        raise bad(f"Invalid {what} name {value!r}: use letters, digits and '_.+@=/-'")
    if ".." in value or "//" in value or value.endswith(("/", ".lock", ".")) or value.startswith("refs/"):
        raise bad(f"Invalid {what} name {value!r}: no '..', '//', 'refs/' prefix, trailing '/', '.' or '.lock'")
    if HEX40.fullmatch(value):
        raise bad(f"Invalid {what} name {value!r}: it looks like a commit id")
    return value


def log_safe(value: Any) -> str:
    """``value`` as one printable ASCII line: control and non-ASCII characters become ``\\xNN`` escapes.

    Everything a client sends (paths, repo ids, messages) goes through this before reaching the log, so a ``%0a``
    in a request cannot forge a log line.
    """
    return _UNPRINTABLE.sub(lambda m: "".join(f"\\x{b:02x}" for b in m.group().encode()), str(value))


def strip_signature(path: str) -> str:
    """A request target without its query string when the query carries a signature (never log signed URLs)."""
    target, sep, query = path.partition("?")
    return f"{target}?<signed>" if sep and ("sig=" in query or "signature" in query.lower()) else path


def now_iso() -> str:
    """Current UTC time in the only format the client parses (``...T12:34:56.789Z``)."""
    t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def mkdir_private(path: Path) -> None:
    """Create ``path`` and its missing parents, each with mode 0700; existing directories are left as they are."""
    if not path.is_dir():
        if path.parent != path:
            mkdir_private(path.parent)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=DIR_MODE)


def open_private(path: Path) -> Any:
    """Create ``path`` exclusively with mode 0600 and return it open for binary writing."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")


def open_lock(path: Path) -> Any:
    """Open (creating with mode 0600) a lock file for ``flock``."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE), "a")


def shard(base: Path, oid: str, suffix: str = "") -> Path:
    return base / oid[:2] / (oid[2:] + suffix)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
