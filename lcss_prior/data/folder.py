"""Any folder of images, for real use.

Layout: with ``class_from_subfolder=True`` (default) every direct subfolder of ``root`` is a class
(``label`` = index in the sorted subfolder names, ``caption`` = the subfolder name with ``_`` and
``-`` read as spaces); images may sit at any depth below their class folder. With
``class_from_subfolder=False`` every image below ``root`` belongs to one class whose caption is the
root folder's name.

Each image is converted to RGB (``channels=3``) or grey (``channels=1``), its shorter side resized
to ``resolution`` (bicubic, PIL), centre-cropped to a square, quantised to 8 bits and mapped to
``[-1, 1]`` by ``x = 2 v / 255 - 1`` (``n_levels = 256``).

Construction fails fast, naming the folder or file: a missing root, no images with a known
extension (``IMAGE_EXTENSIONS``), or files that cannot be decoded (every file is checked with
``PIL.Image.verify`` and decoded once, with a progress bar for large folders; all bad files are
named).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _caption_from_name(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split())


class ImageFolderDataset(Dataset):
    """Images from a user folder as ``[C, R, R]`` tensors in ``[-1, 1]``, with labels and captions."""

    n_levels = 256

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        channels: int = 3,
        class_from_subfolder: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")

        if class_from_subfolder:
            loose = sorted(
                p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if loose:
                raise ValueError(
                    f"image folder {root} holds images directly ({', '.join(loose[:3])}"
                    f"{', ...' if len(loose) > 3 else ''}) but class_from_subfolder=True expects one "
                    "subfolder per class; move them into subfolders or pass class_from_subfolder=False"
                )
            classes = [(d.name, _images_below(d)) for d in sorted(root.iterdir()) if d.is_dir()]
            classes = [(name, files) for name, files in classes if files]
        else:
            files = _images_below(root)
            classes = [(root.resolve().name, files)] if files else []
        if not classes:
            raise ValueError(
                f"image folder {root} holds no images with a known extension ({', '.join(IMAGE_EXTENSIONS)})"
            )

        self.root = root
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.captions = [_caption_from_name(name) for name, _ in classes]
        self.files: list[Path] = []
        labels: list[int] = []
        for label, (_, files) in enumerate(classes):
            self.files += files
            labels += [label] * len(files)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self._verify()

    def _verify(self) -> None:
        """Decode every file once, up front: ``Image.verify`` alone reads headers and checksums,
        so a truncated JPEG passes it and then crashes training at the same step on every resume.
        All bad files are named in one error."""
        bad = []
        for path in tqdm(
            self.files, desc=f"decoding {self.root}", leave=False, disable=len(self.files) < 500
        ):
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:
                    im.load()
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                bad.append(f"{path} ({err})")
        if bad:
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ValueError(
                f"{len(bad)} image file(s) are corrupt or unreadable: {'; '.join(bad[:10])}{more}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> torch.Tensor:
        """Read one file: convert, resize the shorter side, centre-crop, quantise, map to [-1, 1]."""
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                scale = self.resolution / min(w, h)
                size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
                im = im.resize(size, Image.BICUBIC)
                left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
                im = im.crop((left, top, left + self.resolution, top + self.resolution))
                array = np.asarray(im, dtype=np.uint8)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"image file {path} is corrupt or unreadable: {err}") from err
        x = torch.from_numpy(array.copy()).float()
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return x / 127.5 - 1.0

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"image": self.load(self.files[index]), "label": label, "caption": self.captions[label]}
