"""Helpers shared by the hub tests: the real client for a test user, and one raw HTTP request."""

from __future__ import annotations

import http.client
import urllib.parse

from huggingface_hub import HfApi


def client(hub, who: str | None = "alice") -> HfApi:
    """The real ``huggingface_hub`` client as ``who`` (None: anonymous) on the test server ``hub``."""
    return HfApi(endpoint=hub.url, token=hub.tokens[who] if who else False)


def raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """Send one request exactly as given (no path normalisation), return status, lower-cased headers and body."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
