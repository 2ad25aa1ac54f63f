"""Self-hosted Hugging Face-compatible hub: ``python -m surgery.hub_server --root DIR``.

The implementation lives in the :mod:`surgery.hubserver` package (storage, tokens, HTTP endpoints, server, CLI);
this module is its stable entry point. See that package's docstring for the storage layout and access policy.
"""

from __future__ import annotations

from surgery.hubserver import HubServer, add_token, list_tokens, main, revoke_token, serve

__all__ = ["HubServer", "add_token", "list_tokens", "main", "revoke_token", "serve"]

if __name__ == "__main__":
    raise SystemExit(main())
