"""The self-hosted hub, driven by the real ``huggingface_hub`` client (never mocked) and by timm's ``hf-hub:`` loader.

Raw ``http.client`` requests are used only where the client itself refuses to send something (path traversal,
half-sent bodies before a crash).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from hubtools import client, raw
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from surgery.errors import HubError
from surgery.hub.server import HubServer, add_token, list_tokens, main, revoke_token
from surgery.hub.server.storage import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
BIG = 11 * 1024 * 1024  # above the 10 MiB threshold: must travel through LFS


@pytest.fixture(scope="module")
def hub(hub_server):
    """The shared server of tests/conftest.py: tokens alice (write), alice_ro (read-only) and bob (write)."""
    return hub_server


def ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Repos, uploads, downloads


def test_whoami_and_tokens_are_stored_hashed(hub):
    me = client(hub).whoami()
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert client(hub, "alice_ro").whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).whoami(token="hf_not_a_token")
    assert err.value.response.status_code == 401
    stored = (hub.root / "tokens.json").read_text()
    assert all(tok not in stored for tok in hub.tokens.values())
    assert sha256(hub.tokens["bob"].encode()) in stored
    assert {(t["user"], t["role"]) for t in list_tokens(hub.root)} >= {("alice", "write"), ("alice", "read")}


def test_create_repo_rules(hub):
    api = client(hub)
    url = api.create_repo("alice/created")
    assert url.repo_id == "alice/created" and url.endpoint == hub.url
    assert api.create_repo("alice/created", exist_ok=True).repo_id == "alice/created"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/created")
    assert err.value.response.status_code == 409
    assert api.create_repo("implicit-ns").repo_id == "alice/implicit-ns"
    info = api.repo_info("alice/created")
    assert len(info.sha) == 40 and [s.rfilename for s in info.siblings] == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("bob/not-yours")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        client(hub, None).create_repo("alice/anonymous")
    assert err.value.response.status_code == 401
    api.create_repo("alice/a-dataset", repo_type="dataset")
    assert api.repo_exists("alice/a-dataset", repo_type="dataset")
    assert not api.repo_exists("alice/a-dataset")  # wrong type is not found
    api.delete_repo("alice/a-dataset", repo_type="dataset")
    assert not api.repo_exists("alice/a-dataset", repo_type="dataset")
    api.delete_repo("alice/a-dataset", repo_type="dataset", missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("alice/a-dataset", repo_type="dataset")


def test_upload_folder_with_lfs_then_download_and_snapshot(hub, tmp_path, caplog):
    api = client(hub)
    api.create_repo("alice/weights")
    folder = tmp_path / "folder"
    (folder / "sub" / "dir").mkdir(parents=True)
    files = {
        "config.json": b'{"num_classes": 3}',
        "README.md": b"---\nlicense: apache-2.0\n---\n# weights\n",
        "big.dat": os.urandom(BIG),
        "model.safetensors": os.urandom(4096),
        "sub/dir/notes.txt": b"nested\n",
        "odd name #1+%.txt": b"odd",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    info = api.upload_folder(repo_id="alice/weights", folder_path=folder, commit_message="add weights")
    assert len(info.oid) == 40 and info.repo_url.repo_id == "alice/weights"
    assert sorted(api.list_repo_files("alice/weights")) == sorted([".gitattributes", *files])

    meta = {s.rfilename: s for s in api.model_info("alice/weights", files_metadata=True).siblings}
    assert meta["big.dat"].lfs.sha256 == sha256(files["big.dat"]) and meta["big.dat"].size == BIG
    assert meta["model.safetensors"].lfs is not None  # by .gitattributes pattern
    assert meta["config.json"].lfs is None
    lfs_store = hub.root / "repos" / "model" / "alice" / "weights" / "lfs"
    digest = sha256(files["big.dat"])
    assert (lfs_store / digest[:2] / digest[2:]).read_bytes() == files["big.dat"]  # content-addressed

    cache = tmp_path / "cache"
    for rel, data in files.items():
        path = hf_hub_download("alice/weights", rel, endpoint=hub.url, cache_dir=cache, token=False)
        assert Path(path).read_bytes() == data, rel
    snap = Path(snapshot_download("alice/weights", endpoint=hub.url, cache_dir=tmp_path / "c2", token=False))
    assert {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()} == {".gitattributes", *files}
    assert all((snap / rel).read_bytes() == data for rel, data in files.items())
    assert snap.name == info.oid

    # Same bytes at a new path: the LFS batch says "already stored", so no second PUT happens.
    caplog.set_level(logging.INFO, logger="surgery.hub.server")
    caplog.clear()
    api.upload_file(path_or_fileobj=files["big.dat"], path_in_repo="copy/big.dat", repo_id="alice/weights")
    assert not [r for r in caplog.records if "PUT /lfs-upload" in r.getMessage()]
    assert any("info/lfs/objects/batch" in r.getMessage() for r in caplog.records)
    api.create_commit("alice/weights", [CommitOperationCopy("big.dat", "copy2/big.dat")], commit_message="copy")
    path = hf_hub_download("alice/weights", "copy2/big.dat", endpoint=hub.url, cache_dir=cache, token=False)
    assert sha256(Path(path).read_bytes()) == digest

    # HEAD metadata and ranged GET (the client resumes interrupted downloads with Range).
    url = hf_hub_url("alice/weights", "big.dat", endpoint=hub.url)
    head = api.get_hf_file_metadata(url=url)
    assert head.size == BIG and head.etag == digest and len(head.commit_hash) == 40
    status, headers, body = raw(hub.url, "GET", "/alice/weights/resolve/main/big.dat", headers={"Range": "bytes=100-"})
    assert status == 206 and body == files["big.dat"][100:] and headers["content-range"] == f"bytes 100-{BIG - 1}/{BIG}"


def test_commit_history_tree_and_deletions(hub, tmp_path):
    api = client(hub)
    api.create_repo("alice/history")
    for i in range(3):
        api.upload_file(path_or_fileobj=f"v{i}".encode(), path_in_repo=f"dir/f{i}.txt", repo_id="alice/history")
    api.create_commit("alice/history", [CommitOperationDelete("dir/f0.txt")], commit_message="drop f0")
    commits = api.list_repo_commits("alice/history")
    assert [c.title for c in commits][:2] == ["drop f0", "Upload dir/f2.txt with huggingface_hub"]
    assert commits[-1].title == "initial commit" and len(commits) == 5
    tree = {e.path for e in api.list_repo_tree("alice/history", path_in_repo="dir")}
    assert tree == {"dir/f1.txt", "dir/f2.txt"}
    api.create_commit("alice/history", [CommitOperationDelete("dir/")], commit_message="drop dir")
    assert api.list_repo_files("alice/history") == [".gitattributes"]
    # History is immutable: the old commit still serves the old file.
    old = hf_hub_download(
        "alice/history", "dir/f1.txt", revision=commits[0].commit_id, endpoint=hub.url, token=False, cache_dir=tmp_path
    )
    assert Path(old).read_text() == "v1"


def test_branches_and_tags(hub, tmp_path):
    api = client(hub)
    api.create_repo("alice/refs")
    main_sha = api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id="alice/refs").oid
    api.create_branch("alice/refs", branch="feature/x")
    api.create_branch("alice/refs", branch="feature/x", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("alice/refs", branch="feature/x")
    assert err.value.response.status_code == 409
    feat_sha = api.upload_file(
        path_or_fileobj=b"feat", path_in_repo="f.txt", repo_id="alice/refs", revision="feature/x"
    ).oid
    api.create_tag("alice/refs", tag="v1", revision="feature/x")
    api.create_tag("alice/refs", tag="v0", revision=main_sha, tag_message="first")
    api.create_tag("alice/refs", tag="v0", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag("alice/refs", tag="v0")
    assert err.value.response.status_code == 409
    with pytest.raises(RevisionNotFoundError):
        api.create_tag("alice/refs", tag="v9", revision="no-such-branch")

    refs = api.list_repo_refs("alice/refs")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_sha, "feature/x": feat_sha}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": feat_sha, "v0": main_sha}
    expect = {"main": b"main", "feature/x": b"feat", "v1": b"feat", "v0": b"main", feat_sha[:10]: b"feat"}
    for rev, data in expect.items():
        path = hf_hub_download("alice/refs", "f.txt", revision=rev, endpoint=hub.url, cache_dir=tmp_path, token=False)
        assert Path(path).read_bytes() == data, rev
    assert api.model_info("alice/refs", revision="feature/x").sha == feat_sha

    api.delete_tag("alice/refs", tag="v0")
    api.delete_branch("alice/refs", branch="feature/x")
    assert not api.revision_exists("alice/refs", "feature/x")
    assert api.revision_exists("alice/refs", "v1")  # the tag keeps the commit reachable
    with pytest.raises(HfHubHTTPError) as err:
        api.delete_branch("alice/refs", branch="main")
    assert err.value.response.status_code == 403
    with pytest.raises(BadRequestError):
        api.create_branch("alice/refs", branch="refs/heads/evil")


def test_typed_errors(hub, tmp_path):
    api = client(hub)
    api.create_repo("alice/errors")
    head = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/errors").oid
    kw = {"endpoint": hub.url, "cache_dir": tmp_path, "token": False}
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/missing", "x.txt", **kw)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/errors", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/errors", "x.txt", revision="nope", **kw)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/errors", "nope.txt", **kw)
    with pytest.raises(EntryNotFoundError):
        api.create_commit("alice/errors", [CommitOperationDelete("nope.txt")], commit_message="rm")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("alice/errors", path_in_repo="no/dir"))
    assert not api.repo_exists("alice/missing")
    assert not api.file_exists("alice/errors", "nope.txt")
    assert api.file_exists("alice/errors", "x.txt")
    assert not api.revision_exists("alice/errors", "nope")

    # A stale parent commit is refused (412) instead of silently overwriting the newer head.
    api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="alice/errors")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("alice/errors", [CommitOperationAdd("z.txt", b"z")], commit_message="z", parent_commit=head)
    assert err.value.response.status_code == 412
    assert "z.txt" not in api.list_repo_files("alice/errors")


def test_private_repos_and_roles(hub, tmp_path):
    alice, alice_ro, bob, anon = client(hub), client(hub, "alice_ro"), client(hub, "bob"), client(hub, None)
    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id="alice/secret")
    alice.create_repo("alice/public")
    assert alice.model_info("alice/secret").private is True
    for other in (anon, bob):
        with pytest.raises(RepositoryNotFoundError):
            other.model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            other.list_repo_refs("alice/secret")
        assert not other.repo_exists("alice/secret")
    for token in (False, hub.tokens["bob"]):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "s.txt", endpoint=hub.url, cache_dir=tmp_path, token=token)
    path = hf_hub_download("alice/secret", "s.txt", endpoint=hub.url, cache_dir=tmp_path, token=hub.tokens["alice_ro"])
    assert Path(path).read_bytes() == b"s3cret"
    assert alice_ro.list_repo_files("alice/secret") == [".gitattributes", "s.txt"]

    # Read tokens, foreign namespaces and anonymous callers cannot write.
    for api, status in ((alice_ro, 403), (bob, 403), (anon, 401)):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"w", path_in_repo="w.txt", repo_id="alice/public")
        assert err.value.response.status_code == status
        with pytest.raises(HfHubHTTPError):
            api.create_branch("alice/public", branch="hijack")
    with pytest.raises(HfHubHTTPError) as err:
        alice_ro.delete_repo("alice/public")
    assert err.value.response.status_code == 403
    assert alice.list_repo_files("alice/public") == [".gitattributes"]

    alice.update_repo_settings("alice/secret", private=False)
    assert anon.model_info("alice/secret").private is False


def test_paths_are_validated(hub):
    api = client(hub)
    api.create_repo("alice/paths")
    head = api.model_info("alice/paths").sha
    with pytest.raises(BadRequestError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="bad\x01name.txt", repo_id="alice/paths")
    auth = {"authorization": f"Bearer {hub.tokens['alice']}", "Content-Type": "application/x-ndjson"}
    header = {"key": "header", "value": {"summary": "evil", "description": ""}}
    for evil in ("../escape.txt", "/etc/passwd", "a/../../b", "a\\b", "ctl\nx", ".git/config", "a//b"):
        line = {
            "key": "file",
            "value": {"path": evil, "content": base64.b64encode(b"x").decode(), "encoding": "base64"},
        }
        status, headers, body = raw(hub.url, "POST", "/api/models/alice/paths/commit/main", ndjson(header, line), auth)
        assert status == 400, evil
        assert "Invalid path" in json.loads(body)["error"]
    for path in (
        "/alice/paths/resolve/main/../../../tokens.json",
        "/alice/paths/resolve/main/%2e%2e/x",
        "/alice/paths/resolve/main/a%2F..%2F..%2Fx",
    ):
        status, headers, _ = raw(hub.url, "GET", path)
        assert status == 400 and "Invalid path" in headers["x-error-message"], path
    status, _, body = raw(
        hub.url,
        "POST",
        "/api/repos/create",
        json.dumps({"name": "..", "organization": "alice"}).encode(),
        {"authorization": auth["authorization"]},
    )
    assert status == 400 and "Invalid repo name" in json.loads(body)["error"]
    assert api.model_info("alice/paths").sha == head
    assert not (hub.root / "escape.txt").exists() and not (hub.root.parent / "escape.txt").exists()


# ---------------------------------------------------------------------------------------------------------------
# timm


def test_timm_push_and_load_from_hub(hub, tmp_path):
    """timm's own push_to_hf_hub, then ``timm.create_model("hf-hub:...")`` in a process that only has HF_ENDPOINT."""
    script = r"""
import sys, torch, timm
from timm.models import push_to_hf_hub
out = sys.argv[1]
torch.manual_seed(0)
model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
push_to_hf_hub(model, "alice/timm-test", commit_message="push test_resnet")
loaded = timm.create_model("hf-hub:alice/timm-test", pretrained=True).eval()
x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    torch.save({"expected": model(x), "loaded": loaded(x), "sd": model.state_dict(), "sd2": loaded.state_dict()}, out)
"""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": hub.tokens["alice"],
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    res = torch.load(out)
    assert torch.equal(res["expected"], res["loaded"])
    assert res["sd"].keys() == res["sd2"].keys() and all(torch.equal(res["sd"][k], res["sd2"][k]) for k in res["sd"])
    files = set(client(hub).list_repo_files("alice/timm-test"))
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"} <= files


# ---------------------------------------------------------------------------------------------------------------
# Load and faults


def test_concurrent_commits_are_serialized(hub, tmp_path):
    api = client(hub)
    api.create_repo("alice/busy")
    errors: list[BaseException] = []

    def pusher(worker: int) -> None:
        mine = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
        try:
            for i in range(10):
                mine.upload_file(
                    path_or_fileobj=f"{worker}-{i}".encode(),
                    path_in_repo=f"w{worker}/f{i}.txt",
                    repo_id="alice/busy",
                    commit_message=f"w{worker} c{i}",
                )
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=pusher, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    commits = api.list_repo_commits("alice/busy")  # paginated: more than one page
    assert len(commits) == 81 and len({c.commit_id for c in commits}) == 81
    assert {c.title for c in commits[:-1]} == {f"w{w} c{i}" for w in range(8) for i in range(10)}
    expected = {f"w{w}/f{i}.txt": f"{w}-{i}".encode() for w in range(8) for i in range(10)}
    snap = Path(snapshot_download("alice/busy", endpoint=hub.url, cache_dir=tmp_path, token=False))
    assert {str(p.relative_to(snap)) for p in snap.rglob("*.txt")} == set(expected)
    assert all((snap / rel).read_bytes() == data for rel, data in expected.items())


def test_failure_before_ref_update_exposes_nothing(tmp_path, monkeypatch):
    """If the server dies after writing a commit object but before moving the ref, the commit stays invisible."""
    token = add_token(tmp_path, "alice", "write")
    with HubServer(tmp_path) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/atomic")
        before = api.list_repo_commits("alice/atomic")
        commits_dir = tmp_path / "repos" / "model" / "alice" / "atomic" / "commits"
        n_objects = len(list(commits_dir.rglob("*.json")))

        def crash(*args, **kwargs):
            raise OSError("simulated crash before the ref update")

        monkeypatch.setattr(Store, "write_refs", crash)
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"lost", path_in_repo="lost.txt", repo_id="alice/atomic")
        assert err.value.response.status_code == 500
        assert len(list(commits_dir.rglob("*.json"))) == n_objects + 1  # the object was written...
        assert api.list_repo_commits("alice/atomic") == before  # ...but nothing points at it
        assert "lost.txt" not in api.list_repo_files("alice/atomic")
        monkeypatch.undo()
        api.upload_file(path_or_fileobj=b"kept", path_in_repo="kept.txt", repo_id="alice/atomic")
        assert "kept.txt" in api.list_repo_files("alice/atomic")


def _start_process(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "surgery.hub.server", "--root", str(root)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("http://"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}\n{log.read_text()}")
    return proc, line


def _wait_for(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigkill_mid_upload_loses_nothing_committed_and_shows_nothing_partial(tmp_path):
    root, log = tmp_path / "root", tmp_path / "server.log"
    token = add_token(root, "alice", "write")
    auth = {"authorization": f"Bearer {token}"}
    proc, url = _start_process(root, log)
    socks: list[socket.socket] = []
    try:
        api = HfApi(endpoint=url, token=token)
        api.create_repo("alice/crash")
        committed = os.urandom(BIG)
        api.upload_file(path_or_fileobj=committed, path_in_repo="committed.bin", repo_id="alice/crash")
        before = (
            api.list_repo_refs("alice/crash"),
            api.list_repo_files("alice/crash"),
            [c.commit_id for c in api.list_repo_commits("alice/crash")],
        )

        # 1) A large LFS PUT is half sent when the server dies.
        pending = os.urandom(24 * 1024 * 1024)
        batch = {
            "operation": "upload",
            "transfers": ["basic"],
            "hash_algo": "sha256",
            "objects": [{"oid": sha256(pending), "size": len(pending)}],
            "ref": {"name": "main"},
        }

        def ask_to_upload(url: str) -> tuple[int, dict, bytes]:  # the LFS batch request, before and after the crash
            lfs = {**auth, "Content-Type": "application/vnd.git-lfs+json"}
            return raw(url, "POST", "/alice/crash.git/info/lfs/objects/batch", json.dumps(batch).encode(), lfs)

        status, _, body = ask_to_upload(url)
        assert status == 200
        href = urllib.parse.urlsplit(json.loads(body)["objects"][0]["actions"]["upload"]["href"])
        u = urllib.parse.urlsplit(url)
        put = socket.create_connection((u.hostname, u.port))
        socks.append(put)
        put.sendall(
            f"PUT {href.path}?{href.query} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {len(pending)}"
            "\r\n\r\n".encode()
            + pending[: len(pending) // 2]
        )
        # 2) A commit whose body is half sent at the same moment.
        line = ndjson({"key": "header", "value": {"summary": "partial"}})
        line += b'{"key": "file", "value": {"path": "partial.txt", "encoding": "base64", "content": "' + b"QUFB" * 1000
        post = socket.create_connection((u.hostname, u.port))
        socks.append(post)
        post.sendall(
            f"POST /api/models/alice/crash/commit/main HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"authorization: Bearer {token}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {len(line) * 10}\r\n\r\n".encode()
            + line
        )

        def upload_in_progress() -> bool:
            return any(p.stat().st_size > 0 for p in (root / "tmp").glob("*.part"))

        _wait_for(upload_in_progress)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, url = _start_process(root, log)  # same root, new port
    try:
        api = HfApi(endpoint=url, token=token)
        after = (
            api.list_repo_refs("alice/crash"),
            api.list_repo_files("alice/crash"),
            [c.commit_id for c in api.list_repo_commits("alice/crash")],
        )
        assert after == before
        assert list((root / "tmp").iterdir()) == []  # partial uploads were discarded on start
        got = hf_hub_download("alice/crash", "committed.bin", endpoint=url, cache_dir=tmp_path / "c", token=False)
        assert sha256(Path(got).read_bytes()) == sha256(committed)
        status, _, body = ask_to_upload(url)
        assert "actions" in json.loads(body)["objects"][0]  # the half-sent object was never stored
        oid = sha256(pending)
        assert not (root / "repos" / "model" / "alice" / "crash" / "lfs" / oid[:2] / oid[2:]).exists()
        api.upload_file(path_or_fileobj=pending, path_in_repo="retried.bin", repo_id="alice/crash")
        got = hf_hub_download("alice/crash", "retried.bin", endpoint=url, cache_dir=tmp_path / "c", token=False)
        assert sha256(Path(got).read_bytes()) == sha256(pending)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# Tokens, CLI and policy


def test_token_cli_and_revocation_take_effect_on_a_running_server(hub, capsys):
    """``token add|list|revoke`` through ``main(argv)`` (the same function ``python -m surgery.hub.server`` runs)."""
    assert main(["token", "add", "carol", "--role", "read", "--root", str(hub.root)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("hf_") and token not in (hub.root / "tokens.json").read_text()
    me = HfApi(endpoint=hub.url).whoami(token=token)  # picked up by the running server without a restart
    assert me["name"] == "carol" and me["auth"]["accessToken"]["role"] == "read"
    token_id = me["auth"]["accessToken"]["displayName"]
    assert main(["token", "list", "--root", str(hub.root)]) == 0
    assert f"{token_id}  carol  read" in capsys.readouterr().out
    assert main(["token", "revoke", token_id, "--root", str(hub.root)]) == 0
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).whoami(token=token)
    assert err.value.response.status_code == 401
    assert not revoke_token(hub.root, token_id)
    assert main(["token", "add", "../x", "--root", str(hub.root)]) == 2
    assert "Invalid user name" in capsys.readouterr().err
    with pytest.raises(HubError):
        add_token(hub.root, "dave", role="admin")


def test_server_without_tokens_is_read_only(tmp_path):
    with HubServer(tmp_path) as server:
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=server.url, token=False).create_repo("alice/x")
        assert err.value.response.status_code == 401 and "token add" in str(err.value)
        with pytest.raises(HubError, match="already serving"):
            HubServer(tmp_path).start()
