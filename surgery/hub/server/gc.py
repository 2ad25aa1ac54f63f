"""Garbage collection: delete what no branch or tag can reach (left by aborted commits and unused LFS uploads).

An object is kept when it is reachable: a commit in the history (parents, transitively) of any branch head or tag,
a blob or LFS object named in the file table of such a commit. Everything else under a repo's ``commits/``,
``blobs/`` and ``lfs/`` goes: commit objects written just before a crash, blobs of commits that failed, LFS uploads
that no commit ever used. A repo whose refs or history cannot be read completely is left untouched.

GC needs the root to itself (an LFS object uploaded but not yet committed looks unreferenced), so it runs when a
server starts, under the root's lock, and from ``surgery hub gc --root DIR`` only while no server serves the root.
It also restores the modes every file should have (directories 0700, files 0600).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from surgery.hub.server.common import DIR_MODE, FILE_MODE, HEX40, HEX64, shard

logger = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What one collection removed (``skipped``: repos left alone because their history is unreadable)."""

    repos: int = 0
    commits: int = 0
    blobs: int = 0
    lfs: int = 0
    bytes: int = 0
    skipped: int = 0

    def __str__(self) -> str:
        return (
            f"{self.repos} repos checked: removed {self.commits} commits, {self.blobs} blobs and {self.lfs} LFS "
            f"objects ({self.bytes} bytes); {self.skipped} repos skipped"
        )


class _Unreadable(Exception):
    """A ref or commit object is missing or corrupt: collect nothing in this repo."""


def _stored(folder: Path, suffix: str = "") -> dict[str, Path]:
    """Objects stored under a sharded folder: ``{id: path}``."""
    out = {}
    for sub in folder.iterdir() if folder.is_dir() else []:
        for f in sub.iterdir() if sub.is_dir() else []:
            if f.name.endswith(suffix):
                out[sub.name + f.name[: len(f.name) - len(suffix)]] = f
    return out


def _reachable(rdir: Path) -> tuple[set[str], set[str], set[str]]:
    """Commit ids, blob oids and LFS oids reachable from the repo's branches and tags."""
    try:
        refs = json.loads((rdir / "refs.json").read_text())
        todo = list(refs["branches"].values()) + [t["commit"] for t in refs["tags"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise _Unreadable(f"refs: {err}") from None
    commits: set[str] = set()
    blobs: set[str] = set()
    lfs: set[str] = set()
    while todo:
        sha = todo.pop()
        if sha in commits:
            continue
        if not isinstance(sha, str) or not HEX40.fullmatch(sha):
            raise _Unreadable(f"bad commit id {sha!r}")
        try:
            commit = json.loads(shard(rdir / "commits", sha, ".json").read_text())
            for entry in commit["files"].values():
                if "lfs" in entry:
                    lfs.add(entry["lfs"]["oid"])
                else:
                    blobs.add(entry["oid"])
            todo.extend(commit["parents"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _Unreadable(f"commit {sha}: {err}") from None
        commits.add(sha)
    return commits, blobs, lfs


def _fix_modes(rdir: Path) -> None:
    for dirpath, _, files in os.walk(rdir):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, DIR_MODE)
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, name), FILE_MODE)


def collect_repo(rdir: Path, report: GcReport) -> None:
    """Collect one repo (see the module docstring); the caller holds the root."""
    report.repos += 1
    try:
        commits, blobs, lfs = _reachable(rdir)
    except _Unreadable as err:
        report.skipped += 1
        logger.warning("gc: skipping %s (%s)", rdir, err)
        return
    for folder, suffix, keep, field, pattern in (
        ("commits", ".json", commits, "commits", HEX40),
        ("blobs", "", blobs, "blobs", HEX40),
        ("lfs", "", lfs, "lfs", HEX64),
    ):
        for oid, path in _stored(rdir / folder, suffix).items():
            if oid in keep or not pattern.fullmatch(oid):
                continue
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                setattr(report, field, getattr(report, field) + 1)
                report.bytes += size
    _fix_modes(rdir)


def collect(root: Path | str) -> GcReport:
    """Collect every repo under ``root``; the caller must hold the root's lock (no server may be writing)."""
    report = GcReport()
    repos = Path(root) / "repos"
    for kind in sorted(repos.iterdir()) if repos.is_dir() else []:
        for ns in sorted(kind.iterdir()) if kind.is_dir() else []:
            for folder in (repos, kind, ns):
                with contextlib.suppress(OSError):
                    os.chmod(folder, DIR_MODE)
            for rdir in sorted(ns.iterdir()) if ns.is_dir() else []:
                if (rdir / "meta.json").is_file():
                    collect_repo(rdir, report)
    with contextlib.suppress(OSError):
        os.chmod(root, DIR_MODE)
    if report.commits or report.blobs or report.lfs:
        logger.info("gc: %s", report)
    return report
