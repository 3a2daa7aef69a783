"""A threestudio root with this repository installed as an extension, without touching the checkout.

threestudio runs from its root (``launch.py``, ``threestudio/``, ``load/``, ``extern/``) and loads
extensions from ``custom/``. :func:`make_extension_root` builds such a root in a new folder from
symlinks -- the checkout's four entries plus ``custom/threestudio-ssd`` pointing at this
repository, exactly how a user clones the extension -- so tests and benchmarks run the real
``launch.py`` machinery against a read-only checkout (``$THREESTUDIO_SRC``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: what a threestudio root needs from the checkout
CHECKOUT_ENTRIES = ("launch.py", "threestudio", "load", "extern")
#: this repository (the folder holding ``threestudio_ssd/``)
REPO = Path(__file__).resolve().parents[2]


def make_extension_root(
    threestudio_src: str | os.PathLike, dest: str | os.PathLike, repo: str | os.PathLike = REPO
) -> Path:
    """Create ``dest`` (new or empty) as a threestudio root: symlinks ``dest/<entry>`` to the
    checkout's ``launch.py``, ``threestudio/``, ``load/``, ``extern/`` and
    ``dest/custom/threestudio-ssd`` to ``repo``. Raises naming what the checkout lacks."""
    src, dest = Path(threestudio_src).resolve(), Path(dest)
    missing = [e for e in CHECKOUT_ENTRIES if not (src / e).exists()]
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
