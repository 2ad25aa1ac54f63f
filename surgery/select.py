"""Selecting parameters: glob patterns, ``re:`` regexes, ``!`` negation and Keras-style layer ranges.

Pure functions over names: they never touch a model's weights. A selection that matches nothing is an error that
lists the closest real names, because a typo that silently freezes nothing is the bug this module exists to prevent.

- ``layer4`` or ``layer4.*``: glob over parameter names; a pattern without a wildcard also matches everything under
  that module path (``fc`` selects ``fc.weight`` and ``fc.bias``). ``*`` crosses dots.
- ``re:^blocks\\.(1[01])\\.``: a regular expression, searched in each name (anchor it with ``^``/``$``).
- ``!pattern``: remove what it matches from the selection; a list of only negations starts from everything.
- ``{from, to, which}``: layers by index (negative counts from the end), by share (``to: 50%`` is the first half) or
  by name (a layer name, or a module path: ``from`` takes its first layer, ``to`` its last, ``which`` all of them).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Sequence

from surgery.errors import NoMatchingParameterError, RecipeError
from surgery.layers import Layer
from surgery.recipe import LayerRange, Selector


def _closest(pattern: str, names: Sequence[str], n: int = 3) -> str:
    """The few real names nearest to a pattern, for the error message."""
    plain = re.sub(r"[\\*?\[\]^$()+{}|]", "", pattern.removeprefix("re:").removeprefix("!"))
    modules = sorted({name.rsplit(".", i)[0] for name in names for i in range(1, name.count(".") + 1)})
    pool = list(dict.fromkeys([*modules, *names]))
    close = difflib.get_close_matches(plain, pool, n=n, cutoff=0.3)
    if not close:
        close = list(names[:n])
    return ", ".join(close)


def _matcher(pattern: str, where: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise RecipeError(f"{where}: invalid regular expression {pattern[3:]!r}: {err}") from None
        return lambda name: regex.search(name) is not None
    if not pattern:
        raise RecipeError(f"{where}: empty pattern; use '*' for every parameter")
    return lambda name: fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def match_patterns(patterns: Sequence[str], names: Sequence[str], *, where: str) -> list[str]:
    """Names selected by glob/regex patterns with ``!`` negation, in model order. Unmatched patterns are errors."""
    positives = [p for p in patterns if not p.startswith("!")]
    negatives = [p[1:] for p in patterns if p.startswith("!")]
    selected: set[str] = set() if positives else set(names)
    for pattern in positives:
        hits = {n for n in names if _matcher(pattern, where)(n)}
        if not hits:
            raise NoMatchingParameterError(
                f"{where}: pattern {pattern!r} matches no parameter; closest names: {_closest(pattern, names)}"
            )
        selected |= hits
    for pattern in negatives:
        hits = {n for n in selected if _matcher(pattern, where)(n)}
        if not hits:
            raise NoMatchingParameterError(
                f"{where}: exclusion '!{pattern}' removes nothing from the selection; "
                f"closest names: {_closest(pattern, sorted(selected))}"
            )
        selected -= hits
    return [n for n in names if n in selected]


def _layer_indices(ref: int | str, layers: Sequence[Layer], *, key: str, where: str) -> list[int]:
    """Indices of the layers a reference names: an index, a layer name, or a module path inside layers."""
    count = len(layers)
    if isinstance(ref, bool):
        raise RecipeError(f"{where}.{key}: expected a layer index or name, got {ref!r}")
    if isinstance(ref, int):
        if not -count <= ref < count:
            raise NoMatchingParameterError(
                f"{where}.{key}: layer index {ref} is out of range; the model has {count} layers (0..{count - 1}, "
                "or negative from the end); `surgery plan` lists them"
            )
        return [ref % count]
    if ref.endswith("%"):
        try:
            share = float(ref[:-1])
        except ValueError:
            share = -1.0
        if not 0 <= share <= 100:
            raise RecipeError(f"{where}.{key}: {ref!r} is not a share of the layers; write e.g. '50%'")
        # 'to: 50%' ends just before the halfway mark; 'from: 50%' starts at it.
        mark = round(count * share / 100)
        return [max(0, min(count - 1, mark - 1 if key == "to" else mark))]
    exact = [layer.index for layer in layers if layer.name == ref]
    if exact:
        return exact
    inside = [layer.index for layer in layers if any(p == ref or p.startswith(ref + ".") for p in layer.params)]
    if inside:
        return inside
    names = [layer.name for layer in layers]
    close = difflib.get_close_matches(ref, names, n=3, cutoff=0.3) or names[:3]
    raise NoMatchingParameterError(
        f"{where}.{key}: no layer or module named {ref!r}; closest layers: {', '.join(close)}"
    )


def select_layers(spec: LayerRange, layers: Sequence[Layer], *, where: str) -> list[int]:
    """Layer indices chosen by a Keras-style ``from``/``to``/``which`` range (all three combine: range ∩ which)."""
    start = min(_layer_indices(spec.from_, layers, key="from", where=where)) if spec.from_ is not None else 0
    stop = max(_layer_indices(spec.to, layers, key="to", where=where)) if spec.to is not None else len(layers) - 1
    if start > stop:
        raise RecipeError(
            f"{where}: 'from' (layer {start}, {layers[start].name}) comes after 'to' (layer {stop}, "
            f"{layers[stop].name}); swap them"
        )
    chosen = set(range(start, stop + 1))
    if spec.which is not None:
        if callable(spec.which):
            wanted = {layer.index for layer in layers if spec.which(layer.index, layer.name)}
        else:
            wanted = {i for ref in spec.which for i in _layer_indices(ref, layers, key="which", where=where)}
        chosen &= wanted
    if not chosen:
        raise NoMatchingParameterError(f"{where}: the layer range selects no layer; `surgery plan` lists the layers")
    return sorted(chosen)


def select(selector: Selector, names: Sequence[str], layers: Sequence[Layer], *, where: str) -> list[str]:
    """Resolve any selector to parameter names, in model order."""
    if isinstance(selector, LayerRange):
        indices = set(select_layers(selector, layers, where=where))
        chosen = {p for layer in layers if layer.index in indices for p in layer.params}
        return [n for n in names if n in chosen]
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not patterns:
        raise RecipeError(f"{where}: empty list of patterns; use '*' for every parameter")
    return match_patterns(patterns, names, where=where)


def describe(selector: Selector) -> str:
    """A short readable form of a selector for plan tables."""
    if isinstance(selector, LayerRange):
        parts = [f"{k}={v}" for k, v in (("from", selector.from_), ("to", selector.to)) if v is not None]
        if selector.which is not None:
            parts.append("which=<predicate>" if callable(selector.which) else f"which={list(selector.which)}")
        return " ".join(parts)
    return selector if isinstance(selector, str) else ",".join(selector)
