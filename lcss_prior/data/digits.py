"""scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``; ships with the package).

1797 grey images, pixel values the integers ``0..16`` (17 levels). They map to ``[-1, 1]`` exactly
by ``x = 2 v / 16 - 1``, so the data live on the 17-point grid ``{-1, -7/8, ..., 7/8, 1}``
(spacing 1/8); ``n_levels = 17`` tells likelihood code how to dequantise (uniform noise of one bin
width, ``2 / (n_levels - 1)``, not the 8-bit ``2 / 255``).

Split (fixed for a given ``seed``; the default ``seed=0`` is the documented one): a permutation of
the 1797 indices by ``numpy.random.default_rng(seed)``; its first ``TEST_SIZE = 360`` entries
(20 %) are ``"test"``, the other 1437 are ``"train"``; each split keeps file order.

``resolution`` may be 8 or a multiple of 8: larger images are nearest-neighbour upsampled by an
integer factor, which keeps the 17 levels exact (a diffusers ``UNet2DModel`` with several down
blocks needs 16 or 32).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "N_DIGITS", "TEST_SIZE"]

N_DIGITS = 1797
TEST_SIZE = 360
_MAX_VALUE = 16


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's images ``[1797, 8, 8]`` (values 0..16) and targets, read once per process."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if data.images.shape != (N_DIGITS, 8, 8):
        raise RuntimeError(f"unexpected sklearn digits shape {data.images.shape}")
    images, targets = data.images.copy(), data.target.copy()
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def _split_indices(split: str, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(N_DIGITS)
    chosen = order[:TEST_SIZE] if split == "test" else order[TEST_SIZE:]
    return np.sort(chosen)


class DigitsDataset(Dataset):
    """Handwritten digits ``0..9`` as ``[1, R, R]`` images in ``[-1, 1]`` on 17 exact levels.

    Items: ``image`` (``2 v / 16 - 1``), ``label`` (the digit), ``caption`` (``"digit <d>"``).
    """

    channels = 1
    n_levels = _MAX_VALUE + 1
    captions = [f"digit {d}" for d in range(10)]

    def __init__(self, split: str = "train", resolution: int = 8, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, test")
        if resolution < 8 or resolution % 8:
            raise ValueError(
                f"resolution must be 8 or a multiple of 8 (integer nearest upsampling keeps the 17 "
                f"levels exact), got {resolution}"
            )
        images, targets = _load_raw()
        idx = _split_indices(split, seed)
        values = torch.as_tensor(images[idx], dtype=torch.float32)[:, None]  # [N, 1, 8, 8]
        if resolution > 8:
            values = F.interpolate(values, scale_factor=resolution // 8, mode="nearest")
        self.images = values * (2.0 / _MAX_VALUE) - 1.0
        self.labels = torch.as_tensor(targets[idx], dtype=torch.long)
        self.indices = torch.as_tensor(idx)  # positions in load_digits(), for traceability
        self.split = split
        self.seed = int(seed)
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"image": self.images[index], "label": label, "caption": self.captions[label]}
