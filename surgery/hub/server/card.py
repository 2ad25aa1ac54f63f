"""Model-card metadata: the YAML front matter of a repo's README.md, read with a small safe parser (stdlib only).

Cards use a simple YAML subset: ``key: scalar``, lists (``- item`` lines or ``[a, b]``) and maps nested one level.
That subset is parsed; anything else (anchors, multi-line strings, deeper nesting such as ``model-index``) is
skipped key by key. The parser never raises and never builds anything but str, int, float, bool, None, list, dict.
"""

from __future__ import annotations

import re
from typing import Any

MAX_FRONT_MATTER = 64 * 1024  # bytes of README.md looked at
_KEY = re.compile(r"""^(?P<key>"[^"]*"|'[^']*'|[^\s:#'"\[\]{}][^:#]*?)\s*:(?:\s+(?P<value>.*))?$""")
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?")


class _Skip(Exception):
    """This value is outside the supported subset: drop the key."""


def _strip_comment(text: str) -> str:
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if text[0] in "'\"":
        if len(text) < 2 or text[-1] != text[0]:
            raise _Skip
        inner = text[1:-1]
        return inner.replace("''", "'") if text[0] == "'" else inner.replace('\\"', '"')
    if text[0] in "[{&*!|>%@`":
        raise _Skip
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~"):
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _flow_list(text: str) -> list:
    inner = text.strip()[1:-1].strip()
    if not inner:
        return []
    if any(c in inner for c in "[]{}"):
        raise _Skip
    return [_scalar(part) for part in inner.split(",") if part.strip()]


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return _flow_list(text)
    return _scalar(text)


def _key(text: str) -> str:
    text = text.strip()
    return text[1:-1] if text[:1] in "'\"" else text


def _block(lines: list[tuple[int, str]]) -> Any:
    """A block under a key: a list of scalars (``- x``) or a map of scalars/flow lists (one level)."""
    if lines[0][1].startswith("- ") or lines[0][1] == "-":
        out = []
        for _, text in lines:
            if not (text.startswith("- ") or text == "-"):
                raise _Skip  # a list of maps or a continuation line
            item = text[1:].strip()
            if _KEY.match(item) and item[:1] not in "'\"":
                raise _Skip
            out.append(_value(item))
        return out
    indent = lines[0][0]
    out_map: dict[str, Any] = {}
    i = 0
    while i < len(lines):
        ind, text = lines[i]
        i += 1
        m = _KEY.match(text)
        if ind != indent or m is None:
            continue
        j = i
        while j < len(lines) and lines[j][0] > indent:
            j += 1
        if m.group("value") is None and j > i and all(t.startswith("-") for _, t in lines[i:j]):
            try:
                out_map[_key(m.group("key"))] = _block(lines[i:j])
            except _Skip:
                pass
        elif j == i:
            try:
                out_map[_key(m.group("key"))] = _value(m.group("value") or "")
            except _Skip:
                pass
        i = j
    return out_map


def parse_front_matter(text: str) -> dict[str, Any]:
    """The metadata of a model card (README.md text): ``{}`` when there is no ``---`` block or nothing parses."""
    try:
        lines = text[:MAX_FRONT_MATTER].lstrip("\ufeff").splitlines()
        if not lines or lines[0].strip() != "---":
            return {}
        end = next((i for i in range(1, len(lines)) if lines[i].rstrip() in ("---", "...")), None)
        if end is None:
            return {}
        body = []
        for raw in lines[1:end]:
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                return {}  # tabs in indentation are not YAML
            text = _strip_comment(raw)
            if text.strip():
                body.append((len(text) - len(text.lstrip()), text.strip()))
        out: dict[str, Any] = {}
        i = 0
        while i < len(body):
            indent, text = body[i]
            i += 1
            m = _KEY.match(text) if indent == 0 else None
            j = i
            while j < len(body) and (body[j][0] > 0 or body[j][1].startswith("- ") or body[j][1] == "-"):
                j += 1
            if m is None:
                i = j
                continue
            try:
                if m.group("value") is not None and m.group("value").strip():
                    if j == i:
                        out[_key(m.group("key"))] = _value(m.group("value"))
                elif j > i:
                    out[_key(m.group("key"))] = _block(body[i:j])
                else:
                    out[_key(m.group("key"))] = None
            except _Skip:
                pass
            i = j
        return out
    except Exception:  # noqa: BLE001 - untrusted text: whatever happens, a card never breaks the server
        return {}


def card_fields(card: dict[str, Any]) -> dict[str, Any]:
    """``tags``, and ``cardData``, ``library_name``, ``pipeline_tag`` when set, as the Hub derives them from a card."""
    tags = card.get("tags")
    if isinstance(tags, str):
        tags = [tags]
    tags = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    library = card.get("library_name") if isinstance(card.get("library_name"), str) else None
    extra = [library] if library else []
    lic = card.get("license")
    if isinstance(lic, str):
        extra.append(f"license:{lic}")
    out: dict[str, Any] = {"tags": list(dict.fromkeys(tags + extra))}
    if card:
        out["cardData"] = card
    if library:
        out["library_name"] = library
    if isinstance(card.get("pipeline_tag"), str):
        out["pipeline_tag"] = card["pipeline_tag"]
    return out
