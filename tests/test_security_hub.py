"""Trust in the hub server (issue 8, "Hub server"), attacked with raw HTTP and used with the real client.

Every test here failed against the server before the trust fixes: enumerable private repos, 500s with exception
text for wrong JSON types, ``bool("false")`` settings, a 40 ms stall per kept-alive answer, unbounded uploads,
forgeable access-log lines and signed URLs in it, no garbage collection, world-readable private data, no model-card
metadata and no ``/api/models``; and the redesign's promises (no torch import, a fast start, a prompt stop, a
one-way import graph).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import http.client
import json
import logging
import os
import random
import select
import signal
import socket
import stat
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
from hubtools import client, raw
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from surgery.hub.server import HubServer, add_token, list_tokens, main
from surgery.hub.server.card import parse_front_matter
from surgery.hub.server.common import Limits
from surgery.hub.server.storage import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_DIR = REPO_ROOT / "surgery" / "hub" / "server"


@pytest.fixture(scope="module")
def hub(hub_server):
    """The shared hub with a public and a private repo of alice's."""
    api = HfApi(endpoint=hub_server.url, token=hub_server.tokens["alice"])
    api.create_repo("alice/public")
    api.create_repo("alice/private", private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id="alice/private")
    return hub_server


def auth(hub, who: str = "alice") -> dict:
    return {"authorization": f"Bearer {hub.tokens[who]}"}


def send_raw(url: str, head: str, body: bytes = b"", wait: float = 5) -> tuple[bytes, float]:
    """Send raw bytes on a fresh socket; return what the server answered within ``wait`` s and how long it took."""
    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=wait)
    try:
        start = time.monotonic()
        sock.sendall(head.replace("\n", "\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, time.monotonic() - start
    finally:
        sock.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Token first


def test_an_unknown_token_is_401_whether_or_not_the_repo_exists(hub):
    bogus = {"authorization": "Bearer hf_bogus"}
    paths = (
        ("GET", "/api/models/alice/private"),
        ("GET", "/api/models/alice/missing"),
        ("GET", "/api/models/alice/public"),
        ("HEAD", "/alice/private/resolve/main/s.txt"),
        ("HEAD", "/alice/missing/resolve/main/s.txt"),
        ("GET", "/api/models/alice/private/refs"),
        ("GET", "/api/models/alice/missing/refs"),
        ("POST", "/alice/private.git/info/lfs/objects/batch"),
        ("POST", "/alice/missing.git/info/lfs/objects/batch"),
        ("GET", "/no/such/route"),
    )
    for method, path in paths:
        status, _, _ = raw(hub.url, method, path, headers=bogus)
        assert status == 401, (method, path)
    statuses = []
    for repo in ("alice/private", "alice/missing", "alice/public"):
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=hub.url, token="hf_bogus").model_info(repo)
        statuses.append(err.value.response.status_code)
    assert statuses == [401, 401, 401]
    # Without a token, a private repo and a missing one answer exactly alike.
    answers = [raw(hub.url, "GET", f"/api/models/alice/{r}") for r in ("private", "missing")]
    assert [a[0] for a in answers] == [404, 404] and all(a[1]["x-error-code"] == "RepoNotFound" for a in answers)
    with pytest.raises(RepositoryNotFoundError):
        client(hub, "bob").model_info("alice/private")


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_wrong_json_types_are_a_400_naming_the_key_never_a_500(hub):
    lfs = {**auth(hub), "Content-Type": "application/vnd.git-lfs+json"}
    nd = {**auth(hub), "Content-Type": "application/x-ndjson"}
    header = {"key": "header", "value": {"summary": "x"}}

    def lines(*items: object) -> bytes:
        return b"".join(json.dumps(i).encode() + b"\n" for i in items)

    cases = [
        ("POST", "/api/repos/create", {"name": "a", "type": ["x"]}, {}, "type"),  # no token at all
        ("POST", "/api/repos/create", {"name": "a", "type": ["x"]}, auth(hub), "type"),
        ("POST", "/api/repos/create", {"name": ["a"], "organization": "alice"}, auth(hub), "name"),
        ("POST", "/api/repos/create", {"name": "z", "organization": "alice", "private": "false"}, auth(hub), "private"),
        ("POST", "/api/repos/create", [1, 2], auth(hub), "body"),
        ("DELETE", "/api/repos/delete", {"name": 5, "organization": "alice"}, auth(hub), "name"),
        (
            "POST",
            "/alice/public.git/info/lfs/objects/batch",
            {"operation": "upload", "transfers": 5, "objects": []},
            lfs,
            "transfers",
        ),
        ("POST", "/alice/public.git/info/lfs/objects/batch", {"operation": "upload", "objects": 5}, lfs, "objects"),
        (
            "POST",
            "/alice/public.git/info/lfs/objects/batch",
            {"operation": "upload", "objects": [{"oid": 1, "size": 1}]},
            lfs,
            "oid",
        ),
        ("POST", "/api/models/alice/public/preupload/main", {"files": 5}, auth(hub), "files"),
        ("POST", "/api/models/alice/public/preupload/main", {"files": [{"path": "a", "size": "9"}]}, auth(hub), "size"),
        ("POST", "/api/models/alice/public/branch/dev", {"startingPoint": 5}, auth(hub), "startingPoint"),
        ("POST", "/api/models/alice/public/tag/main", {"tag": {"a": 1}}, auth(hub), "tag"),
        (
            "POST",
            "/api/models/alice/public/paths-info/main",
            {"paths": 5},
            {**auth(hub), "Content-Type": "json"},
            "paths",
        ),
        ("POST", "/api/validate-yaml", {"content": 5}, {}, "content"),
        ("POST", "/lfs-verify/model/alice/public", {"oid": 5, "size": 1}, auth(hub), "oid"),
        ("PUT", "/api/models/alice/public/settings", {"private": "false"}, auth(hub), "private"),
        ("POST", "/api/models/alice/public/commit/main", lines(["header"]), nd, "body"),
        ("POST", "/api/models/alice/public/commit/main", lines({"key": "header", "value": [1]}), nd, "value"),
        (
            "POST",
            "/api/models/alice/public/commit/main",
            lines(header, {"key": "file", "value": {"path": 5, "content": ""}}),
            nd,
            "path",
        ),
        (
            "POST",
            "/api/models/alice/public/commit/main",
            lines(header, {"key": "lfsFile", "value": {"path": "a"}}),
            nd,
            "oid",
        ),
        (
            "POST",
            "/api/models/alice/public/commit/main",
            lines({"key": "header", "value": {"summary": 7}}),
            nd,
            "summary",
        ),
        ("POST", "/api/models/alice/public/commit/main", lines(header, {"key": "nope", "value": {}}), nd, "key"),
    ]
    for method, path, body, headers, key in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, answer = raw(hub.url, method, path, data, headers)
        assert status == 400, (path, body, status, answer)
        message = json.loads(answer)["error"]
        assert key in message and "Traceback" not in message and "Error:" not in message, message
    deep = b"[" * 100_000 + b"]" * 100_000  # the json module's recursion limit must not turn into a 500
    assert raw(hub.url, "POST", "/api/repos/create", deep, auth(hub))[0] == 400
    assert not client(hub).repo_exists("alice/z") and not client(hub).repo_exists("alice/a")
    assert client(hub).list_repo_refs("alice/public").branches[0].name == "main"  # no branch "dev" was made


def test_a_500_shows_no_exception_text(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="surgery.hub.server")
    token = add_token(tmp_path, "alice", "write")
    with HubServer(tmp_path) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/x")

        def crash(*args, **kwargs):
            raise OSError(f"disk full at {tmp_path}/very/secret/place\n2026-01-01 FORGED")

        monkeypatch.setattr(Store, "write_refs", crash)
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/x")
        assert err.value.response.status_code == 500
        text = err.value.response.text + str(err.value.response.headers)
        assert "secret/place" not in text and "OSError" not in text and "incident" in text
    logged = [r.getMessage() for r in caplog.records if "Internal error" in r.getMessage()]
    assert logged and "secret/place" in logged[0]  # the details are in the server's log...
    assert all(line.startswith("    | ") for m in logged for line in m.splitlines()[1:])  # ...and cannot forge lines


def test_settings_are_validated_before_anything_is_written(hub):
    api, anon = client(hub), client(hub, None)
    api.create_repo("alice/settings")
    put = "/api/models/alice/settings/settings"
    for body in (
        {"private": "false"},  # bool("false") is True: this made the repo private
        {"private": True, "gated": "auto"},  # a 400 on a later key came after the first was written
        {"visibility": "private", "unknown": 1},
        {"visibility": "secret"},
        {"visibility": "private", "private": False},
    ):
        status, _, answer = raw(hub.url, "PUT", put, json.dumps(body).encode(), auth(hub))
        assert status == 400, (body, answer)
        assert anon.model_info("alice/settings").private is False, body
    api.update_repo_settings("alice/settings", private=True)
    assert api.model_info("alice/settings").private is True
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info("alice/settings")
    status, _, _ = raw(hub.url, "PUT", put, json.dumps({"private": False}).encode(), auth(hub))
    assert status == 200 and anon.model_info("alice/settings").private is False


# ---------------------------------------------------------------------------------------------------------------
# Latency and limits


def test_kept_alive_json_answers_do_not_stall(hub):
    """Headers and body went out in two writes: Nagle against delayed ACK cost ~40 ms per kept-alive answer."""
    api = client(hub)
    api.model_info("alice/public")  # warm up the session (one kept-alive connection)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        api.model_info("alice/public")
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.015, times
    u = urllib.parse.urlsplit(hub.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        times = []
        for _ in range(20):
            t = time.perf_counter()
            conn.request("GET", "/api/models/alice/public")
            assert conn.getresponse().read()
            times.append(time.perf_counter() - t)
    finally:
        conn.close()
    assert statistics.median(times) < 0.015, times


def test_lfs_batch_refuses_objects_over_the_limit(hub, tmp_path):
    assert Limits().max_lfs_size == 50 * 1000**3  # the Hub's 50 GB
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": "a" * 64, "size": 10**15}]}
    headers = {**auth(hub), "Content-Type": "application/vnd.git-lfs+json"}
    status, _, body = raw(
        hub.url, "POST", "/alice/public.git/info/lfs/objects/batch", json.dumps(batch).encode(), headers
    )
    obj = json.loads(body)["objects"][0]
    assert status == 200 and "actions" not in obj and obj["error"]["code"] == 422 and "limit" in obj["error"]["message"]

    root = tmp_path / "small"
    token = add_token(root, "alice", "write")
    with HubServer(root, limits=Limits(max_lfs_size=1000)) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/small")
        api.upload_file(path_or_fileobj=os.urandom(1000), path_in_repo="ok.bin", repo_id="alice/small")
        with pytest.raises((ValueError, HfHubHTTPError), match="limit"):
            api.upload_file(path_or_fileobj=os.urandom(1001), path_in_repo="big.bin", repo_id="alice/small")
        assert api.list_repo_files("alice/small") == [".gitattributes", "ok.bin"]


def test_oversized_and_ambiguous_bodies_are_refused_at_once(hub):
    host = urllib.parse.urlsplit(hub.url).netloc
    token = hub.tokens["alice"]
    # A declared body over every limit: answered 413 without waiting for (or reading) a single byte of it.
    for path in ("/api/repos/create", "/api/models/alice/public/commit/main", "/lfs-upload/model/alice/public/x"):
        answer, took = send_raw(
            hub.url, f"POST {path} HTTP/1.1\nHost: {host}\nauthorization: Bearer {token}\nContent-Length: {10**15}\n\n"
        )
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])
        assert took < 1.0
    # With Expect: 100-continue (curl's way for big uploads) the refusal comes instead of the "100 Continue".
    answer, took = send_raw(
        hub.url,
        f"PUT /lfs-upload/model/alice/public/x HTTP/1.1\nHost: {host}\nExpect: 100-continue\n"
        f"Content-Length: {10**15}\n\n",
    )
    assert answer.startswith(b"HTTP/1.1 413") and took < 1.0
    # A JSON body over the JSON limit (16 MiB) but under the others: also refused before it is sent.
    answer, took = send_raw(
        hub.url,
        f"POST /api/repos/create HTTP/1.1\nHost: {host}\nauthorization: Bearer {token}\n"
        f"Content-Length: {64 * 1024 * 1024}\n\n",
    )
    assert answer.startswith(b"HTTP/1.1 413") and took < 1.0
    # Request smuggling shapes: two different lengths, or a length and chunked together.
    body = b'{"name": "smuggled", "organization": "alice"}'
    for extra in (
        f"Content-Length: {len(body)}\nContent-Length: 3\n",
        f"Content-Length: {len(body)}\nTransfer-Encoding: chunked\n",
        "Content-Length: +45\n",
    ):
        answer, _ = send_raw(
            hub.url, f"POST /api/repos/create HTTP/1.1\nHost: {host}\nauthorization: Bearer {token}\n{extra}\n", body
        )
        assert answer.startswith(b"HTTP/1.1 400"), (extra, answer[:200])
    assert not client(hub).repo_exists("alice/smuggled")


def test_connections_are_capped_and_idle_ones_closed(tmp_path):
    with HubServer(tmp_path, limits=Limits(max_connections=3, idle_timeout=1.0)) as server:
        u = urllib.parse.urlsplit(server.url)
        idle = [socket.create_connection((u.hostname, u.port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)  # let the server accept them
            answer, took = send_raw(server.url, f"GET /api/agent-harnesses HTTP/1.1\nHost: {u.netloc}\n\n")
            assert answer.startswith(b"HTTP/1.1 503") and took < 1.0
            start = time.monotonic()
            for sock in idle:  # silent connections are closed after the idle timeout
                assert sock.recv(1024) == b""
            assert time.monotonic() - start < 3
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        status, _, _ = raw(server.url, "GET", "/api/agent-harnesses")
        assert status == 200


def test_headers_trickled_a_byte_at_a_time_are_cut_off(tmp_path):
    """Never silent for idle_timeout, yet never done: the header deadline closes the connection."""
    with HubServer(tmp_path, limits=Limits(idle_timeout=5.0, header_timeout=1.0)) as server:
        u = urllib.parse.urlsplit(server.url)
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        start = time.monotonic()
        closed = False
        try:
            sock.sendall(b"GET /api/agent-harnesses HTTP/1.1\r\nHost: x\r\n")
            for _ in range(40):  # 0.2 s between bytes: far below the idle timeout
                time.sleep(0.2)
                sock.sendall(b"X")
        except OSError:
            closed = True
        finally:
            took = time.monotonic() - start
            if not closed:
                closed = sock.recv(1024) == b""
            sock.close()
        assert closed and took < 4, f"the trickling client was served for {took:.1f}s"
        status, _, _ = raw(server.url, "GET", "/api/agent-harnesses")  # others are served as before
        assert status == 200


# ---------------------------------------------------------------------------------------------------------------
# Access log


def test_access_log_escapes_control_characters_and_hides_signed_urls(hub, caplog):
    caplog.set_level(logging.INFO, logger="surgery.hub.server")
    caplog.clear()
    forged = "/api/models/al%0a2026-01-01%20FORGED%20GET%20200/x%1b%5b31m"
    raw(hub.url, "GET", forged)
    raw(hub.url, "GET", "/alice%0d%0aFORGED/x/resolve/main/f")
    raw(hub.url, "GET", "/api/models/alice/public/tree/main/a%0ab")
    data = os.urandom(2048)
    client(hub).upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id="alice/public")  # LFS: batch + PUT
    messages = [r.getMessage() for r in caplog.records]
    assert any("lfs-upload" in m for m in messages)
    assert any("FORGED" in m for m in messages)
    for m in messages:
        assert not any(ch in m for ch in "\n\r\x1b"), m
        assert "sig=" not in m and "exp=" not in m, m


# ---------------------------------------------------------------------------------------------------------------
# Garbage collection and permissions


def _objects(rdir: Path) -> set[str]:
    return {
        str(p.relative_to(rdir)) for sub in ("commits", "blobs", "lfs") for p in (rdir / sub).rglob("*") if p.is_file()
    }


def test_gc_removes_what_aborted_commits_left_and_keeps_all_history(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    token = add_token(root, "alice", "write")
    rdir = root / "repos" / "model" / "alice" / "gc"
    with HubServer(root) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/gc")
        old_weights = os.urandom(3000)
        first = api.upload_file(path_or_fileobj=old_weights, path_in_repo="w.bin", repo_id="alice/gc").oid
        api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/gc")
        api.create_tag("alice/gc", tag="v1")
        api.upload_file(path_or_fileobj=os.urandom(3000), path_in_repo="w.bin", repo_id="alice/gc")  # replaces w.bin
        api.create_branch("alice/gc", branch="dev")
        dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="d.txt", repo_id="alice/gc", revision="dev").oid
        kept = _objects(rdir)

        def crash(*args, **kwargs):
            raise OSError("simulated crash before the ref update")

        monkeypatch.setattr(Store, "write_refs", crash)  # an aborted commit: its objects stay, unreferenced
        with pytest.raises(HfHubHTTPError):
            api.upload_file(path_or_fileobj=b"orphan", path_in_repo="o.txt", repo_id="alice/gc")
        with pytest.raises(HfHubHTTPError):
            api.upload_file(path_or_fileobj=os.urandom(2500), path_in_repo="o.bin", repo_id="alice/gc")
        monkeypatch.undo()
        orphans = _objects(rdir) - kept
        assert len(orphans) == 4  # two commit objects, one blob, one LFS object
        assert main(["gc", "--root", str(root)]) == 2  # not while a server writes to the root
        assert "already serving" in capsys.readouterr().err

    assert main(["gc", "--root", str(root)]) == 0
    assert "removed 2 commits, 1 blobs and 1 LFS objects" in capsys.readouterr().out
    assert _objects(rdir) == kept

    # At start-up too, and never anything reachable: every commit of every branch and tag still downloads.
    with HubServer(root) as server:
        api = HfApi(endpoint=server.url, token=token)
        monkeypatch.setattr(Store, "write_refs", crash)
        with pytest.raises(HfHubHTTPError):
            api.upload_file(path_or_fileobj=b"orphan 2", path_in_repo="o.txt", repo_id="alice/gc")
        monkeypatch.undo()
    assert len(_objects(rdir) - kept) == 2
    with HubServer(root) as server:
        assert _objects(rdir) == kept
        kw = {"endpoint": server.url, "token": False, "cache_dir": tmp_path / "cache"}
        assert Path(hf_hub_download("alice/gc", "w.bin", revision=first, **kw)).read_bytes() == old_weights
        assert Path(hf_hub_download("alice/gc", "a.txt", revision="v1", **kw)).read_text() == "v1"
        assert Path(hf_hub_download("alice/gc", "d.txt", revision=dev, **kw)).read_text() == "dev"
        assert len(HfApi(endpoint=server.url).list_repo_commits("alice/gc")) == 4
    assert main(["gc", "--root", str(tmp_path / "nothing-here")]) == 2


def test_repo_data_is_readable_by_the_server_only(tmp_path):
    root = tmp_path / "root"
    token = add_token(root, "alice", "write")
    with HubServer(root) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/private", private=True)
        api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id="alice/private")
        api.upload_file(path_or_fileobj=os.urandom(2048), path_in_repo="s.bin", repo_id="alice/private")

    def modes() -> dict[str, int]:
        out = {".": stat.S_IMODE(root.stat().st_mode)}
        for p in root.rglob("*"):
            out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
        return out

    found = modes()
    assert any(k.startswith("repos/model/alice/private/lfs/") for k in found)
    for path, mode in found.items():
        expected = 0o700 if (root / path).is_dir() else 0o600
        assert mode == expected, (path, oct(mode))
    # A root made by an older server (0755/0644) is tightened at start-up.
    rdir = root / "repos" / "model" / "alice" / "private"
    os.chmod(rdir, 0o755)
    os.chmod(next(p for p in (rdir / "blobs").rglob("*") if p.is_file()), 0o644)
    with HubServer(root):
        pass
    assert all(mode == (0o700 if (root / p).is_dir() else 0o600) for p, mode in modes().items())


# ---------------------------------------------------------------------------------------------------------------
# Model card and listing


CARD = b"""---
license: apache-2.0
library_name: timm
tags:
- image-classification
- surgery
base_model:
  name: resnet18
model-index:
- name: x
  results:
  - task: {type: image-classification}
---
# A model
"""


def test_model_info_reports_the_cards_metadata_and_survives_bad_cards(hub):
    api = client(hub)
    api.create_repo("alice/carded")
    api.upload_file(path_or_fileobj=CARD, path_in_repo="README.md", repo_id="alice/carded")
    info = api.model_info("alice/carded")
    assert info.library_name == "timm"
    assert {"image-classification", "surgery", "timm", "license:apache-2.0"} <= set(info.tags)
    assert info.card_data.license == "apache-2.0" and info.card_data.tags == ["image-classification", "surgery"]
    assert info.card_data["base_model"] == {"name": "resnet18"}
    for i, bad in enumerate(
        (
            b"---\nlicense: [unclosed\n---\n",
            b"---\n" + b"a:\n  " * 5000 + b"---\n",
            "\ufeff---\nlibrary_name: 'open\n\tx: \x00\n---\n".encode(),
            b"---\n- x\n",
        )
    ):
        api.upload_file(path_or_fileobj=bad, path_in_repo="README.md", repo_id="alice/carded", commit_message=str(i))
        info = api.model_info("alice/carded")
        assert info.sha and not info.library_name


def test_the_card_parser_reads_the_simple_subset_and_never_raises():
    text = (
        "---\nlicense: mit # a comment\nlibrary_name: 'timm'\nnum: 3\nratio: 0.5\nflag: true\nnone: null\n"
        "tags: [a, 'b c']\ndatasets:\n  - x\n  - y\nbase_model:\n  name: resnet18\n  deep:\n    no: 1\n"
        "text: |\n  block\nanchor: &a 1\n---\nbody\n"
    )
    assert parse_front_matter(text) == {
        "license": "mit",
        "library_name": "timm",
        "num": 3,
        "ratio": 0.5,
        "flag": True,
        "none": None,
        "tags": ["a", "b c"],
        "datasets": ["x", "y"],
        "base_model": {"name": "resnet18"},
    }
    rng = random.Random(0)
    alphabet = "-:#'\"[]{}|>&*!\n\t ab12.\x00\ufeff"
    for _ in range(2000):
        junk = "---\n" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(200))) + "\n---\n"
        card = parse_front_matter(junk)
        assert isinstance(card, dict)
        assert json.loads(json.dumps(card)) == card  # plain JSON values only


def test_list_models_with_search_author_filter_and_limit(hub):
    alice, bob, anon = client(hub), client(hub, "bob"), client(hub, None)
    alice.create_repo("alice/listed-cat")
    alice.upload_file(path_or_fileobj=CARD, path_in_repo="README.md", repo_id="alice/listed-cat")
    alice.create_repo("alice/listed-dog")
    alice.create_repo("alice/listed-hidden", private=True)
    bob.create_repo("bob/listed-cat")
    bob.create_repo("bob/listed-secret", private=True)

    def ids(api: HfApi, **kw) -> list[str]:
        return [m.id for m in api.list_models(**kw)]

    assert ids(anon, search="listed") == ["alice/listed-cat", "alice/listed-dog", "bob/listed-cat"]
    assert ids(alice, search="listed") == [
        "alice/listed-cat",
        "alice/listed-dog",
        "alice/listed-hidden",
        "bob/listed-cat",
    ]
    assert ids(bob, search="LISTED", author="bob") == ["bob/listed-cat", "bob/listed-secret"]
    assert ids(anon, search="cat", author="alice") == ["alice/listed-cat"]
    assert ids(anon, filter="surgery", search="listed") == ["alice/listed-cat"]
    assert len(ids(anon, search="listed", limit=2)) == 2
    cat = next(iter(anon.list_models(search="listed-cat", author="alice")))
    assert cat.library_name == "timm" and "surgery" in cat.tags
    assert raw(hub.url, "GET", "/api/models?limit=zero")[0] == 400


# ---------------------------------------------------------------------------------------------------------------
# The server process: no torch, fast start, small, prompt stop; one-way imports; the CLI


def test_the_server_imports_no_torch_timm_or_huggingface_hub():
    code = (
        "import sys, surgery.hub.server, surgery.hub.server.cli, surgery.hub.server.server\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'huggingface_hub', 'numpy',"
        " 'pydantic', 'yaml', 'safetensors', 'accelerate'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _vmrss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("how", ["python -m surgery.hub.server", "surgery hub serve"])
def test_serve_answers_within_1_5_s_stays_small_and_stops_promptly(tmp_path, how, sig):
    script = Path(sys.executable).parent / "surgery"
    argv = {
        "python -m surgery.hub.server": [sys.executable, "-m", "surgery.hub.server"],
        "surgery hub serve": [str(script), "hub", "serve"]
        if script.exists()
        else [sys.executable, "-m", "surgery", "hub", "serve"],
    }[how]
    token = add_token(tmp_path, "alice", "write")
    start = time.monotonic()
    proc = subprocess.Popen([*argv, "--root", str(tmp_path), "--quiet"], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        url = proc.stdout.readline().strip() if ready else ""
        assert url.startswith("http://"), url
        status, _, body = raw(url, "GET", "/api/whoami-v2", headers={"authorization": f"Bearer {token}"})
        first = time.monotonic() - start
        assert status == 200 and json.loads(body)["name"] == "alice"
        assert first < 1.5, f"first answer {first:.2f} s after start"
        api = HfApi(endpoint=url, token=token)
        api.create_repo("alice/rss")
        api.upload_file(path_or_fileobj=os.urandom(12 * 1024 * 1024), path_in_repo="big.bin", repo_id="alice/rss")
        assert _vmrss_mb(proc.pid) < 150
        t = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_server_modules_import_one_way():
    """No import cycle inside surgery.hub.server (wire -> server -> endpoints -> wire was one)."""
    graph: dict[str, set[str]] = {}
    for path in SERVER_DIR.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("surgery.hub.server."):
                deps.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("surgery.hub.server.")}
        graph[path.stem] = deps
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(mod: str, trail: tuple[str, ...]) -> None:
        assert state.get(mod) != 1, f"import cycle: {' -> '.join((*trail, mod))}"
        if state.get(mod) == 2:
            return
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            visit(dep, (*trail, mod))
        state[mod] = 2
        order.append(mod)

    for mod in sorted(graph):
        visit(mod, ())
    assert order.index("common") < order.index("wire") < order.index("endpoints") < order.index("server")
    assert order.index("server") < order.index("cli")


def test_hub_help_lists_its_commands_and_tokens_default_to_read(tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "hub", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("serve", "token", "gc")), proc.stdout
    with pytest.raises(SystemExit):
        main(["token", "add", "--help"], prog="surgery hub")
    assert "default: read" in " ".join(capsys.readouterr().out.split())
    assert main(["token", "add", "carol", "--root", str(tmp_path)]) == 0
    assert add_token(tmp_path, "dave")
    assert {t["user"]: t["role"] for t in list_tokens(tmp_path)} == {"carol": "read", "dave": "read"}
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--max-lfs-size", "--max-connections", "--idle-timeout", "--max-commit-size"))


def test_hub_server_fixture_is_shared(hub_server):
    """tests/conftest.py serves one hub per module with alice (write), alice_ro (read) and bob (write)."""
    assert isinstance(hub_server, SimpleNamespace)
    me = HfApi(endpoint=hub_server.url).whoami(token=hub_server.tokens["alice_ro"])
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "read"
    assert base64.b64encode(b"") == b""
