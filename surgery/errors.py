"""Typed errors. Each carries one line a user can act on; the CLI prints it and exits with status 2."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base of every error this package raises on purpose. ``str(err)`` is one actionable line."""


class RecipeError(SurgeryError):
    """A recipe file or override is malformed: unknown key, wrong type, bad value, bad YAML, bad ``extends``."""


class NoMatchingParameterError(SurgeryError):
    """A pattern, layer name or index in a rule selects nothing in the model."""


class NothingTrainableError(SurgeryError):
    """The recipe leaves no parameter trainable."""


class HeadError(SurgeryError):
    """A head cannot be found or replaced as the recipe asks."""


class ModelError(SurgeryError):
    """The model reference cannot be built (unknown timm name, bad checkpoint, bad kwargs)."""


class DataError(SurgeryError):
    """Training or validation data is missing or malformed."""


class AdapterError(SurgeryError):
    """An adapter cannot be saved, loaded or merged (wrong base, missing tensor, tampered file)."""


class HubError(SurgeryError):
    """The hub refused a request or cannot be reached."""
