"""HTTP plumbing of the hub: bounded body reading, JSON/error answers, caller identity and repo access.

This module knows the server only through :class:`ServerContext` (what a handler needs from it), so the import
graph points one way: ``wire`` <- ``endpoints`` <- ``server``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

from surgery.hub.server.common import (
    CHUNK,
    NAME_RE,
    TOKEN_HELP,
    WEB_PREFIX,
    ApiError,
    ClientGone,
    Limits,
    bad,
    log_safe,
    strip_signature,
)
from surgery.hub.server.schema import Check, validate
from surgery.hub.server.storage import Store
from surgery.hub.server.tokens import TokenStore

logger = logging.getLogger("surgery.hub.server")
DRAIN_LIMIT = 64 * 1024  # an unread body left after an answer is read away only when this small; else we close
_DIGITS = re.compile(r"[0-9]{1,20}")


class ServerContext(Protocol):
    """What a request handler uses of its server (implemented by ``server.HubHTTPServer``)."""

    store: Store
    tokens: TokenStore
    secret: bytes
    public_url: str | None
    limits: Limits
    connections: set[socket.socket]
    conn_guard: threading.Lock
    server_address: Any

    def watch_headers(self, sock: socket.socket) -> None: ...

    def headers_done(self, sock: socket.socket) -> None: ...


class Body:
    """Reads a request body (Content-Length or chunked) in bounded pieces, so uploads never sit in memory."""

    def __init__(self, rfile: Any, headers: Any):
        self.rfile = rfile
        self.eof, self._started = False, False
        lengths = {v.strip() for v in headers.get_all("Content-Length") or []}
        encodings = ",".join(headers.get_all("Transfer-Encoding") or []).lower()
        self.chunked = "chunked" in encodings
        if len(lengths) > 1:
            raise bad("Conflicting Content-Length headers")
        if lengths and self.chunked:
            raise bad("Content-Length and Transfer-Encoding: chunked together are ambiguous")
        if encodings and not self.chunked:
            raise bad(f"Unsupported Transfer-Encoding {encodings!r}")
        if self.chunked:
            self.left = 0
        else:
            value = lengths.pop() if lengths else "0"
            if not _DIGITS.fullmatch(value):
                raise bad("Invalid Content-Length")
            self.left = int(value)
        self.length = None if self.chunked else self.left
        self.unread_known = not self.chunked

    def _avail(self) -> int:
        if self.eof:
            return 0
        if not self.chunked:
            self.eof = self.left == 0
            return self.left
        if self.left == 0:
            if self._started and self.rfile.read(2) != b"\r\n":
                raise bad("Malformed chunked body")
            self._started = True
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise bad("Malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(8194) not in (b"\r\n", b"\n", b""):
                    pass
                self.eof = True
                return 0
            self.left = size
        return self.left

    def read(self, n: int = CHUNK) -> bytes:
        avail = self._avail()
        if not avail:
            return b""
        data = self.rfile.read(min(n, avail))
        if not data:
            raise ClientGone()
        self.left -= len(data)
        return data

    def readline(self, limit: int) -> bytes:
        parts, total = [], 0
        while total < limit:
            avail = self._avail()
            if not avail:
                break
            line = self.rfile.readline(min(limit - total, avail))
            if not line:
                raise ClientGone()
            self.left -= len(line)
            parts.append(line)
            total += len(line)
            if line.endswith(b"\n"):
                break
        return b"".join(parts)

    def read_all(self, limit: int) -> bytes:
        parts, total = [], 0
        while chunk := self.read():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"Request body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def drain(self, limit: int) -> bool:
        """Discard up to ``limit`` bytes; True if the body is now fully consumed (keep-alive can go on)."""
        total = 0
        with contextlib.suppress(ApiError, ClientGone, OSError):
            while total <= limit and (chunk := self.read()):
                total += len(chunk)
        return self.eof


class BaseHandler(BaseHTTPRequestHandler):
    """Per-request plumbing shared by all endpoints: parse the raw path, answer JSON or errors, check access.

    Subclasses implement ``_route(method, segments)``.
    """

    protocol_version = "HTTP/1.1"
    server_version = "surgery-hub/1"
    # TCP_NODELAY: a kept-alive answer written as headers then body otherwise waits ~40 ms for the client's delayed
    # ACK (Nagle). JSON answers are also sent in one write (see _start).
    disable_nagle_algorithm = True
    server: ServerContext  # type: ignore[assignment]
    raw_path: str
    query: dict[str, list[str]]

    # --- plumbing
    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout  # idle keep-alive and stalled bodies are cut off
        super().setup()
        with self.server.conn_guard:
            self.server.connections.add(self.connection)

    def handle_one_request(self) -> None:
        """Serve one request; from its first byte to the end of its headers it runs against ``header_timeout``."""
        try:
            if not self.rfile.peek(1):  # type: ignore[attr-defined]  # a BufferedReader: wait for the first byte
                self.close_connection = True
                return
        except OSError:  # idle timeout or reset between requests
            self.close_connection = True
            return
        self.server.watch_headers(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.headers_done(self.connection)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.headers_done(self.connection)  # the body runs against idle_timeout and the size limits
        return ok

    def finish(self) -> None:
        with self.server.conn_guard:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One access-log line: never the query string of a signed URL, never a raw control character."""
        target = strip_signature(getattr(self, "path", ""))
        logger.info(
            '%s "%s %s" %s %s',
            self.address_string(),
            log_safe(getattr(self, "command", "-")),
            log_safe(target),
            code,
            size,
        )

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.info("%s %s", self.address_string(), log_safe(strip_signature(format % args)))

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: refuse an oversized or ambiguous body, or an unknown token, before it is sent."""
        self._responded, self._user, self._body, self.raw_path = False, None, None, ""
        try:
            body = Body(self.rfile, self.headers)
            if body.length is not None and body.length > self.server.limits.max_body:
                raise ApiError(413, f"Request body larger than this hub accepts ({self.server.limits.max_body} bytes)")
            self._caller()
        except ApiError as err:
            self._error(err)  # no body object: the connection closes after the answer
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        self._responded, self._user = False, None
        self._body, self.raw_path = None, ""
        try:
            self._body = Body(self.rfile, self.headers)
            if self._body.length is not None and self._body.length > self.server.limits.max_body:
                raise ApiError(413, f"Request body larger than this hub accepts ({self.server.limits.max_body} bytes)")
            self._caller()  # the token first: an unknown token is a 401 whatever the path, so nothing is enumerable
            raw = self.path
            if raw.startswith(("http://", "https://")):
                raw = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
            raw_path, _, self.query_string = raw.partition("?")
            self.raw_path = raw_path
            self.query = urllib.parse.parse_qs(self.query_string, keep_blank_values=True)
            try:
                segs = [urllib.parse.unquote(s, errors="strict") for s in raw_path.split("/")[1:]]
            except UnicodeDecodeError:
                raise bad("Invalid percent-encoding in URL") from None
            self._route(self.command, segs)
        except ApiError as err:
            self._error(err)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            incident = uuid.uuid4().hex[:12]
            # The traceback is logged with every line escaped and indented: an exception message that carries
            # client text cannot start a line of its own.
            trace = "\n".join("    | " + log_safe(line) for line in traceback.format_exc().splitlines())
            logger.error(
                "Internal error %s on %s %s\n%s",
                incident,
                log_safe(self.command),
                log_safe(strip_signature(self.path)),
                trace,
            )
            # The exception text stays in the server log: an answer never shows internals.
            self._error(ApiError(500, f"Internal server error (incident {incident} in the server log)"))

    def _settle_body(self) -> None:
        """Before answering, consume a small unread body; a large or unknown one closes the connection instead.

        So a refused upload is answered at once (the body is never waited for) and keep-alive stays in sync.
        """
        body = self._body
        if body is None:
            self.close_connection = True
        elif not body.eof:
            small = body.unread_known and body.left <= DRAIN_LIMIT
            if not (small and body.drain(DRAIN_LIMIT)):
                self.close_connection = True

    def _start(
        self,
        status: int,
        headers: dict,
        length: int,
        ctype: str | None = "application/json",
        body: bytes | None = None,
    ) -> None:
        """Send status and headers, and ``body`` with them in one write (no Nagle/delayed-ACK stall)."""
        self._settle_body()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        if body and self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()
        self._responded = True

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self._start(status, headers or {}, len(data), body=data)

    def _error(self, err: ApiError) -> None:
        level = logging.WARNING if err.status >= 500 else logging.INFO
        logger.log(
            level,
            "%s %s -> %d %s",
            log_safe(self.command),
            log_safe(self.raw_path or strip_signature(self.path)),
            err.status,
            log_safe(err.message),
        )
        if self._responded:
            self.close_connection = True
            return
        safe = log_safe(err.message)[:1000]  # a header value: printable ASCII only
        headers = {"X-Error-Message": safe, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        with contextlib.suppress(OSError):
            self._json({"error": err.message, **err.extra}, err.status, headers)

    def _base(self) -> str:
        if self.server.public_url:
            return self.server.public_url
        host = self.headers.get("Host", "")
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host):
            h, p = self.server.server_address[:2]
            host = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        return f"http://{host}"

    def _read_body(self, limit: int) -> bytes:
        """The whole body, refused with 413 before reading when its announced length is over ``limit``."""
        if self._body.length is not None and self._body.length > limit:
            raise ApiError(413, f"Request body of {self._body.length} bytes is larger than the limit of {limit}")
        return self._body.read_all(limit)

    def _read_json(self, schema: Check) -> dict:
        """The JSON object of the body, checked against ``schema`` (400 naming the key) before any effect."""
        data = self._read_body(self.server.limits.max_json_body)
        if not data.strip():
            obj: Any = {}
        else:
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError):
                raise bad("Request body is not valid JSON") from None
        return validate(obj, schema)

    # --- auth
    def _caller(self) -> dict | None:
        """The token's record, None when anonymous; an unknown token is a 401 (as on the Hub)."""
        if self._user is None:
            auth = self.headers.get("authorization", "")
            if not auth:
                self._user = {}
            else:
                scheme, _, token = auth.partition(" ")
                rec = self.server.tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
                if rec is None:
                    raise ApiError(401, "Invalid credentials in Authorization header")
                self._user = rec
        return self._user or None

    def _can_read(self, ns: str, meta: dict) -> bool:
        caller = self._caller()
        return not meta["private"] or (caller is not None and caller["user"] == ns)

    def _require_write(self, ns: str, what: str) -> dict:
        caller = self._caller()
        if caller is None:
            if self.server.tokens.empty():
                raise ApiError(
                    401,
                    f"This hub has no tokens yet, so {what} is refused: {TOKEN_HELP}, "
                    "then pass it as HF_TOKEN or token=",
                )
            raise ApiError(401, f"Authentication required for {what}: pass a write token as HF_TOKEN or token=")
        if caller["role"] != "write":
            raise ApiError(403, f"Token of {caller['user']!r} is read-only: {what} needs a token with role 'write'")
        if caller["user"] != ns:
            raise ApiError(403, f"User {caller['user']!r} cannot write to namespace {ns!r} ({what})")
        return caller

    def _repo(self, kind: str, ns: str, name: str, write: str | None = None) -> tuple[Path, dict]:
        """Find a repo the caller may read (404 RepoNotFound otherwise); with ``write``, also check write access."""
        for part in (ns, name):
            if not NAME_RE.fullmatch(part) or ".." in part:
                raise ApiError(404, f"Repository not found: invalid repo id {ns}/{name}", "RepoNotFound")
        rdir = self.server.store.repo_dir(kind, ns, name)
        meta = self.server.store.meta(rdir)
        if meta is None or not self._can_read(ns, meta):
            raise ApiError(
                404, f"Repository {ns}/{name} not found. If it is private, pass a token of its owner.", "RepoNotFound"
            )
        if write:
            self._require_write(ns, write)
        return rdir, meta

    def _resolve(self, rdir: Path, rev: str) -> tuple[str, dict]:
        sha = self.server.store.resolve(rdir, rev)
        commit = self.server.store.commit(rdir, sha) if sha else None
        if commit is None:
            raise ApiError(404, f"Revision not found: {rev!r}", "RevisionNotFound")
        return sha, commit

    def _repo_url(self, kind: str, ns: str, name: str) -> str:
        return f"{self._base()}/{WEB_PREFIX[kind]}{ns}/{name}"

    def _route(self, method: str, segs: list[str]) -> None:
        raise NotImplementedError
