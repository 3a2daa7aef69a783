"""``build_dataset``: one entry point from a name (``"shapes"``, ``"digits"``) or a folder path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from .digits import DigitsDataset
from .folder import ImageFolderDataset
from .shapes import ShapesDataset

__all__ = ["DATASETS", "SHAPES_DEFAULT_SIZE", "build_dataset"]

#: Default number of items of the procedural ``shapes`` splits (override with ``size=``).
SHAPES_DEFAULT_SIZE = {"train": 10000, "test": 1000}
_SPLITS = ("train", "test")


def _build_shapes(resolution: int, split: str, seed: int, **kwargs) -> Dataset:
    kwargs.setdefault("size", SHAPES_DEFAULT_SIZE[split])
    return ShapesDataset(resolution=resolution, seed=seed, split=split, **kwargs)


def _build_digits(resolution: int, split: str, seed: int, **kwargs) -> Dataset:
    return DigitsDataset(split=split, resolution=resolution, seed=seed, **kwargs)


#: Named data sets; anything else is read as an image folder.
DATASETS: dict[str, Callable[..., Dataset]] = {"shapes": _build_shapes, "digits": _build_digits}


def build_dataset(
    name_or_path: str | Path, resolution: int, split: str = "train", seed: int = 0, **kwargs
) -> Dataset:
    """Build a data set by name (``DATASETS``) or from an image folder.

    For a folder, ``<folder>/<split>`` is used when it exists; otherwise the folder itself serves
    the ``"train"`` split and asking for ``"test"`` is an error (no silent reuse of training data).
    Extra ``kwargs`` go to the data set's constructor (e.g. ``size=`` for ``shapes``,
    ``channels=`` for folders).
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(_SPLITS)}")
    name = str(name_or_path)
    if name in DATASETS:
        return DATASETS[name](resolution, split, seed, **kwargs)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"unknown data set {name!r}: not one of {', '.join(DATASETS)} and not an existing folder"
        )
    if (path / split).is_dir():
        path = path / split
    elif split != "train":
        raise ValueError(
            f"image folder {path} has no {split!r} subfolder; a folder without splits is train only"
        )
    return ImageFolderDataset(path, resolution, **kwargs)
