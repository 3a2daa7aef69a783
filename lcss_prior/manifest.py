"""Manifests of shipped model folders: what trained them and a checksum of every file.

A model folder (an exported prior, a depth checkpoint) may hold ``MANIFEST.json``::

    {"name": ..., "command": ..., "commit": ..., "trained": {...}, "quality": {...},
     "files": {"relative/path": {"sha256": ..., "bytes": ...}, ...}}

The public loaders (``lcss_prior.export.load_prior``, ``threestudio_ssd.depth.load_depth_estimator``)
call :func:`verify_manifest` first: every listed file must exist with its size and SHA-256, and a
missing or corrupted one is one :class:`ManifestError` naming it. Folders without a manifest (a
user's own prior) load as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"


class ManifestError(ValueError):
    """A shipped model folder does not match its manifest (missing, truncated or corrupted file)."""


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every regular file under ``folder`` except the manifest, as sorted POSIX relative paths."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    return sorted(p.relative_to(folder).as_posix() for p in files)


def write_manifest(folder: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/MANIFEST.json``: ``info`` plus the size and SHA-256 of every file."""
    folder = Path(folder)
    files = {
        rel: {"sha256": sha256(folder / rel), "bytes": (folder / rel).stat().st_size}
        for rel in list_files(folder)
    }
    manifest = {**info, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none; a malformed one is a ``ManifestError``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path} has no 'files' table of checksums")
    return manifest


def verify_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Check every file listed in ``folder/MANIFEST.json`` (size, then SHA-256); returns the
    manifest (None without one). Raises ``ManifestError`` naming the first missing or corrupted
    file and what to do."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for rel, entry in manifest["files"].items():
        path = folder / rel
        hint = "restore it with `git checkout -- <file>` (or re-run the command in MANIFEST.json)"
        if not path.is_file():
            raise ManifestError(f"{path} is missing (listed in {folder / MANIFEST}); {hint}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ManifestError(
                f"{path} is corrupted: {size} bytes, {folder / MANIFEST} says {entry.get('bytes')}; {hint}"
            )
        if sha256(path) != entry.get("sha256"):
            raise ManifestError(
                f"{path} is corrupted: its SHA-256 differs from {folder / MANIFEST}; {hint}"
            )
    return manifest
