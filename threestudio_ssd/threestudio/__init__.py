"""The threestudio adapter: the only part of the project that imports threestudio.

Importing this package makes ``import threestudio`` work on this machine (placeholders for
missing CUDA-only packages, ``get_device`` on the CPU when there is no GPU; see ``cpu.py``) and
registers, once, the extension's classes (and the ``${ssd_model:<name>}`` config resolver, the
folder of a model shipped in ``models/``):

* ``stein-dense-volume-renderer`` (``renderer.py``)
* ``stein-prior-prompt-processor`` (``prompt_processor.py``)
* ``stein-score-distillation-guidance`` (``guidance.py``)
* ``steindreamer-system`` (``system.py``)
* ``stein-vertex-color-mesh-exporter`` (``exporter.py``)
* ``stein-mesh-rasterizer`` (``mesh_renderer.py``): ``nvdiff-rasterizer`` plus rendered depth
* ``stein-random-camera-datamodule`` (``data.py``): threestudio's random cameras, resumable exactly
"""

from omegaconf import OmegaConf

from threestudio_ssd.shipped import shipped_model
from threestudio_ssd.threestudio import cpu

cpu.setup_cpu()
# configs name the shipped models as ${ssd_model:<name>} (threestudio_ssd.shipped), so they work from
# any working directory; launch.py loads extensions before it resolves the config
if not OmegaConf.has_resolver("ssd_model"):
    OmegaConf.register_new_resolver("ssd_model", lambda name: str(shipped_model(name)))

from threestudio_ssd.threestudio import (  # noqa: E402
    data,
    exporter,
    guidance,
    mesh_renderer,
    prompt_processor,
    renderer,
    system,
)
from threestudio_ssd.threestudio.registry import REGISTERED_NAMES  # noqa: E402

__all__ = ["REGISTERED_NAMES", "cpu", "data", "exporter", "mesh_renderer", "guidance", "prompt_processor", "renderer", "system"]
