"""``python -m surgery.hub.server``: serve a root, or manage its tokens. ``main(argv)`` is reusable by other CLIs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import HubError
from surgery.hub.server.common import ROLES
from surgery.hub.server.server import serve
from surgery.hub.server.tokens import add_token, list_tokens, revoke_token


def main(argv: Sequence[str] | None = None, prog: str = "python -m surgery.hub.server") -> int:
    """CLI: ``[serve] --root DIR [--host H] [--port N]`` or ``token add|list|revoke ... --root DIR``.

    Returns the exit status (2 on a :class:`HubError`). ``prog`` lets another CLI (``surgery hub``) reuse it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        parser = argparse.ArgumentParser(
            prog=f"{prog} token",
            description="Manage hub tokens (stored hashed in ROOT/tokens.json).",
        )
        sub = parser.add_subparsers(dest="action", required=True)
        p_add = sub.add_parser("add", help="create a token for USER and print it (shown only once)")
        p_add.add_argument("user")
        p_add.add_argument("--role", choices=ROLES, default="write")
        p_list = sub.add_parser("list", help="list token ids, users and roles")
        p_rev = sub.add_parser("revoke", help="delete the token with this id (see `token list`)")
        p_rev.add_argument("token_id")
        for p in (p_add, p_list, p_rev):
            p.add_argument("--root", type=Path, required=True, help="hub data directory")
        args = parser.parse_args(argv[1:])
    else:
        parser = argparse.ArgumentParser(prog=prog, description="Serve a Hugging Face-compatible hub from a directory.")
        parser.add_argument("--root", type=Path, required=True, help="hub data directory (created if missing)")
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
        parser.add_argument("--public-url", help="base URL clients use, if not the address they connect to")
        parser.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
        args = parser.parse_args(argv[1:] if argv[:1] == ["serve"] else argv)
        args.action = "serve"
    try:
        if args.action == "serve":
            if not args.quiet:
                logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
            serve(args.root, args.host, args.port, public_url=args.public_url)
        elif args.action == "add":
            print(add_token(args.root, args.user, args.role))
        elif args.action == "list":
            for t in list_tokens(args.root):
                print(f"{t['id']}  {t['user']}  {t['role']}  {t['created']}")
        elif not revoke_token(args.root, args.token_id):
            raise HubError(f"No token with id {args.token_id!r} in {args.root}")
    except HubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
