"""Monocular depth estimators (transformers) behind one differentiable module; see docs/depth.md.

``load_depth_estimator`` loads any transformers depth checkpoint (folder or Hub id);
``threestudio_ssd.depth.train`` trains a small DPT on the ``shapes`` renders (``ssd-train-depth``).
"""

from threestudio_ssd.depth.estimator import (
    MODEL_TYPE_DEFAULTS,
    OUTPUT_KINDS,
    DepthEstimator,
    Preprocessing,
    load_depth_estimator,
)

__all__ = ["DepthEstimator", "Preprocessing", "load_depth_estimator", "MODEL_TYPE_DEFAULTS", "OUTPUT_KINDS"]
