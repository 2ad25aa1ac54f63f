"""Request-body schemas: one per endpoint, checked before any effect, so a wrong type is a 400 and never a 500.

A check is a function ``(value, where) -> value`` that raises a 400 :class:`ApiError` naming the key (``where``) and
what it must be. :func:`obj` builds one for a JSON object from one check per key; keys the client may add in newer
versions are ignored unless the object says ``extra="refuse"`` (settings: a setting silently ignored is a lie).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from surgery.hub.server.common import bad

Check = Callable[[Any, str], Any]


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, list) else "an object"
    )


def _fail(where: str, expected: str, value: Any) -> Exception:
    return bad(f"Invalid request body: {where} must be {expected}, not {_kind(value)}")


def string(max_len: int = 100_000) -> Check:
    """A string of at most ``max_len`` characters."""

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise _fail(where, "a string", value)
        if len(value) > max_len:
            raise bad(f"Invalid request body: {where} is longer than {max_len} characters")
        return value

    return check


def boolean(value: Any, where: str) -> bool:
    """``true`` or ``false`` (never a string such as ``"false"``)."""
    if not isinstance(value, bool):
        raise _fail(where, "true or false", value)
    return value


def integer(minimum: int = 0, maximum: int | None = None) -> Check:
    """An integer (not a boolean) in ``[minimum, maximum]``."""

    def check(value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(where, "an integer", value)
        if value < minimum or (maximum is not None and value > maximum):
            raise bad(f"Invalid request body: {where} must be between {minimum} and {maximum}")
        return value

    return check


def choice(*allowed: Any) -> Check:
    """One of ``allowed`` (compared by type and value, so ``"false"`` is not ``False``)."""

    def check(value: Any, where: str) -> Any:
        if not any(type(value) is type(a) and value == a for a in allowed):
            shown = ", ".join(repr(a) for a in allowed)
            raise bad(f"Invalid request body: {where} must be one of {shown}, not {value!r:.80}")
        return value

    return check


def nullable(inner: Check) -> Check:
    """``null`` or whatever ``inner`` accepts."""

    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def list_of(item: Check, max_items: int = 10_000) -> Check:
    """A list of at most ``max_items`` values, each checked by ``item``."""

    def check(value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise _fail(where, "a list", value)
        if len(value) > max_items:
            raise bad(f"Invalid request body: {where} has more than {max_items} items")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return check


def any_object(value: Any, where: str) -> dict:
    """Any JSON object, unchecked inside (checked later by a schema chosen from a sibling key)."""
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    return value


def anything(value: Any, where: str) -> Any:
    """Any JSON value (keys the server accepts and ignores)."""
    return value


def obj(fields: dict[str, Check], required: Iterable[str] = (), extra: str = "ignore") -> Check:
    """A JSON object: each key of ``fields`` checked when present, ``required`` keys present; others per ``extra``."""
    need = tuple(required)

    def check(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise _fail(where, "an object", value)
        for key in need:
            if key not in value:
                raise bad(f"Invalid request body: {where}.{key} is required")
        out = {}
        for key, val in value.items():
            if key in fields:
                out[key] = fields[key](val, f"{where}.{key}")
            elif extra == "refuse":
                raise bad(f"Invalid request body: unknown key {where}.{key!s:.80} (known: {', '.join(fields)})")
        return out

    return check


def validate(value: Any, schema: Check, where: str = "body") -> Any:
    """Check ``value`` against ``schema``; returns the checked value or raises a 400 naming the bad key."""
    return schema(value, where)


# --------------------------------------------------------------------------------------------------------------
# One schema per endpoint (HUB_API.md section 2). Unknown keys are ignored except where noted.

_NAME = string(96)
_REF = string(256)
_PATH = string(4096)
_OID = string(64)
REPO_TYPE = nullable(choice("model", "dataset", "space"))

CREATE_REPO = obj(
    {
        "name": _NAME,
        "organization": nullable(_NAME),
        "type": REPO_TYPE,
        "visibility": nullable(choice("public", "private")),
        "private": nullable(boolean),
        **{k: anything for k in ("sdk", "hardware", "secrets", "variables", "template", "resourceGroupId", "region")},
    },
    required=("name",),
)
DELETE_REPO = obj({"name": _NAME, "organization": nullable(_NAME), "type": REPO_TYPE}, required=("name",))
SETTINGS = obj(
    {
        "private": nullable(boolean),
        "visibility": nullable(choice("public", "private")),
        "gated": nullable(choice(False, "auto", "manual")),
        "discussionsDisabled": nullable(boolean),
        "xetEnabled": nullable(boolean),
    },
    extra="refuse",
)
VALIDATE_YAML = obj({"content": nullable(string(10_000_000)), "repoType": nullable(string(16))})
PATHS_INFO = obj({"paths": list_of(_PATH), "expand": nullable(boolean)})
PREUPLOAD = obj(
    {
        "files": list_of(obj({"path": _PATH, "sample": nullable(string(4096)), "size": integer()}, required=("path",))),
        "gitIgnore": nullable(string(1_000_000)),
        "gitAttributes": nullable(string(1_000_000)),
    },
    required=("files",),
)
LFS_BATCH = obj(
    {
        "operation": choice("upload", "download"),
        "transfers": list_of(string(64), 16),
        "objects": list_of(obj({"oid": _OID, "size": integer()}, required=("oid", "size")), 1000),
        "hash_algo": choice("sha256"),
        "ref": nullable(obj({"name": _REF})),
    },
    required=("operation", "objects"),
)
LFS_VERIFY = obj({"oid": _OID, "size": integer()}, required=("oid", "size"))
CREATE_BRANCH = obj({"startingPoint": nullable(_REF)})
CREATE_TAG = obj({"tag": _REF, "message": nullable(string(100_000))}, required=("tag",))

COMMIT_LINE = obj(
    {"key": choice("header", "file", "lfsFile", "deletedFile", "deletedFolder"), "value": any_object},
    required=("key", "value"),
)
COMMIT_OPS: dict[str, Check] = {
    "header": obj({"summary": nullable(string()), "description": nullable(string()), "parentCommit": nullable(_REF)}),
    "file": obj(
        {"path": _PATH, "content": string(1 << 40), "encoding": choice("base64")}, required=("path", "content")
    ),
    "lfsFile": obj(
        {"path": _PATH, "algo": choice("sha256"), "oid": _OID, "size": nullable(integer())}, required=("path", "oid")
    ),
    "deletedFile": obj({"path": _PATH}, required=("path",)),
    "deletedFolder": obj({"path": _PATH}, required=("path",)),
}
