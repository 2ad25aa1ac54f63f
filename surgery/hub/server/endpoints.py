"""The Hub API endpoints (HUB_API.md section 2): routing on the raw path, then one method per endpoint."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from surgery.hub.server.card import card_fields
from surgery.hub.server.common import (
    COMMITS_PAGE,
    HEX64,
    KINDS,
    LFS_MIN_SIZE,
    LFS_PATTERNS,
    MAX_COMMIT_LINE,
    NAME_RE,
    TREE_PAGE,
    UPLOAD_URL_TTL,
    WEB_PREFIX,
    ApiError,
    bad,
    git_oid,
    lfs_pointer,
    validate_name,
    validate_path,
    validate_ref,
)
from surgery.hub.server.schema import (
    COMMIT_LINE,
    COMMIT_OPS,
    CREATE_BRANCH,
    CREATE_REPO,
    CREATE_TAG,
    DELETE_REPO,
    LFS_BATCH,
    LFS_VERIFY,
    PATHS_INFO,
    PREUPLOAD,
    SETTINGS,
    VALIDATE_YAML,
    validate,
)
from surgery.hub.server.storage import file_entry, lfs_patterns_of, matches_lfs, tree_listing
from surgery.hub.server.wire import BaseHandler


class Handler(BaseHandler):
    """All endpoints; ``_route`` maps a method and decoded path segments to one of them."""

    # --- routing
    def _route(self, method: str, segs: list[str]) -> None:
        head = segs[0] if segs else ""
        if head == "api":
            return self._route_api(method, segs[1:])
        if head == "lfs-upload" and len(segs) == 5 and method == "PUT" and segs[1] in WEB_PREFIX:
            return self._lfs_upload(*segs[1:])
        if head == "lfs-verify" and len(segs) == 4 and method == "POST" and segs[1] in WEB_PREFIX:
            return self._lfs_verify(*segs[1:])
        kind = "model"
        if head in ("datasets", "spaces"):
            kind, segs = KINDS[head], segs[1:]
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return self._lfs_batch(kind, segs[0], segs[1][:-4])
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(kind, segs[0], segs[1], segs[3], "/".join(segs[4:]))
        raise ApiError(404, f"No route for {method} {self.raw_path}")

    def _route_api(self, method: str, segs: list[str]) -> None:
        simple = {
            ("GET", "agent-harnesses"): lambda: self._json({"standardEnvVars": [], "harnesses": {}}),
            ("GET", "whoami-v2"): self._whoami,
            ("POST", "validate-yaml"): self._validate_yaml,
            ("POST", "repos/create"): self._create_repo,
            ("DELETE", "repos/delete"): self._delete_repo,
        }
        handler = simple.get((method, "/".join(segs)))
        if handler:
            return handler()
        if method == "GET" and len(segs) == 1 and segs[0] in KINDS:
            return self._list_repos(KINDS[segs[0]])
        if len(segs) < 3 or segs[0] not in KINDS:
            raise ApiError(404, f"No route for {method} {self.raw_path}")
        kind, ns, name, rest = KINDS[segs[0]], segs[1], segs[2], segs[3:]
        op = rest[0] if rest else ""
        routes = {
            ("GET", "", 0): lambda: self._info(kind, ns, name, "main"),
            ("GET", "revision", 1): lambda: self._info(kind, ns, name, rest[1]),
            ("GET", "refs", 0): lambda: self._refs(kind, ns, name),
            ("GET", "commits", 1): lambda: self._commits(kind, ns, name, rest[1]),
            ("POST", "paths-info", 1): lambda: self._paths_info(kind, ns, name, rest[1]),
            ("POST", "preupload", 1): lambda: self._preupload(kind, ns, name, rest[1]),
            ("POST", "commit", 1): lambda: self._commit(kind, ns, name, rest[1]),
            ("POST", "branch", 1): lambda: self._create_branch(kind, ns, name, rest[1]),
            ("DELETE", "branch", 1): lambda: self._delete_ref(kind, ns, name, "branch", rest[1]),
            ("POST", "tag", 1): lambda: self._create_tag(kind, ns, name, rest[1]),
            ("DELETE", "tag", 1): lambda: self._delete_ref(kind, ns, name, "tag", rest[1]),
            ("PUT", "settings", 0): lambda: self._settings(kind, ns, name),
        }
        if op == "tree" and len(rest) >= 2 and method == "GET":
            return self._tree(kind, ns, name, rest[1], "/".join(rest[2:]))
        handler = routes.get((method, op, len(rest) - 1 if rest else 0))
        if handler is None:
            raise ApiError(404, f"No route for {method} {self.raw_path}")
        return handler()

    # --- account and repo lifecycle
    def _whoami(self) -> None:
        caller = self._caller()
        if caller is None:
            raise ApiError(401, "Invalid credentials in Authorization header")
        user = caller["user"]
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": caller["id"], "role": caller["role"]}},
            }
        )

    def _validate_yaml(self) -> None:
        self._read_json(VALIDATE_YAML)
        self._json({"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        body = self._read_json(CREATE_REPO)
        kind = body.get("type") or "model"
        name = validate_name(body.get("name"), "repo name")
        ns = body.get("organization")
        if ns is None:
            caller = self._caller()
            if caller is None:
                self._require_write("", "creating a repo")
            ns = caller["user"]
        validate_name(ns, "namespace")
        caller = self._require_write(ns, f"creating {ns}/{name}")
        vis = body.get("visibility")
        private = vis == "private" if vis is not None else bool(body.get("private"))
        url = self._repo_url(kind, ns, name)
        if not self.server.store.create_repo(kind, ns, name, private, caller["user"]):
            raise ApiError(409, f"You already created this {kind} repo: {ns}/{name}", url=url)
        self._json({"url": url, "name": f"{ns}/{name}", "id": f"{ns}/{name}"})

    def _delete_repo(self) -> None:
        body = self._read_json(DELETE_REPO)
        kind = body.get("type") or "model"
        ns = body.get("organization") or (self._caller() or {}).get("user") or ""
        rdir, _ = self._repo(kind, ns, body["name"], write=f"deleting {ns}/{body['name']}")
        if not self.server.store.delete_repo(rdir):
            raise ApiError(404, f"Repository {ns}/{body.get('name')} not found", "RepoNotFound")
        self.server.store.forget(rdir)
        self._json({"success": True})

    def _settings(self, kind: str, ns: str, name: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"changing the settings of {ns}/{name}")
        body = self._read_json(SETTINGS)  # every key checked before anything is written
        if body.get("gated") not in (None, False):
            raise bad("Gated repos are not supported by this hub")
        vis, private = body.get("visibility"), body.get("private")
        if vis is not None and private is not None and (vis == "private") != private:
            raise bad("Invalid request body: 'visibility' and 'private' disagree")
        if vis is not None or private is not None:
            self.server.store.set_private(rdir, vis == "private" if vis is not None else bool(private))
        self._json({"success": True})

    # --- reading
    def _info(self, kind: str, ns: str, name: str, rev: str) -> None:
        rdir, meta = self._repo(kind, ns, name)
        sha, commit = self._resolve(rdir, rev)
        blobs = self.query.get("blobs", [""])[0].lower() in ("true", "1")
        siblings = []
        for path in sorted(commit["files"]):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                e = commit["files"][path]
                sib.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    sib["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(sib)
        info = self._summary(kind, ns, name, rdir, meta, sha, commit)
        info["siblings"] = siblings
        self._json(info)

    def _summary(self, kind: str, ns: str, name: str, rdir: Path, meta: dict, sha: str, commit: dict) -> dict:
        """The repo fields of ``model_info`` and ``list_models``, with the card's metadata (README front matter)."""
        info = {
            "_id": meta["uid"][:24],
            "id": f"{ns}/{name}",
            "author": ns,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            **card_fields(self.server.store.card(rdir, commit["files"])),
        }
        if kind == "model":
            info["modelId"] = info["id"]
        return info

    def _list_repos(self, kind: str) -> None:
        """``GET /api/models`` (``list_models``): public repos and the caller's own, filtered as the Hub does.

        ``search``: case-insensitive substring of the repo id; ``author``: the namespace; ``filter``: tags that must
        all be present; ``sort`` (``id``, ``lastModified``, ``createdAt``) with ``direction=-1`` for descending;
        ``limit``; ``full`` adds siblings; ``cardData`` is always included.
        """
        q = {k: v[-1] for k, v in self.query.items()}
        search, author = q.get("search", "").lower(), q.get("author")
        wanted = set(self.query.get("filter", []))
        try:
            limit = int(q.get("limit", "1000"))
        except ValueError:
            raise bad("Invalid 'limit': use an integer") from None
        if not 0 < limit <= 10_000:
            raise bad("Invalid 'limit': use 1 to 10000")
        sort = q.get("sort", "id")
        if sort not in ("id", "lastModified", "createdAt", "downloads", "likes", "trendingScore"):
            raise bad(f"Invalid 'sort' {sort!r}: use id, lastModified or createdAt")
        full = q.get("full", "").lower() in ("true", "1")
        caller = self._caller()
        store, out = self.server.store, []
        for ns, name, rdir, meta in store.iter_repos(kind):
            if meta["private"] and (caller is None or caller["user"] != ns):
                continue
            if (author and ns != author) or (search and search not in f"{ns}/{name}".lower()):
                continue
            sha = store.resolve(rdir, "main")
            commit = store.commit(rdir, sha) if sha else None
            if commit is None:
                continue
            item = self._summary(kind, ns, name, rdir, meta, sha, commit)
            if wanted and not wanted <= set(item["tags"]):
                continue
            if full:
                item["siblings"] = [{"rfilename": p} for p in sorted(commit["files"])]
            out.append(item)
        if sort in ("lastModified", "createdAt"):
            out.sort(key=lambda i: i[sort], reverse=q.get("direction") == "-1")
        elif q.get("direction") == "-1":
            out.reverse()
        self._paged(out, limit)

    def _tree(self, kind: str, ns: str, name: str, rev: str, path: str) -> None:
        rdir, _ = self._repo(kind, ns, name)
        _, commit = self._resolve(rdir, rev)
        path = path.strip("/")
        recursive = self.query.get("recursive", [""])[0].lower() in ("true", "1")
        entries = tree_listing(commit["files"], path, recursive)
        if entries is None:
            raise ApiError(404, f"Entry not found: {path!r} at {rev!r}", "EntryNotFound")
        self._paged(entries, TREE_PAGE)

    def _paged(self, items: list, size: int) -> None:
        """Answer one page of ``items`` with an absolute ``Link: <...>; rel="next"`` when more follow."""
        try:
            page = max(0, int(self.query.get("p", ["0"])[0]))
        except ValueError:
            raise bad("Invalid page number") from None
        headers = {}
        if len(items) > (page + 1) * size:
            query = [(k, v) for k, vs in self.query.items() if k != "p" for v in vs] + [("p", str(page + 1))]
            headers["Link"] = f'<{self._base()}{self.raw_path}?{urllib.parse.urlencode(query)}>; rel="next"'
        self._json(items[page * size : (page + 1) * size], headers=headers)

    def _paths_info(self, kind: str, ns: str, name: str, rev: str) -> None:
        rdir, _ = self._repo(kind, ns, name)
        if "json" in self.headers.get("Content-Type", ""):
            paths = self._read_json(PATHS_INFO).get("paths", [])
        else:  # the client sends a form: paths=a&paths=b&expand=false
            raw = self._read_body(self.server.limits.max_json_body).decode("utf-8", "replace")
            paths = validate({"paths": urllib.parse.parse_qs(raw).get("paths", [])}, PATHS_INFO)["paths"]
        _, commit = self._resolve(rdir, rev)
        files, out = commit["files"], []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(file_entry(path, files[path]))
            elif path:
                parent = tree_listing(files, path.rsplit("/", 1)[0] if "/" in path else "", False) or []
                out += [e for e in parent if e["path"] == path and e["type"] == "directory"]
        self._json(out)

    def _refs(self, kind: str, ns: str, name: str) -> None:
        rdir, _ = self._repo(kind, ns, name)
        refs = self.server.store.refs(rdir)
        out = {
            "branches": [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(refs["branches"].items())
            ],
            "converts": [],
            "tags": [
                {"name": t, "ref": f"refs/tags/{t}", "targetCommit": v["commit"]}
                for t, v in sorted(refs["tags"].items())
            ],
        }
        if self.query.get("include_prs"):
            out["pullRequests"] = []
        self._json(out)

    def _commits(self, kind: str, ns: str, name: str, rev: str) -> None:
        rdir, _ = self._repo(kind, ns, name)
        sha, commit = self._resolve(rdir, rev)
        try:
            page = max(0, int(self.query.get("p", ["0"])[0]))
        except ValueError:
            raise bad("Invalid page number") from None
        formatted = "formatted" in self.query.get("expand[]", []) + self.query.get("expand", [])
        history: list[dict] = []
        while commit is not None and len(history) <= (page + 1) * COMMITS_PAGE:
            item = {
                "id": commit["id"],
                "title": commit["title"],
                "message": commit["message"],
                "date": commit["date"],
                "authors": [{"user": commit["author"], "avatar": ""}],
            }
            if formatted:
                item["formatted"] = {"title": html.escape(commit["title"]), "message": html.escape(commit["message"])}
            history.append(item)
            parents = commit["parents"]
            commit = self.server.store.commit(rdir, parents[0]) if parents else None
        self._paged(history, COMMITS_PAGE)

    def _resolve_file(self, kind: str, ns: str, name: str, rev: str, path: str) -> None:
        rdir, _ = self._repo(kind, ns, name)
        validate_path(path)
        sha, commit = self._resolve(rdir, rev)
        entry = commit["files"].get(path)
        if entry is None:
            raise ApiError(
                404, f"Entry not found: {path!r} at revision {rev!r}", "EntryNotFound", {"X-Repo-Commit": sha}
            )
        size = entry["size"]
        headers: dict[str, Any] = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "ETag": f'"{entry["oid"]}"'}
        if "lfs" in entry:
            etag = f'"{entry["lfs"]["oid"]}"'
            headers.update({"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": size})
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start, end = int(m.group(1)), min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                else:
                    start = max(0, size - int(m.group(2)))
                if start > end:
                    raise ApiError(
                        416,
                        f"Range {rng} not satisfiable for {size} bytes",
                        headers={"Content-Range": f"bytes */{size}", **headers},
                    )
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        if self.command == "HEAD":
            return self._start(200, headers, size, "application/octet-stream")
        with open(self.server.store.blob_path(rdir, entry), "rb") as f:
            self._start(status, headers, length, "application/octet-stream")
            if length:
                self.wfile.flush()
                self.connection.sendfile(f, start, length)

    # --- writing
    def _preupload(self, kind: str, ns: str, name: str, rev: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"uploading to {ns}/{name}")
        body = self._read_json(PREUPLOAD)
        sha, commit = self._resolve(rdir, rev)
        files = commit["files"]
        patterns = list(LFS_PATTERNS)
        if ".gitattributes" in files and "lfs" not in files[".gitattributes"]:
            patterns = lfs_patterns_of(self.server.store.blob_path(rdir, files[".gitattributes"]).read_bytes())
        out = []
        for item in body["files"]:
            path = validate_path(item["path"])
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except (binascii.Error, ValueError):
                sample = b""
            size = item.get("size", 0)
            lfs = size >= LFS_MIN_SIZE or matches_lfs(path, patterns) or b"\0" in sample
            res = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in files:
                e = files[path]
                res["oid"] = e["lfs"]["oid"] if "lfs" in e else e["oid"]
            out.append(res)
        self._json({"files": out, "commitOid": sha})

    def _commit(self, kind: str, ns: str, name: str, rev: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"committing to {ns}/{name}")
        caller = self._caller()
        if self.query.get("create_pr"):
            raise ApiError(501, "Pull requests are not supported by this hub: commit to a branch instead")
        store, limits = self.server.store, self.server.limits
        if rev not in store.refs(rdir)["branches"]:
            raise ApiError(404, f"Branch {rev!r} not found: commits can only be made on a branch", "RevisionNotFound")
        if self._body.length is not None and self._body.length > limits.max_commit_body:
            raise ApiError(413, f"Commit body larger than {limits.max_commit_body} bytes: send big files through LFS")
        header, ops, total = None, [], 0
        while line := self._body.readline(MAX_COMMIT_LINE):
            total += len(line)
            if (not line.endswith(b"\n") and len(line) >= MAX_COMMIT_LINE) or total > limits.max_commit_body:
                raise ApiError(413, "A commit line is too large: send big files through LFS")
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                raise bad('Commit body must be NDJSON lines of {"key": ..., "value": {...}}') from None
            where = f"line {len(ops) + 2 if header is not None else 1}"
            item = validate(item, COMMIT_LINE, where)
            key, value = item["key"], validate(item["value"], COMMIT_OPS[item["key"]], f"{where}.value")
            if header is None:
                if key != "header":
                    raise bad("The first line of a commit must be the header")
                header = value
                continue
            if key == "header":
                raise bad(f"Invalid commit: {where} is a second header")
            ops.append(self._commit_op(rdir, key, value))
        if header is None:
            raise bad("Empty commit body")
        sha = store.apply_commit(
            rdir,
            rev,
            ops,
            header.get("parentCommit"),
            header.get("summary") or "Update",
            header.get("description") or "",
            caller["user"],
        )
        self._json(
            {
                "success": True,
                "commitOid": sha,
                "pullRequestUrl": None,
                "commitUrl": f"{self._repo_url(kind, ns, name)}/commit/{sha}",
            }
        )

    def _commit_op(self, rdir: Path, key: str, value: dict) -> tuple:
        """Turn one NDJSON operation (already checked by its schema) into ``(op, path, entry)``.

        Inline files are stored right away (an aborted commit leaves them unreferenced, for gc).
        """
        store = self.server.store
        if key == "file":
            path = validate_path(value["path"])
            try:
                data = base64.b64decode(value["content"], validate=True)
            except (binascii.Error, ValueError):
                raise bad(f"Invalid base64 content for {path}") from None
            return "add", path, {"oid": store.put_blob(rdir, data), "size": len(data)}
        if key == "lfsFile":
            path = validate_path(value["path"])
            oid = value["oid"]
            if not HEX64.fullmatch(oid):
                raise bad(f"Invalid LFS oid for {path}")
            size = store.lfs_size(rdir, oid)
            if size is None:
                raise ApiError(422, f"LFS object {oid} for {path} was never uploaded to this repo")
            if value.get("size") is not None and value.get("size") != size:
                raise ApiError(422, f"LFS object {oid} has {size} bytes, not {value.get('size')}")
            pointer = lfs_pointer(oid, size)
            return (
                "add",
                path,
                {
                    "oid": git_oid(pointer),
                    "size": size,
                    "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)},
                },
            )
        if key == "deletedFile":
            return "delete", validate_path(value["path"]), None
        return "delete_folder", validate_path(value["path"].rstrip("/")), None

    def _create_branch(self, kind: str, ns: str, name: str, branch: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"creating a branch in {ns}/{name}")
        validate_ref(branch, "branch")
        start = self._read_json(CREATE_BRANCH).get("startingPoint") or "main"
        store = self.server.store
        with store.lock(rdir):
            refs = store.refs(rdir)
            if branch in refs["branches"]:
                raise ApiError(409, f"Branch {branch!r} already exists")
            refs["branches"][branch], _ = self._resolve(rdir, start)
            store.write_refs(rdir, refs)
        self._json({"success": True})

    def _create_tag(self, kind: str, ns: str, name: str, rev: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"creating a tag in {ns}/{name}")
        body = self._read_json(CREATE_TAG)
        tag = validate_ref(body["tag"], "tag")
        store = self.server.store
        with store.lock(rdir):
            refs = store.refs(rdir)
            if tag in refs["tags"]:
                raise ApiError(409, f"Tag {tag!r} already exists")
            sha, _ = self._resolve(rdir, rev)
            refs["tags"][tag] = {"commit": sha, "message": body.get("message") or ""}
            store.write_refs(rdir, refs)
        self._json({"success": True})

    def _delete_ref(self, kind: str, ns: str, name: str, ref_kind: Literal["branch", "tag"], ref: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"deleting a {ref_kind} of {ns}/{name}")
        if ref_kind == "branch" and ref == "main":
            raise ApiError(403, "Cannot delete the default branch 'main'")
        store = self.server.store
        with store.lock(rdir):
            refs = store.refs(rdir)
            if refs[{"branch": "branches", "tag": "tags"}[ref_kind]].pop(ref, None) is None:
                raise ApiError(404, f"{ref_kind.capitalize()} {ref!r} not found", "RevisionNotFound")
            store.write_refs(rdir, refs)
        self._json({"success": True})

    # --- LFS basic transfer
    def _sign(self, kind: str, ns: str, name: str, oid: str, size: int, exp: int) -> str:
        msg = f"{kind}/{ns}/{name}:{oid}:{size}:{exp}".encode()
        return hmac.new(self.server.secret, msg, hashlib.sha256).hexdigest()

    def _lfs_batch(self, kind: str, ns: str, name: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"uploading to {ns}/{name}")
        body = self._read_json(LFS_BATCH)
        if body["operation"] != "upload":
            raise bad("Only the LFS 'upload' operation is supported; download files through /resolve/")
        if "basic" not in (body.get("transfers") or ["basic"]):
            raise bad("Only the 'basic' LFS transfer is supported")
        exp = int(time.time()) + UPLOAD_URL_TTL
        base, objects, most = self._base(), [], self.server.limits.max_lfs_size
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            if not HEX64.fullmatch(oid) or size > most:
                why = f"larger than this hub's limit of {most} bytes" if size > most else "oid must be 64 hex chars"
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": f"Refused: {why}"}})
                continue
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if self.server.store.lfs_size(rdir, oid) != size:
                query = urllib.parse.urlencode(
                    {"size": size, "exp": exp, "sig": self._sign(kind, ns, name, oid, size, exp)}
                )
                out["actions"] = {
                    "upload": {
                        "href": f"{base}/lfs-upload/{kind}/{ns}/{name}/{oid}?{query}",
                        "expires_in": UPLOAD_URL_TTL,
                    },
                    "verify": {"href": f"{base}/lfs-verify/{kind}/{ns}/{name}", "expires_in": UPLOAD_URL_TTL},
                }
            objects.append(out)
        self._json({"transfer": "basic", "hash_algo": "sha256", "objects": objects})

    def _lfs_upload(self, kind: str, ns: str, name: str, oid: str) -> None:
        """Unauthenticated PUT (the client sends no token here): the signed query string is the authorization."""
        if not HEX64.fullmatch(oid) or not NAME_RE.fullmatch(ns) or not NAME_RE.fullmatch(name):
            raise ApiError(403, "Upload URL is not valid: ask the LFS batch endpoint for a new one")
        try:
            size, exp = int(self.query["size"][0]), int(self.query["exp"][0])
            sig = self.query["sig"][0]
        except (KeyError, ValueError, IndexError):
            raise ApiError(403, "Upload URL is not signed: ask the LFS batch endpoint for a new one") from None
        expected = self._sign(kind, ns, name, oid, size, exp).encode()
        if not hmac.compare_digest(sig.encode("utf-8", "replace"), expected) or exp < time.time():
            raise ApiError(403, "Upload URL signature is invalid or expired: ask the LFS batch endpoint again")
        if size > self.server.limits.max_lfs_size:
            raise ApiError(413, f"LFS object of {size} bytes is larger than this hub's limit")
        if self._body.length is not None and self._body.length != size:
            raise bad(f"Content-Length {self._body.length} differs from the signed size {size}")
        rdir = self.server.store.repo_dir(kind, ns, name)
        self.server.store.put_lfs(rdir, oid, size, self._body.read)
        self._json({"success": True})

    def _lfs_verify(self, kind: str, ns: str, name: str) -> None:
        rdir, _ = self._repo(kind, ns, name, write=f"uploading to {ns}/{name}")
        body = self._read_json(LFS_VERIFY)
        oid, size = body["oid"], body["size"]
        if not HEX64.fullmatch(oid) or self.server.store.lfs_size(rdir, oid) != size:
            raise ApiError(404, f"LFS object {oid} ({size} bytes) is not stored in {ns}/{name}")
        self._json({"success": True})
