"""Data sets: procedural ``shapes`` renders, scikit-learn ``digits``, and image folders.

Every data set yields dicts with ``image [C, H, W]`` in ``[-1, 1]``, ``label`` (an index into
``captions``) and ``caption``, and exposes ``captions``, ``channels``, ``resolution`` and
``n_levels`` (the number of quantisation levels of the data, for dequantised likelihoods).
``build_dataset(name_or_path, resolution, split, seed, **kwargs)`` builds any of them.
"""

from .digits import DigitsDataset
from .folder import ImageFolderDataset
from .registry import DATASETS, build_dataset
from .shapes import CAPTIONS, ShapesDataset, camera_c2w, camera_rays, parse_caption, render_scene
