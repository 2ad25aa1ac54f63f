"""``python -m surgery.hub.server``: the same as ``surgery hub``."""

from surgery.hub.server.cli import main

raise SystemExit(main())
