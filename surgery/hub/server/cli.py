"""``surgery hub`` (= ``python -m surgery.hub.server``): serve a root, manage its tokens, garbage-collect it.

``main(argv)`` is reusable by other CLIs. Without a command, the arguments are those of ``serve`` (so
``python -m surgery.hub.server --root DIR`` keeps working).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import HubError
from surgery.hub.server.common import GB, MAX_JSON_BODY, ROLES, Limits
from surgery.hub.server.gc import collect
from surgery.hub.server.server import lock_root, serve
from surgery.hub.server.tokens import DEFAULT_ROLE, add_token, list_tokens, revoke_token

COMMANDS = ("serve", "token", "gc")


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``surgery hub``: ``serve``, ``token add|list|revoke`` and ``gc``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="The self-hosted, Hugging Face-compatible hub (standard library only)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,token,gc}")
    d = Limits()
    p = sub.add_parser("serve", help="serve a hub directory over HTTP (prints the URL once listening)")
    p.add_argument("--root", type=Path, required=True, help="hub data directory (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    p.add_argument("--public-url", help="base URL clients use, if not the address they connect to")
    p.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    p.add_argument(
        "--max-lfs-size",
        type=_positive(float),
        default=d.max_lfs_size / GB,
        metavar="GB",
        help=f"largest file accepted through LFS, in GB (default {d.max_lfs_size // GB}, as the Hub)",
    )
    p.add_argument(
        "--max-commit-size",
        type=_positive(float),
        default=d.max_commit_body / GB,
        metavar="GB",
        help=f"largest commit request (inline files), in GB (default {d.max_commit_body // GB})",
    )
    p.add_argument(
        "--max-connections",
        type=_positive(int),
        default=d.max_connections,
        metavar="N",
        help=f"connections served at once; more are answered 503 (default {d.max_connections})",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive(float),
        default=d.idle_timeout,
        metavar="SECONDS",
        help=f"close a connection silent this long (default {d.idle_timeout:g})",
    )
    p.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=d.header_timeout,
        metavar="SECONDS",
        help=f"close a connection whose request line and headers take longer (default {d.header_timeout:g})",
    )

    p = sub.add_parser("token", help="manage tokens (stored hashed in ROOT/tokens.json)")
    tsub = p.add_subparsers(dest="action", required=True, metavar="{add,list,revoke}")
    p_add = tsub.add_parser("add", help=f"create a token for USER and print it, once (default role: {DEFAULT_ROLE})")
    p_add.add_argument("user")
    p_add.add_argument(
        "--role",
        choices=ROLES,
        default=DEFAULT_ROLE,
        help=f"read: download public and own private repos; write: also push to USER/... (default: {DEFAULT_ROLE})",
    )
    p_list = tsub.add_parser("list", help="list token ids, users and roles")
    p_rev = tsub.add_parser("revoke", help="delete the token with this id (see `token list`)")
    p_rev.add_argument("token_id")
    for q in (p_add, p_list, p_rev):
        q.add_argument("--root", type=Path, required=True, help="hub data directory")

    p = sub.add_parser(
        "gc", help="delete objects no branch or tag reaches (left by aborted commits); needs the server stopped"
    )
    p.add_argument("--root", type=Path, required=True, help="hub data directory")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m surgery.hub.server") -> int:
    """Run ``serve``, ``token add|list|revoke`` or ``gc``; returns the exit status (2 on a :class:`HubError`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["serve", *argv]  # `python -m surgery.hub.server --root DIR` serves, as it always did
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "serve":
            if not args.quiet:
                logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
            limits = Limits(
                max_lfs_size=int(args.max_lfs_size * GB),
                max_json_body=MAX_JSON_BODY,
                max_commit_body=int(args.max_commit_size * GB),
                max_connections=args.max_connections,
                idle_timeout=args.idle_timeout,
                header_timeout=args.header_timeout,
            )
            serve(args.root, args.host, args.port, public_url=args.public_url, limits=limits)
        elif args.command == "gc":
            if not (args.root / "repos").is_dir():
                raise HubError(f"{args.root} is not a hub directory (it has no repos/ folder)")
            lock = lock_root(args.root)
            try:
                print(collect(args.root))
            finally:
                lock.close()
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
