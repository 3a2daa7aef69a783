"""The CPU launcher behind ``python -m threestudio_ssd.launch`` (arguments: see ``launch.py``).

With a GPU it defers to threestudio's own ``launch.py`` ``main``. Without one it does what that
``main`` does -- ``load_custom_modules``, ``load_config``, seeding, data module and system, the
checkpoint / learning-rate / code- and config-snapshot callbacks, TensorBoard and CSV loggers, then
fit+test, validate, test or predict(export) -- with threestudio's own functions, except that the
Lightning trainer is ``Trainer(accelerator="cpu", devices=1, ...)`` (``launch.py`` hard-codes
``accelerator="gpu"``, and ``trainer.accelerator=cpu`` cannot override it).

Working directory. threestudio expects to run from its checkout (``custom/`` and ``load/`` are
relative paths). When the working directory is not a checkout, ``--threestudio-root`` (or
``$THREESTUDIO_SRC``) provides ``threestudio`` and its ``custom/`` extensions; outputs and relative
paths in the config then stay relative to the working directory. The GPU route calls
``launch.py``'s ``main`` unchanged, which needs the checkout as working directory, so it changes
into it (the config path is made absolute first).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import threestudio

from threestudio_ssd.threestudio import cpu
from threestudio_ssd.threestudio.registry import REGISTERED_NAMES


def import_launch_module(root: str):
    """threestudio's ``launch.py`` as a module (its ``main`` runs only under ``__main__``)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("launch")
    if os.path.dirname(os.path.abspath(module.__file__)) != root:
        raise ImportError(f"'launch' was imported from {module.__file__}, not from the checkout {root}")
    return module


@contextmanager
def working_directory(path: str):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_extensions(launch, root: str) -> None:
    """threestudio's ``load_custom_modules`` on ``<root>/custom`` (from any working directory)."""
    if not os.path.isdir(os.path.join(root, "custom")):
        return
    with working_directory(root):
        launch.load_custom_modules()


def check_registration() -> list[str]:
    """Our names, each registered exactly once (the registry is a dict; we check it holds ours)."""
    missing = [name for name in REGISTERED_NAMES if name not in threestudio.__modules__]
    if missing or not REGISTERED_NAMES:
        raise RuntimeError(f"threestudio_ssd classes are not registered: {missing or 'none at all'}")
    return list(REGISTERED_NAMES)


def run(args: argparse.Namespace, extras: list[str], root: str) -> None:
    """Entry point of ``python -m threestudio_ssd.launch`` after argument parsing; ``root`` is the
    threestudio checkout (``threestudio_ssd.launch.find_threestudio_root``)."""
    launch = import_launch_module(root)
    if cpu.cuda_available():
        args.config = os.path.abspath(args.config)
        with working_directory(root):
            launch.main(args, extras)
        return
    run_on_cpu(args, extras, launch, root)


def _configure_logging(launch, args: argparse.Namespace) -> None:
    logger = logging.getLogger("pytorch_lightning")
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    for handler in logger.handlers:
        if getattr(handler, "stream", None) is sys.stderr and not args.gradio:
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            handler.addFilter(launch.ColoredFilter())


def run_on_cpu(
    args: argparse.Namespace, extras: list[str], launch, root: str, extra_callbacks: Sequence[Any] = ()
) -> None:
    """``launch.py``'s ``main`` with a CPU trainer (see the module docstring). ``extra_callbacks``
    (Lightning callbacks) join threestudio's for training, e.g. a benchmark's evaluation."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from threestudio.utils.callbacks import (
        CodeSnapshotCallback,
        ConfigSnapshotCallback,
        CustomProgressBar,
        ProgressCallback,
    )
    from threestudio.utils.config import load_config
    from threestudio.utils.misc import get_rank

    _configure_logging(launch, args)
    load_extensions(launch, root)
    names = check_registration()
    threestudio.info(f"threestudio_ssd registered: {', '.join(names)} (CPU run, no CUDA)")

    cfg = load_config(args.config, cli_args=extras, n_gpus=1)
    pl.seed_everything(cfg.seed + get_rank(), workers=True)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system, resumed=cfg.resume is not None)
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))

    callbacks, loggers = [], []
    if args.train:
        callbacks += [
            ModelCheckpoint(dirpath=os.path.join(cfg.trial_dir, "ckpts"), **cfg.checkpoint),
            LearningRateMonitor(logging_interval="step"),
            CodeSnapshotCallback(os.path.join(cfg.trial_dir, "code"), use_version=False),
            ConfigSnapshotCallback(
                args.config, cfg, os.path.join(cfg.trial_dir, "configs"), use_version=False
            ),
        ]
        if args.gradio:
            callbacks.append(ProgressCallback(save_path=os.path.join(cfg.trial_dir, "progress")))
        else:
            callbacks.append(CustomProgressBar(refresh_rate=1))
        callbacks += list(extra_callbacks)
        os.makedirs(os.path.join(cfg.trial_dir, "tb_logs"), exist_ok=True)
        loggers += [
            TensorBoardLogger(cfg.trial_dir, name="tb_logs"),
            CSVLogger(cfg.trial_dir, name="csv_logs"),
        ] + system.get_loggers()
        with open(os.path.join(cfg.trial_dir, "cmd.txt"), "w") as f:
            f.write("python -m threestudio_ssd.launch " + " ".join(sys.argv[1:]) + "\n" + str(args) + "\n")

    trainer = pl.Trainer(
        callbacks=callbacks,
        logger=loggers,
        inference_mode=False,
        accelerator="cpu",
        devices=1,
        **cfg.trainer,
    )

    def restore_status(ckpt_path: str | None) -> None:
        # validate/test/export cannot resume epoch and step by themselves (as in launch.py)
        if ckpt_path is not None:
            ckpt = torch.load(ckpt_path, map_location="cpu")
            system.set_resume_status(ckpt["epoch"], ckpt["global_step"])

    start = time.perf_counter()
    if args.train:
        trainer.fit(system, datamodule=dm, ckpt_path=cfg.resume)
        threestudio.info(f"training took {time.perf_counter() - start:.1f} s")
        trainer.test(system, datamodule=dm)
        if args.gradio:
            trainer.predict(system, datamodule=dm)
    elif args.validate:
        restore_status(cfg.resume)
        trainer.validate(system, datamodule=dm, ckpt_path=cfg.resume)
    elif args.test:
        restore_status(cfg.resume)
        trainer.test(system, datamodule=dm, ckpt_path=cfg.resume)
    elif args.export:
        restore_status(cfg.resume)
        trainer.predict(system, datamodule=dm, ckpt_path=cfg.resume)
