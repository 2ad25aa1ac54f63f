"""Shared test fixtures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

# ---------------------------------------------------------------------------------------------------------------
# Hub server (room: hub server). Appended at the end of this file; other rooms add their fixtures above.


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """The project's hub server on 127.0.0.1 over a fresh root, for one test module.

    Tokens: ``alice`` (write), ``alice_ro`` (alice, read-only), ``bob`` (write). Yields ``url``, ``root``,
    ``tokens`` and ``server`` (the :class:`surgery.hub.server.HubServer`).
    """
    from surgery.hub.server import HubServer, add_token

    root = tmp_path_factory.mktemp("hub")
    tokens = {
        "alice": add_token(root, "alice", "write"),
        "alice_ro": add_token(root, "alice", "read"),
        "bob": add_token(root, "bob", "write"),
    }
    with HubServer(root) as server:
        yield SimpleNamespace(url=server.url, root=root, tokens=tokens, server=server)


@pytest.fixture(scope="session", autouse=True)
def _client_constants():
    """The hub client reads these at import time: keep every test off huggingface.co and off Xet, whatever the
    environment says."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield
