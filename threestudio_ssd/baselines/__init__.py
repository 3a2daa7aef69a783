"""Baseline functions ``phi(image, render)`` for Stein Score Distillation (docs/ARCHITECTURE.md,
docs/depth.md): ``constant`` (SSD = SDS), ``depth`` and ``normal`` (SteinDreamer's), behind one
interface and a registry.
"""

from threestudio_ssd.baselines.base import (
    Baseline,
    BaselineOutput,
    ConstantBaseline,
    RenderOutputs,
    build_baseline,
    register_baseline,
    registered_baselines,
)
from threestudio_ssd.baselines.geometric import DepthBaseline, NormalBaseline
from threestudio_ssd.baselines.ops import (
    depth_to_disparity,
    depth_to_normals,
    depth_to_points,
    masked_pearson,
    median_mad_normalize,
    ray_directions,
    scale_shift_align,
    world_to_camera_normals,
)

__all__ = [
    "Baseline",
    "BaselineOutput",
    "ConstantBaseline",
    "DepthBaseline",
    "NormalBaseline",
    "RenderOutputs",
    "build_baseline",
    "register_baseline",
    "registered_baselines",
    "depth_to_disparity",
    "depth_to_normals",
    "depth_to_points",
    "masked_pearson",
    "ray_directions",
    "median_mad_normalize",
    "scale_shift_align",
    "world_to_camera_normals",
]
