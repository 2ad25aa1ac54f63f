"""Self-hosted hub: the subset of the Hugging Face Hub HTTP API that ``huggingface_hub`` and timm's ``hf-hub:`` use.

Point a client at it with ``HF_ENDPOINT=<url> HF_HUB_DISABLE_XET=1``; the real client then works unchanged
(create_repo, upload_folder incl. LFS basic transfer, hf_hub_download, snapshot_download, branches, tags,
list_models, ...). The wire contract is the project's verified HUB_API.md spec; usage and the security guarantees
are in ``docs/hub-server.md``. Standard library only: importing this package loads no torch, timm or
huggingface_hub.

Modules, each importing only those before it: ``common`` (constants, :class:`Limits`, errors, validation),
``schema`` (one request-body schema per endpoint), ``card`` (model-card front matter), ``tokens``, ``storage``
(repos on disk), ``gc`` (garbage collection), ``wire`` (HTTP plumbing, access checks), ``endpoints`` (one method per
API endpoint), ``server`` (:class:`HubServer`, :func:`serve`, :func:`spawn`) and ``cli`` (:func:`main`).

Run it with ``surgery hub serve --root DIR [--host H] [--port N]`` (prints the URL once listening; the same as
``python -m surgery.hub.server``), create tokens with ``surgery hub token add USER --role write --root DIR`` (the
default role is ``read``) and collect garbage with ``surgery hub gc --root DIR`` (also done at every start).

Storage, under ``--root``::

    tokens.json                     sha256 of each token + user + role; never the token itself
    .secret                         HMAC key signing LFS upload URLs (the client sends no token on the PUT)
    .lock                           flock held by the running server (or gc): one at a time per root
    tmp/                            partial uploads; emptied when a server starts
    repos/<type>/<ns>/<name>/
        meta.json                   visibility, creation date, a random uid
                                    (every directory is 0700 and every file 0600)
        refs.json                   {"branches": {name: sha}, "tags": {name: {"commit", "message"}}}
        commits/ab/<rest>.json      immutable commit: parents, message, author, date and the full file table
        blobs/ab/<rest>             regular files, addressed by git blob sha1
        lfs/ab/<rest>               large files, addressed by sha256 (per repo: no cross-repo dedupe, no leaks)

Crash safety: every file is written to ``tmp/`` and renamed into place; a commit object is written before the
ref that names it, and refs.json is replaced atomically last, so a crash at any point leaves the previous state
(plus unreferenced objects, which are never shown and which gc removes at the next start). A new repo is
assembled in ``tmp/`` and renamed into place.
Commits to one repo are serialized by a per-repo lock; each commit applies its operations to the branch head
read under that lock, and an explicit ``parentCommit`` that is not the head is refused with 412.

Access policy (decided here, since the real Hub's org/role model is out of scope):

* anonymous requests may read public repos; a token (read or write role) also reads its user's private repos;
* only a ``write`` token may write, and only in its own namespace (``org == user``);
* private repos a caller cannot read answer 404 ``RepoNotFound``, exactly like missing ones;
* an unknown token is a 401 everywhere (as on the Hub), even for public reads, checked before anything else so
  that no answer tells an existing private repo from a missing one;
* a server with no tokens at all is read-only: every write answers 401 with the command that creates a token.
"""

from __future__ import annotations

from surgery.hub.server.cli import main
from surgery.hub.server.common import Limits
from surgery.hub.server.gc import collect
from surgery.hub.server.server import HubServer, serve
from surgery.hub.server.tokens import add_token, list_tokens, revoke_token

__all__ = ["HubServer", "Limits", "add_token", "collect", "list_tokens", "main", "revoke_token", "serve"]
