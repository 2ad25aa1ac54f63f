"""Repos on disk: content-addressed blobs and LFS objects, immutable commits, atomically replaced refs."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from surgery.hub.server.card import parse_front_matter
from surgery.hub.server.common import (
    CHUNK,
    DEFAULT_GITATTRIBUTES,
    DIR_MODE,
    HEX40,
    ApiError,
    bad,
    fsync_dir,
    git_oid,
    mkdir_private,
    now_iso,
    open_private,
    shard,
)

CACHE_ENTRIES = 200_000  # file-table entries kept across cached commits (~100 MB at most)
CARD_CACHE = 1024  # parsed README.md front matters kept, by blob id


class Store:
    """Repos on disk: content-addressed blobs and LFS objects, immutable commits, atomically replaced refs."""

    def __init__(self, root: Path, fsync: bool = True):
        self.root, self.fsync = root, fsync
        self.tmp = root / "tmp"
        self.repos = root / "repos"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._cache_guard = threading.Lock()
        self._cached_entries = 0
        self._cards: OrderedDict[str, dict] = OrderedDict()

    # --- low level
    def repo_dir(self, kind: str, ns: str, name: str) -> Path:
        return self.repos / kind / ns / name

    @contextlib.contextmanager
    def lock(self, rdir: Path) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(str(rdir), threading.Lock())
        with lock:
            yield

    def _tmp_path(self) -> Path:
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def _finish(self, tmp: Path, final: Path, f: Any) -> None:
        """Flush, fsync and rename ``tmp`` (open as ``f``) to ``final``; the shard dir needs the repo to exist."""
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        f.close()
        final.parent.mkdir(mode=DIR_MODE, exist_ok=True)  # no parents=True: never resurrect a deleted repo
        os.replace(tmp, final)

    def write_file(self, final: Path, data: bytes) -> None:
        tmp = self._tmp_path()
        try:
            f = open_private(tmp)
            f.write(data)
            self._finish(tmp, final, f)
        finally:
            tmp.unlink(missing_ok=True)

    def write_json(self, final: Path, obj: Any) -> None:
        tmp = self._tmp_path()
        try:
            f = open_private(tmp)
            f.write(json.dumps(obj, sort_keys=True).encode())
            self._finish(tmp, final, f)
        finally:
            tmp.unlink(missing_ok=True)

    # --- repos
    def meta(self, rdir: Path) -> dict | None:
        try:
            return json.loads((rdir / "meta.json").read_text())
        except FileNotFoundError:
            return None

    def create_repo(self, kind: str, ns: str, name: str, private: bool, author: str) -> bool:
        """Assemble a repo (meta, initial commit, refs) in tmp/, then rename it into place; False if it exists."""
        final = self.repo_dir(kind, ns, name)
        if final.exists():
            return False
        work = self.tmp / f"repo-{uuid.uuid4().hex}"
        try:
            for sub in ("commits", "blobs", "lfs"):
                mkdir_private(work / sub)
            now = now_iso()
            meta = {
                "id": f"{ns}/{name}",
                "type": kind,
                "private": bool(private),
                "createdAt": now,
                "uid": uuid.uuid4().hex,
                "author": author,
            }
            self.write_json(work / "meta.json", meta)
            oid = git_oid(DEFAULT_GITATTRIBUTES)
            self.write_file(shard(work / "blobs", oid), DEFAULT_GITATTRIBUTES)
            files = {".gitattributes": {"oid": oid, "size": len(DEFAULT_GITATTRIBUTES)}}
            sha = self._write_commit(work, [], files, "initial commit", "", "system", now)
            self.write_json(work / "refs.json", {"branches": {"main": sha}, "tags": {}})
            mkdir_private(final.parent)
            try:
                os.rename(work, final)
            except OSError:
                if final.exists():
                    return False
                raise
            if self.fsync:
                fsync_dir(final.parent)
            return True
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def delete_repo(self, rdir: Path) -> bool:
        with self.lock(rdir):
            if self.meta(rdir) is None:
                return False
            trash = self.tmp / f"deleted-{uuid.uuid4().hex}"
            os.rename(rdir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def set_private(self, rdir: Path, private: bool) -> None:
        with self.lock(rdir):
            meta = self.meta(rdir)
            if meta is None:
                raise ApiError(404, "Repository not found", "RepoNotFound")
            meta["private"] = private
            self.write_json(rdir / "meta.json", meta)

    def iter_repos(self, kind: str) -> Iterator[tuple[str, str, Path, dict]]:
        """Every repo of ``kind`` as ``(namespace, name, folder, meta)``, sorted by id."""
        base = self.repos / kind
        for ns_dir in sorted(base.iterdir()) if base.is_dir() else []:
            for rdir in sorted(ns_dir.iterdir()) if ns_dir.is_dir() else []:
                meta = self.meta(rdir)
                if meta is not None:
                    yield ns_dir.name, rdir.name, rdir, meta

    def card(self, rdir: Path, files: dict) -> dict:
        """The README.md front matter of a commit's file table (``{}`` without one); cached by blob id."""
        entry = files.get("README.md")
        if entry is None or "lfs" in entry:
            return {}
        key = entry["oid"]
        with self._cache_guard:
            if key in self._cards:
                self._cards.move_to_end(key)
                return self._cards[key]
        try:
            with open(self.blob_path(rdir, entry), "rb") as f:
                card = parse_front_matter(f.read(64 * 1024).decode("utf-8", "replace"))
        except OSError:
            return {}
        with self._cache_guard:
            self._cards[key] = card
            while len(self._cards) > CARD_CACHE:
                self._cards.popitem(last=False)
        return card

    # --- refs and commits
    def refs(self, rdir: Path) -> dict:
        try:
            return json.loads((rdir / "refs.json").read_text())
        except FileNotFoundError:
            raise ApiError(404, "Repository not found", "RepoNotFound") from None

    def write_refs(self, rdir: Path, refs: dict) -> None:
        self.write_json(rdir / "refs.json", refs)
        if self.fsync:
            fsync_dir(rdir)

    def _write_commit(
        self,
        rdir: Path,
        parents: list[str],
        files: dict,
        title: str,
        message: str,
        author: str,
        date: str | None = None,
    ) -> str:
        body = {
            "parents": parents,
            "title": title,
            "message": message,
            "author": author,
            "date": date or now_iso(),
            "files": files,
        }
        sha = hashlib.sha1(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        body["id"] = sha
        path = shard(rdir / "commits", sha, ".json")
        if not path.exists():
            self.write_json(path, body)
        return sha

    def commit(self, rdir: Path, sha: str) -> dict | None:
        """Read a commit object. Commits are immutable, so parsed ones are cached (bounded by their file count)."""
        key = (str(rdir), sha)
        with self._cache_guard:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            data = json.loads(shard(rdir / "commits", sha, ".json").read_text())
        except FileNotFoundError:
            return None
        with self._cache_guard:
            if key not in self._cache:
                self._cache[key] = data
                self._cached_entries += len(data["files"]) + 1
            while self._cached_entries > CACHE_ENTRIES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached_entries -= len(old["files"]) + 1
        return data

    def forget(self, rdir: Path) -> None:
        """Drop cached commits of a deleted repo (a new repo of the same name must not see them)."""
        with self._cache_guard:
            for key in [k for k in self._cache if k[0] == str(rdir)]:
                self._cached_entries -= len(self._cache.pop(key)["files"]) + 1

    def resolve(self, rdir: Path, rev: str) -> str | None:
        """Revision to commit id: branch, then tag, then full commit id, then a unique prefix of >= 7 hex chars."""
        refs = self.refs(rdir)
        if rev in refs["branches"]:
            return refs["branches"][rev]
        if rev in refs["tags"]:
            return refs["tags"][rev]["commit"]
        if HEX40.fullmatch(rev):
            return rev if shard(rdir / "commits", rev, ".json").exists() else None
        if 7 <= len(rev) < 40 and re.fullmatch(r"[0-9a-f]+", rev):
            try:
                hits = [n for n in os.listdir(rdir / "commits" / rev[:2]) if n.startswith(rev[2:])]
            except FileNotFoundError:
                return None
            if len(hits) == 1:
                return rev[:2] + hits[0].removesuffix(".json")
        return None

    # --- content
    def blob_path(self, rdir: Path, entry: dict) -> Path:
        if "lfs" in entry:
            return shard(rdir / "lfs", entry["lfs"]["oid"])
        return shard(rdir / "blobs", entry["oid"])

    def put_blob(self, rdir: Path, data: bytes) -> str:
        oid = git_oid(data)
        path = shard(rdir / "blobs", oid)
        if not path.exists():
            self.write_file(path, data)
        return oid

    def lfs_size(self, rdir: Path, oid: str) -> int | None:
        try:
            return shard(rdir / "lfs", oid).stat().st_size
        except FileNotFoundError:
            return None

    def put_lfs(self, rdir: Path, oid: str, size: int, read: Callable[[int], bytes]) -> None:
        """Stream an upload to tmp/ while hashing it; rename into the store only if size and sha256 match."""
        tmp = self._tmp_path()
        digest, got = hashlib.sha256(), 0
        try:
            f = open_private(tmp)
            try:
                while chunk := read(CHUNK):
                    got += len(chunk)
                    if got > size:
                        raise bad(f"Upload is larger than the announced {size} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                if got != size or digest.hexdigest() != oid:
                    raise bad(f"Upload does not match its oid/size: got {got} bytes with sha256 {digest.hexdigest()}")
                if self.meta(rdir) is None:
                    raise ApiError(404, "Repository not found", "RepoNotFound")
                self._finish(tmp, shard(rdir / "lfs", oid), f)
            finally:
                f.close()
        finally:
            tmp.unlink(missing_ok=True)

    def apply_commit(
        self, rdir: Path, branch: str, ops: list[tuple], parent: str | None, title: str, message: str, author: str
    ) -> str:
        """Apply ``ops`` to the head of ``branch`` under the repo lock; write the commit, then move the ref."""
        with self.lock(rdir):
            if self.meta(rdir) is None:
                raise ApiError(404, "Repository not found", "RepoNotFound")
            refs = self.refs(rdir)
            head = refs["branches"].get(branch)
            if head is None:
                raise ApiError(
                    404, f"Branch {branch!r} not found: commits can only be made on a branch", "RevisionNotFound"
                )
            if parent is not None and parent != head:
                raise ApiError(
                    412,
                    f"A commit has happened since {parent}: the head of {branch!r} is now {head}. "
                    "Pull the latest changes and retry.",
                )
            files = dict(self.commit(rdir, head)["files"])
            for op, path, entry in ops:
                if op == "add":
                    files[path] = entry
                elif op == "delete":
                    if files.pop(path, None) is None:
                        raise ApiError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:  # delete folder
                    gone = [p for p in files if p.startswith(path + "/")]
                    if not gone:
                        raise ApiError(404, f"A folder with this name doesn't exist: {path}/", "EntryNotFound")
                    for p in gone:
                        del files[p]
            _check_tree(files, [path for op, path, _ in ops if op == "add"])
            sha = self._write_commit(rdir, [head], files, title, message, author)
            refs["branches"][branch] = sha
            self.write_refs(rdir, refs)
            return sha


def _check_tree(files: dict, added: list[str]) -> None:
    """Refuse trees where a path is both a file and a folder (``a`` and ``a/b``)."""
    if not added:
        return
    dirs = {p[:i] for p in files for i in range(len(p)) if p[i] == "/"}
    for path in added:
        parts = path.split("/")
        if path in dirs or any("/".join(parts[:i]) in files for i in range(1, len(parts))):
            raise ApiError(409, f"Path {path!r} conflicts with an existing file or folder of the same name")


def lfs_patterns_of(data: bytes) -> list[str]:
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            out.append(parts[0].lstrip("/"))
    return out


def matches_lfs(path: str, patterns: list[str]) -> bool:
    base = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else base, p) for p in patterns)


def file_entry(path: str, entry: dict) -> dict:
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if "lfs" in entry:
        out["lfs"] = dict(entry["lfs"])
    return out


def tree_listing(files: dict, path: str, recursive: bool) -> list[dict] | None:
    """Entries under ``path`` (a folder, "" for the root, or one file); None if the path does not exist."""
    if path in files:
        return [file_entry(path, files[path])]
    prefix = f"{path}/" if path else ""
    out, dirs = [], set()
    for p in sorted(files):
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix) :].split("/")
        if len(parts) == 1 or recursive:
            out.append(file_entry(p, files[p]))
        dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts) if recursive else min(2, len(parts))))
    if not out and not dirs and path:
        return None
    hashers = {d: hashlib.sha1() for d in dirs}
    for p in sorted(files):
        for i, ch in enumerate(p):
            if ch == "/" and p[:i] in hashers:
                hashers[p[:i]].update(f"{p[i + 1 :]}\0{files[p]['oid']}\n".encode())
    out += [{"type": "directory", "oid": hashers[d].hexdigest(), "size": 0, "path": d} for d in dirs]
    return sorted(out, key=lambda e: e["path"])
