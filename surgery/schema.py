"""Compatibility module: the recipe schema moved to :mod:`surgery.recipe.schema`; ``from surgery.schema import X``
keeps working."""

from __future__ import annotations

from surgery.recipe.schema import *  # noqa: F403
from surgery.recipe.schema import __all__  # noqa: F401
