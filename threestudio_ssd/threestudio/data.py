"""``stein-random-camera-datamodule``: threestudio's ``random-camera-datamodule`` whose training
draws resume exactly.

threestudio's training cameras come from the global RNGs (``torch.rand``, ``random.random`` in
``RandomCameraIterableDataset.collate``), and so does the renderer's ray jitter. Lightning neither
saves those RNGs in a checkpoint nor draws batches in step order (it fetches one batch ahead), so a
run resumed from ``resume=<ckpt>`` sees other cameras and jitter than the uninterrupted run would
have, even though every parameter, optimiser moment and the guidance's own noise stream are
restored.

Here every random draw of a training step is a function of the step instead of the RNGs' history:

* camera batch ``i`` (the ``i``-th training batch) is drawn with the global RNGs seeded
  ``derive_seed(base, CAMERA_STREAM, i)`` and restored afterwards (the look-ahead fetch disturbs
  nothing); the data module's checkpoint state is the number of batches training has used, so a
  resumed run continues with batch ``i`` = the first step it runs;
* ``steindreamer-system`` seeds the global RNGs ``derive_seed(base, STEP_STREAM, step)`` when a
  training step starts (:func:`seed_step`), so the renderer's jitter is the step's own.

Tested by ``tests/integration/test_kill_resume.py``: SIGKILL during a step or a checkpoint write,
resume, and every tensor of the final checkpoint equals the uninterrupted run's.

``base`` is the seed Lightning's ``seed_everything`` was given (``PL_GLOBAL_SEED``: threestudio's
launcher passes ``seed + rank``, so data-parallel ranks draw different cameras). Validation and
test cameras are deterministic already and unchanged. Draws are independent across batches as
before; only their source changed, so an uninterrupted run sees different cameras than under
``random-camera-datamodule`` but from the same distribution.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from threestudio.data.uncond import RandomCameraDataModule, RandomCameraIterableDataset

from lcss_prior.train import derive_seed
from threestudio_ssd.threestudio.registry import register

CAMERA_STREAM = 0
STEP_STREAM = 1


def base_seed() -> int:
    """The seed ``pytorch_lightning.seed_everything`` set (``PL_GLOBAL_SEED``), 0 without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def seed_global_rngs(seed: int, cuda: bool = True) -> None:
    """Seed NumPy's, Python's and torch's global RNGs (the CPU one, and with ``cuda`` every CUDA
    device's)."""
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Run the body with the CPU global RNGs (torch, NumPy, Python) seeded ``seed``; their previous
    states are back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_global_rngs(seed, cuda=False)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def seed_step(step: int) -> None:
    """Seed the global RNGs for training step ``step`` (module docstring)."""
    seed_global_rngs(derive_seed(base_seed(), STEP_STREAM, step))


class ResumableRandomCameraIterableDataset(RandomCameraIterableDataset):
    """Batch ``i`` is drawn from seed ``derive_seed(base, CAMERA_STREAM, i)``; ``next_index`` is ``i``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.base = base_seed()
        self.next_index = 0

    def collate(self, batch: Any) -> dict[str, Any]:
        index, self.next_index = self.next_index, self.next_index + 1
        with seeded_global_rngs(derive_seed(self.base, CAMERA_STREAM, index)):
            return super().collate(batch)


@register("stein-random-camera-datamodule")
class ResumableRandomCameraDataModule(RandomCameraDataModule):
    """``random-camera-datamodule`` (same config keys) with resumable training draws."""

    _resume_index = 0

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit"):
            self.train_dataset = ResumableRandomCameraIterableDataset(self.cfg)
            self.train_dataset.next_index = self._resume_index

    def batches_used(self) -> int:
        """Training batches handed to training steps so far (the fetched-ahead one excluded)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self.batches_used()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_batches" not in state_dict:
            raise KeyError(
                f"the checkpoint's {type(self).__qualname__} state has no 'train_batches' "
                f"(keys: {sorted(state_dict)}); it was not written by this data module"
            )
        self._resume_index = int(state_dict["train_batches"])
        if hasattr(self, "train_dataset"):
            self.train_dataset.next_index = self._resume_index
