"""The threestudio adapter: the only part of the project that imports threestudio.

Importing this package makes ``import threestudio`` work on this machine (placeholders for
missing CUDA-only packages, ``get_device`` on the CPU when there is no GPU; see ``cpu.py``) and
registers, once, the extension's classes:

* ``stein-dense-volume-renderer`` (``renderer.py``)
* ``stein-prior-prompt-processor`` (``prompt_processor.py``)
* ``stein-score-distillation-guidance`` (``guidance.py``)
* ``steindreamer-system`` (``system.py``)
"""

from threestudio_ssd.threestudio import cpu

cpu.setup_cpu()

from threestudio_ssd.threestudio import guidance, prompt_processor, renderer, system  # noqa: E402
from threestudio_ssd.threestudio.registry import REGISTERED_NAMES  # noqa: E402

__all__ = ["REGISTERED_NAMES", "cpu", "guidance", "prompt_processor", "renderer", "system"]
