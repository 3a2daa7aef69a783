"""Evaluation of real runs: ``ssd-eval`` (``cli.py``) and the functions behind it.

* ``views`` -- find a run's test views, split threestudio's panel grids (``PanelLayout``), read
  its test cameras (``TestCameras``).
* ``clip`` -- ``load_clip`` (local open_clip weights), CLIP similarity and R-precision.
* ``groundtruth`` -- IoU and PSNR against the true object of a ``shapes`` prompt.
* ``mesh`` -- mesh checks and the Chamfer distance (torch; pytorch3d when installed).
* ``video`` -- ``make_video`` (mp4 / GIF), the one video writer of the project.
* ``report`` -- ``evaluate_run`` and the JSON + one-page PNG report.

FID/KID are ``lcss_prior.metrics`` (``ssd-eval fid`` calls it). Heavy third-party packages
(open_clip, trimesh, imageio, matplotlib) are imported inside the functions that use them.
"""

from .clip import ClipModel, clip_scores, clip_similarity, load_clip, r_precision_hits
from .groundtruth import mask_iou, psnr, shapes_metrics, true_views
from .mesh import (
    chamfer_distance,
    find_exported_meshes,
    load_mesh,
    mesh_chamfer,
    mesh_stats,
    reference_mesh,
    sample_surface,
)
from .report import evaluate_run, plot_report, write_report
from .video import make_video, read_video_frames
from .views import PanelLayout, TestCameras, Views, find_test_views, list_images, load_views, read_run_config
