"""The hub room: :mod:`surgery.hub.client` pushes and pulls through ``huggingface_hub``; :mod:`surgery.hub.server` is
the self-hosted server that speaks the Hugging Face Hub HTTP API (standard library only).

This package's ``__init__`` imports nothing, so ``python -m surgery.hub.server`` loads neither torch nor
``huggingface_hub``. Import the client explicitly: ``from surgery.hub import client``.
"""
