"""Adapters: the few tensors a recipe changed, saved apart from the base model, reloaded exactly, merged for timm.

An adapter folder holds ``adapter.safetensors`` (exactly what differs from the base), ``surgery.json`` (typed:
:class:`AdapterConfig`) and ``README.md`` (a model card). The rooms of this package:

- :mod:`~surgery.adapter.format`: file names, :class:`AdapterConfig`, :func:`fingerprint`, the one tensor check;
- :mod:`~surgery.adapter.base`: how the base is recorded and built again (through ``build_model`` only);
- :mod:`~surgery.adapter.save`: :func:`save_adapter`;
- :mod:`~surgery.adapter.load`: :func:`load`, :func:`verify_files`, :func:`read_info`;
- :mod:`~surgery.adapter.merge`: :func:`merge` (through timm's ``save_for_hf``), :func:`plain_norms`;
- :mod:`~surgery.adapter.card`: the model card, :func:`describe`, :func:`predict`;
- :mod:`~surgery.adapter.push`: :func:`push` (which files, the card's repo id), over :mod:`surgery.hub.client`.

Weights are only ever written and read as safetensors, never pickle. What loading trusts: docs/security.md.
"""

from surgery.adapter.card import describe, predict
from surgery.adapter.format import (
    ADAPTER_FILE,
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MERGED_CONFIG,
    MERGED_WEIGHTS,
    AdapterConfig,
    BaseRef,
    DataConfig,
    fingerprint,
    read_config,
)
from surgery.adapter.load import AdapterInfo, load, read_info, verify_files
from surgery.adapter.merge import merge, plain_norms
from surgery.adapter.push import push, push_folder, push_from_recipe
from surgery.adapter.save import save_adapter

__all__ = [
    "ADAPTER_FILE",
    "CARD_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MERGED_CONFIG",
    "MERGED_WEIGHTS",
    "AdapterConfig",
    "AdapterInfo",
    "BaseRef",
    "DataConfig",
    "describe",
    "fingerprint",
    "load",
    "merge",
    "plain_norms",
    "predict",
    "push",
    "push_folder",
    "push_from_recipe",
    "read_config",
    "read_info",
    "save_adapter",
    "verify_files",
]
