"""Data sets: procedural ``shapes`` renders, scikit-learn ``digits``, and image folders.

Every data set yields dicts with ``image [C, H, W]`` in ``[-1, 1]``, ``label`` (an index into
``captions``) and ``caption``, and exposes ``captions``, ``channels``, ``resolution`` and
``n_levels`` (the number of quantisation levels of the data, for dequantised likelihoods).
"""

from .shapes import CAPTIONS, ShapesDataset, camera_c2w, camera_rays, parse_caption, render_scene
