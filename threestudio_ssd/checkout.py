"""The pinned threestudio, on any machine, and a threestudio root with this extension installed.

:func:`get_threestudio` is the one way the project obtains threestudio (tests, demo, benchmarks,
``python -m threestudio_ssd.checkout``, which prints the path):

1. ``$THREESTUDIO_SRC`` if it is set (a checkout of the user's choice; it must look like one);
2. else the snapshot of the pinned commit next to the repository,
   ``../shared/vendor/threestudio-<short>.tar.gz`` (how CI and the project's machines get it),
   extracted once into the cache folder;
3. else ``git clone`` of threestudio and ``git checkout`` of the pinned commit into the cache folder
   (how a user on the internet gets it).

The cache folder is ``$THREESTUDIO_SSD_CACHE``, else ``$XDG_CACHE_HOME/threestudio-ssd``, else
``~/.cache/threestudio-ssd``; never inside the repository. A checkout there is complete only once
its marker file names the pinned commit: an interrupted extraction or clone is redone, not used.

threestudio runs from its root (``launch.py``, ``threestudio/``, ``load/``, ``extern/``) and loads
extensions from ``custom/``. :func:`make_extension_root` builds such a root in a new folder from
symlinks -- the checkout's four entries plus ``custom/threestudio-ssd`` pointing at this
repository, exactly how a user clones the extension -- so tests, the demo and benchmarks run the
real ``launch.py`` machinery against a read-only checkout.

This module imports neither torch nor threestudio.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: the threestudio commit this project is tested against (v0.2.3 line, 2024-12-16)
THREESTUDIO_COMMIT = "28d9d80d9d00f308244adfcf3be8b17ca0cb6465"
THREESTUDIO_URL = "https://github.com/threestudio-project/threestudio"
#: what a threestudio root needs from the checkout
CHECKOUT_ENTRIES = ("launch.py", "threestudio", "load", "extern")
#: this repository (the folder holding ``threestudio_ssd/``)
REPO = Path(__file__).resolve().parents[1]
#: the snapshot of the pinned commit that the project's machines and CI have beside the repository
VENDOR_SNAPSHOT = REPO.parent / "shared" / "vendor" / f"threestudio-{THREESTUDIO_COMMIT[:7]}.tar.gz"
MARKER = ".threestudio-ssd-commit"


def cache_root() -> Path:
    """``$THREESTUDIO_SSD_CACHE``, else ``$XDG_CACHE_HOME/threestudio-ssd``, else ``~/.cache/...``."""
    if os.environ.get("THREESTUDIO_SSD_CACHE"):
        return Path(os.environ["THREESTUDIO_SSD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "threestudio-ssd"


def missing_entries(path: str | os.PathLike) -> list[str]:
    """What a threestudio checkout at ``path`` lacks (empty: it is one)."""
    path = Path(path)
    return [e for e in (*CHECKOUT_ENTRIES, "threestudio/__init__.py") if not (path / e).exists()]


def _log(message: str) -> None:
    print(f"[threestudio-ssd] {message}", file=sys.stderr, flush=True)


def _extract_snapshot(snapshot: Path, into: Path) -> Path:
    """Extract a ``threestudio/`` tarball into the new folder ``into``; returns the checkout."""
    with tarfile.open(snapshot) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe members
            tar.extractall(into, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(into)
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1 or missing_entries(tops[0]):
        raise RuntimeError(
            f"{snapshot} is not a threestudio snapshot (expected one folder with {list(CHECKOUT_ENTRIES)})"
        )
    return tops[0]


def _clone(into: Path) -> Path:
    """``git clone`` threestudio into ``into/threestudio`` and check out the pinned commit."""
    if shutil.which("git") is None:
        raise RuntimeError("git is not installed, and there is no threestudio snapshot to extract")
    dest = into / "threestudio"
    for cmd in (
        ["git", "clone", "--quiet", THREESTUDIO_URL, str(dest)],
        ["git", "-C", str(dest), "checkout", "--quiet", THREESTUDIO_COMMIT],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return dest


def get_threestudio(snapshot: str | os.PathLike | None = None, allow_clone: bool = True) -> Path:
    """The path of a threestudio checkout (see the module docstring for the order tried).

    ``snapshot`` overrides the vendored tarball's location; ``allow_clone=False`` never touches the
    network (tests). Raises one error naming what was tried when nothing works."""
    env = os.environ.get("THREESTUDIO_SRC")
    if env:
        missing = missing_entries(env)
        if missing:
            raise FileNotFoundError(
                f"THREESTUDIO_SRC={env} is not a threestudio checkout: it lacks {missing}"
            )
        return Path(env).resolve()

    dest = cache_root() / f"threestudio-{THREESTUDIO_COMMIT[:7]}"
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == THREESTUDIO_COMMIT and not missing_entries(dest):
        return dest

    snapshot = Path(snapshot) if snapshot is not None else VENDOR_SNAPSHOT
    if not snapshot.is_file() and not allow_clone:
        raise FileNotFoundError(
            f"no threestudio: THREESTUDIO_SRC is unset, {dest} holds no complete checkout and the "
            f"snapshot {snapshot} does not exist (cloning is disabled here)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=dest.parent) as tmp:
        if snapshot.is_file():
            _log(f"extracting {snapshot.name} (threestudio {THREESTUDIO_COMMIT[:7]}) into {dest}")
            checkout = _extract_snapshot(snapshot, Path(tmp))
        else:
            _log(f"cloning {THREESTUDIO_URL} at {THREESTUDIO_COMMIT[:7]} into {dest}")
            checkout = _clone(Path(tmp))
        (checkout / MARKER).write_text(THREESTUDIO_COMMIT + "\n")
        if dest.exists():  # an incomplete earlier attempt
            shutil.rmtree(dest)
        os.replace(checkout, dest)  # atomic: a checkout is either complete or absent
    return dest


def make_extension_root(
    threestudio_src: str | os.PathLike, dest: str | os.PathLike, repo: str | os.PathLike = REPO
) -> Path:
    """Create ``dest`` (new or empty) as a threestudio root: symlinks ``dest/<entry>`` to the
    checkout's ``launch.py``, ``threestudio/``, ``load/``, ``extern/`` and
    ``dest/custom/threestudio-ssd`` to ``repo``. Raises naming what the checkout lacks."""
    src, dest = Path(threestudio_src).resolve(), Path(dest)
    missing = missing_entries(src)
    if missing:
        raise FileNotFoundError(f"{src} is not a threestudio checkout: it lacks {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; make_extension_root needs a new or empty folder")
    for entry in CHECKOUT_ENTRIES:
        (dest / entry).symlink_to(src / entry, target_is_directory=(src / entry).is_dir())
    (dest / "custom").mkdir()
    (dest / "custom" / "threestudio-ssd").symlink_to(Path(repo).resolve(), target_is_directory=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m threestudio_ssd.checkout``: print the path of the pinned threestudio."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m threestudio_ssd.checkout", description=main.__doc__)
    parser.add_argument(
        "--snapshot",
        default=None,
        help=f"threestudio tarball (default {VENDOR_SNAPSHOT.name} "
        "in ../shared/vendor beside the repository)",
    )
    parser.add_argument("--no-clone", action="store_true", help="never git clone (fail instead)")
    args = parser.parse_args(argv)
    try:
        print(get_threestudio(args.snapshot, allow_clone=not args.no_clone))
    except (OSError, RuntimeError) as err:
        print(f"python -m threestudio_ssd.checkout: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
