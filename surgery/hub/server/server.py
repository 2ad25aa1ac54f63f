"""Server lifecycle: the threaded HTTP server, :class:`HubServer` for tests and embedding, :func:`serve`."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from surgery.errors import HubError
from surgery.hub.server.common import Limits, mkdir_private, open_lock, open_private
from surgery.hub.server.endpoints import Handler
from surgery.hub.server.gc import collect
from surgery.hub.server.storage import Store
from surgery.hub.server.tokens import TokenStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("surgery.hub.server")
_BUSY = b'{"error": "Too many connections to this hub: retry shortly"}'


def lock_root(root: Path) -> Any:
    """Take the root's lock (one server, or one ``gc``, per root); returns the open lock file to keep."""
    try:
        mkdir_private(root / "repos")
        lock_file = open_lock(root / ".lock")  # held for the server's lifetime
    except OSError as err:
        raise HubError(f"Cannot use hub root {root}: {err}") from err
    if fcntl is not None:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise HubError(f"Another hub server is already serving {root} (or `surgery hub gc` runs on it)") from None
    return lock_file


class HubHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server holding the store, the token store and the URL-signing secret for its handlers."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self, addr: tuple, store: Store, tokens: TokenStore, secret: bytes, public_url: str | None, limits: Limits
    ):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.store, self.tokens, self.secret, self.public_url = store, tokens, secret, public_url
        self.limits = limits
        self.connections: set[socket.socket] = set()
        self.conn_guard = threading.Lock()
        self.active = 0
        self.header_deadlines: dict[socket.socket, float] = {}  # connections reading a request line and headers
        self._closed = threading.Event()
        super().__init__(addr, Handler)
        threading.Thread(target=self._cut_slow_headers, name="hub-header-deadlines", daemon=True).start()

    def watch_headers(self, sock: socket.socket) -> None:
        """A request started on ``sock``: its request line and headers must be complete within header_timeout."""
        with self.conn_guard:
            self.header_deadlines[sock] = time.monotonic() + self.limits.header_timeout

    def headers_done(self, sock: socket.socket) -> None:
        with self.conn_guard:
            self.header_deadlines.pop(sock, None)

    def _cut_slow_headers(self) -> None:
        """Shut connections whose headers are overdue (socket timeouts alone reset on every byte received)."""
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self.conn_guard:
                overdue = [s for s, deadline in self.header_deadlines.items() if deadline < now]
                for sock in overdue:
                    del self.header_deadlines[sock]
            for sock in overdue:
                logger.info("closing a connection whose request headers took over %gs", self.limits.header_timeout)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread, or answer 503 at once when ``max_connections`` are already open."""
        with self.conn_guard:
            busy = self.active >= self.limits.max_connections
            if not busy:
                self.active += 1
        if not busy:
            try:
                return super().process_request(request, client_address)
            except BaseException:
                with self.conn_guard:
                    self.active -= 1
                raise
        with contextlib.suppress(OSError):
            request.settimeout(1)
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
            )
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.conn_guard:
                self.active -= 1

    def close_connections(self) -> None:
        with self.conn_guard:
            for sock in list(self.connections):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class HubServer:
    """The hub over ``root``; ``with HubServer(root) as hub:`` serves in a background thread at ``hub.url``.

    ``port=0`` picks a free port. Only one server may serve a root at a time (a file lock enforces it), because
    starting clears ``root/tmp`` of partial uploads left by a crash.
    """

    def __init__(
        self,
        root: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        public_url: str | None = None,
        fsync: bool = True,
        limits: Limits | None = None,
    ):
        self.root, self.host, self.port = Path(root), host, port
        self.public_url = public_url.rstrip("/") if public_url else None
        self.fsync = fsync
        self.limits = limits or Limits()
        self._httpd: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock_file: Any = None

    @property
    def url(self) -> str:
        """Base URL for HF_ENDPOINT (the public URL if one was given)."""
        if self.public_url:
            return self.public_url
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def _prepare(self) -> HubHTTPServer:
        root = self.root
        self._lock_file = lock_root(root)
        shutil.rmtree(root / "tmp", ignore_errors=True)
        mkdir_private(root / "tmp")
        secret_path = root / ".secret"
        if not secret_path.exists():
            tmp = root / f".secret.{uuid.uuid4().hex}"
            with open_private(tmp) as f:
                f.write(secrets.token_bytes(32))
            os.replace(tmp, secret_path)
        try:
            collect(root)  # objects left by aborted commits; safe now: nothing else writes under this lock
        except OSError as err:
            logger.warning("gc at start-up failed (serving anyway): %s", err)
        store = Store(root, fsync=self.fsync)
        try:
            httpd = HubHTTPServer(
                (self.host, self.port), store, TokenStore(root), secret_path.read_bytes(), self.public_url, self.limits
            )
        except OSError as err:
            self._release()
            raise HubError(f"Cannot listen on {self.host}:{self.port}: {err}") from err
        self.port = httpd.server_address[1]
        return httpd

    def _release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def start(self) -> HubServer:
        """Bind and serve in a daemon thread; returns self."""
        self._httpd = self._prepare()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"hub-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and release the root."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._release()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted; prints the URL on stdout once listening."""
        self._httpd = self._prepare()
        print(self.url, flush=True)
        print(
            f"hub: serving {self.root} -- clients need HF_ENDPOINT={self.url} HF_HUB_DISABLE_XET=1",
            file=sys.stderr,
            flush=True,
        )
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()
            self._httpd = None
            self._release()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    root: Path | str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    public_url: str | None = None,
    limits: Limits | None = None,
) -> None:
    """Serve ``root`` in the foreground until Ctrl-C or SIGTERM, printing the URL once listening."""

    def _term(*_: object) -> None:
        raise KeyboardInterrupt

    previous = None
    with contextlib.suppress(ValueError):  # not in the main thread: leave SIGTERM alone
        previous = signal.signal(signal.SIGTERM, _term)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            HubServer(root, host, port, public_url=public_url, limits=limits).serve_forever()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def spawn(
    root: Path | str, *, port: int = 0, quiet: bool = True, stderr: Any = None, timeout: float = 60
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m surgery.hub.server`` in a child process; returns it and its URL once it is listening.

    For jobs that need the hub in another process than their own (the demo, benchmarks, crash tests): the caller
    stops it with ``proc.terminate()``.
    """
    argv = [sys.executable, "-m", "surgery.hub.server", "--root", str(root), "--port", str(port)]
    proc = subprocess.Popen([*argv, "--quiet"] if quiet else argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    url = proc.stdout.readline().strip() if ready and proc.stdout else ""
    if not url.startswith("http"):
        proc.kill()
        raise HubError(f"the hub server for {root} did not start; run `surgery hub serve --root {root}` to see why")
    return proc, url
