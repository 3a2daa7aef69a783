"""Training of LCSS (and DSM / SSM / FD-SSM) diffusion priors with PyTorch Lightning.

``train(config)`` runs one training (``lcss-prior train`` is a thin CLI over it) and ends with
``export_prior`` of the EMA weights into ``<out>/prior``. Output folder::

    <out>/config.json             the resolved TrainConfig
    <out>/checkpoints/last.ckpt   Lightning checkpoint, written atomically every N steps
    <out>/checkpoints/best.ckpt   lowest mean training loss over a checkpoint interval (optional)
    <out>/tb/                     TensorBoard scalars (loss, grad norm, lr, step time, peak memory)
    <out>/samples/step_*.png      sample grids of the EMA network
    <out>/prior/                  the exported prior (lcss_prior.export)

Resuming is bit-for-bit on CPU: every random draw is a function of ``(seed, global step, rank)``
(``derive_seed``): the batch of step ``k`` (``StepBatches``), the diffusion times and noise of the
loss and the classifier-free-guidance label dropout. The learning rate is a pure function of the
step, and the network, EMA network, optimiser state and step counter come back from the
checkpoint. The data source is step-indexed and starts at the restored step, which avoids
Lightning's mid-epoch resume caveat.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lcss_prior.data import build_dataset
from lcss_prior.ema import ema_decay, ema_update
from lcss_prior.export import Prior, export_prior, fsync_dir
from lcss_prior.losses import METHODS as LOSS_METHODS
from lcss_prior.losses import SDELoss
from lcss_prior.model import PRESETS, EpsNetwork, build_unet
from lcss_prior.sampling import sample_prior, save_grid
from lcss_prior.sde import build_sde

METHODS = tuple(LOSS_METHODS)  # the objectives lcss_prior.losses implements

# Defaults per data set; anything not listed falls back to TrainConfig's own default.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"resolution": 8, "preset": "tiny", "batch_size": 64, "steps": 4000},
    # Rendering a 32 px shapes item takes ~0.2 s on one core: 2000 views (100 per caption), each
    # rendered once and kept in memory (or in a --data-cache file shared between runs).
    "shapes": {
        "resolution": 32,
        "preset": "tiny",
        "batch_size": 32,
        "steps": 3000,
        "data_size": 2000,
        "data_cache": "memory",
    },
    "folder": {"resolution": 32, "preset": "tiny", "batch_size": 32, "steps": 10000},
}

# Settings that define a run: a resumed run must keep them (the rest may change on resume).
RUN_DEFINING = (
    "data",
    "data_size",
    "resolution",
    "method",
    "sde",
    "sde_kwargs",
    "smoothing",
    "weighting",
    "reduction",
    "preset",
    "block_out_channels",
    "layers_per_block",
    "input_scaling",
    "output_scaling",
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "ema_decay",
    "p_uncond",
    "seed",
)

LEGACY_DEFAULTS: dict[str, Any] = {"output_scaling": "none"}
"""Run-defining settings added after runs were saved without them: the value those runs used."""

# Independent random streams of one step.
STREAM_PERMUTATION, STREAM_LOSS, STREAM_SAMPLES = 0, 1, 2


#: strategy name prefixes refused by ``TrainConfig.validate`` (besides spawning and forking ones)
UNSUPPORTED_STRATEGIES = ("fsdp", "deepspeed")


class ConfigError(ValueError):
    """A bad training setting, found before any training starts."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (``lcss-prior train`` flags map one to one)."""

    data: str = "digits"  # "digits", "shapes" or an image-folder path
    data_size: int | None = None  # shapes only: number of rendered views
    data_cache: str | None = None  # shapes only: "memory" or a file (rendered once, reused)
    out_dir: str = "runs/prior"
    resolution: int | None = None  # None: the data set's default (DATA_DEFAULTS)
    method: str = "lcss"
    sde: str = "vp"
    sde_kwargs: dict[str, Any] = field(default_factory=dict)
    smoothing: float = 0.01  # LCSS radius c (s_t = c std(t)); c^4 D / 2 << 1 (losses.lcss_relative_bias)
    weighting: str | None = None  # None: the loss's default
    reduction: str = "mean"  # per-dimension loss scale: gradient norms O(1) at any resolution
    preset: str | None = None
    block_out_channels: list[int] | None = None
    layers_per_block: int | None = None
    input_scaling: str = "edm"
    output_scaling: str = "edm"  # eps_hat = c_skip x_t + c_out F (model.EpsNetwork); "none": eps_hat = F
    batch_size: int | None = None  # per device
    steps: int | None = None  # total optimiser steps
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    keep_best: bool = False
    sample_every: int = 500
    n_samples: int = 36
    sample_steps: int = 100
    log_every: int = 10
    num_workers: int = 0
    progress: bool = True
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def resolved(self) -> TrainConfig:
        """A copy with the data set's defaults filled in and every value checked (``ConfigError``)."""
        kind = self.data if self.data in ("digits", "shapes") else "folder"
        cfg = dataclasses.replace(self, sde_kwargs=dict(self.sde_kwargs))
        for key, value in DATA_DEFAULTS[kind].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}"
                )

        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {list(METHODS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("input_scaling", "output_scaling"):
            if getattr(self, name) not in ("edm", "none"):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be 'edm' or 'none', got {getattr(self, name)!r}"
                )
        for name in (
            "resolution",
            "batch_size",
            "steps",
            "lr",
            "smoothing",
            "checkpoint_every",
            "sample_every",
        ):
            positive(name)
        for name in ("log_every", "n_samples", "sample_steps", "num_nodes"):
            positive(name)
        for name in ("warmup_steps", "weight_decay", "grad_clip", "num_workers"):
            positive(name, allow_zero=True)
        if self.method == "lcss" and self.smoothing >= 1.0:
            raise ConfigError(
                f"--smoothing must be < 1 for LCSS, got {self.smoothing!r}: at c >= 1 the smoothed objective "
                "is unbounded below (docs/lcss_math.md section 4); keep c^4 D / 2 << 1 (default 0.01)"
            )
        strategy = str(self.strategy).lower()
        if strategy.startswith(UNSUPPORTED_STRATEGIES) or any(w in strategy for w in ("spawn", "fork", "notebook")):
            raise ConfigError(
                f"--strategy {self.strategy!r} is not supported: sharded strategies (fsdp, deepspeed) split the "
                "parameters that rank 0 needs whole for the EMA, the sample grids and the export, and spawning "
                "or forking strategies (ddp_spawn, ddp_fork, ddp_notebook, ...) return no training loop to the launching process (no prior is "
                "exported); use --strategy ddp (or auto) and launch one process per device"
            )
        if self.method == "lcss" and str(self.precision).startswith("bf16"):
            raise ConfigError(
                f"--precision {self.precision} with --method lcss: LCSS's Stein term divides the difference of two "
                "network outputs (about 1% apart at --smoothing 0.01) by the radius, and bfloat16 rounds each "
                "output to about 0.4%; measured on the shipped shapes prior (benchmarks/lcss_precision.py), the "
                "parameter gradient's error is 0.7-1.1x its own sampling noise (cosine 0.52-0.62 to float32's; "
                "DSM's under bf16: 0.06-0.07x, cosine 0.99+). Use --precision 32-true or 16-mixed (0.1-0.2x, "
                "cosine 0.96-0.98), or --method dsm"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"--p-uncond must be in [0, 1), got {self.p_uncond!r}")
        if self.data != "shapes" and (self.data_size is not None or self.data_cache is not None):
            raise ConfigError(
                f"--data-size and --data-cache apply to --data shapes only (not {self.data!r}: they would "
                "be ignored)"
            )
        if self.data_size is not None and self.data_size < 1:
            raise ConfigError(f"--data-size must be > 0, got {self.data_size!r}")
        if int(self.steps) != self.steps:
            raise ConfigError(f"--steps must be an integer, got {self.steps!r}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed!r}")


# --------------------------------------------------------------------------------------------------
# randomness as a function of (seed, step, rank)
# --------------------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on all of ``keys`` (numpy ``SeedSequence`` mixing)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def step_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


class StepBatches(IterableDataset):
    """The batches of steps ``start_step, ..., end_step - 1``; the batch of step ``k`` on rank ``r``
    depends only on ``(seed, k, r)``.

    Sample position ``p = (k * world_size + r) * batch_size + j`` reads item ``perm_e[p mod N]`` of
    the data set, where ``perm_e`` is the permutation of epoch ``e = p // N`` seeded by
    ``(seed, e)``: every item once per epoch, in an order that no resume can change. Data-loader
    workers take every ``num_workers``-th step; the loader interleaves them back in order.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if len(dataset) == 0:
            raise ConfigError("the training data set is empty")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.end_step = int(end_step)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = step_generator("cpu", self.seed, STREAM_PERMUTATION, epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """Data-set indices of the batch of ``step`` on this rank."""
        n = len(self.dataset)
        first = (step * self.world_size + self.rank) * self.batch_size
        return [int(self._permutation(p // n)[p % n]) for p in range(first, first + self.batch_size)]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in self.indices(step)]
        labels = [-1 if it.get("label") is None else int(it["label"]) for it in items]
        return {
            "image": torch.stack([torch.as_tensor(it["image"], dtype=torch.float32) for it in items]),
            "label": torch.tensor(labels, dtype=torch.long),
            "step": torch.tensor(step, dtype=torch.long),
        }

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start_step + worker, self.end_step, n_workers):
            yield self.batch(step)


# --------------------------------------------------------------------------------------------------
# Lightning pieces
# --------------------------------------------------------------------------------------------------


#: the checkpoint entry holding :func:`checkpoint_digest` of its tensors
INTEGRITY_KEY = "lcss_tensors_sha256"


def checkpoint_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 over every tensor of a checkpoint (weights, EMA, optimiser state, ...) with its key
    path: a zip entry's bytes can change without torch.load noticing, which would resume from other
    weights without a word."""
    digest = hashlib.sha256()

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{prefix}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                visit(f"{prefix}[{i}]", item)

    visit("", {k: v for k, v in checkpoint.items() if k != INTEGRITY_KEY})
    return digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the same folder and moved into place with
    ``os.replace``: a crash never leaves a truncated ``last.ckpt`` behind. Each carries the SHA-256
    of its tensors (``INTEGRITY_KEY``), checked when a run resumes from it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        checkpoint = {**checkpoint, INTEGRITY_KEY: checkpoint_digest(checkpoint)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()


def remove_orphaned_checkpoint_files(folder: str | Path) -> list[Path]:
    """Delete ``.<name>.ckpt.tmp-<pid>`` files of processes that no longer run (a kill during a
    checkpoint write leaves them; the real checkpoint was never touched). Returns what was removed."""
    removed = []
    for path in Path(folder).glob(".*.ckpt.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class StepCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` every ``every_n_steps`` optimiser steps and at the last step, and, with
    ``keep_best``, ``best.ckpt`` when the mean training loss of the interval is the lowest so far."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_best: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.keep_best = keep_best
        self.best = math.inf
        self._losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.dirpath.is_dir():
            remove_orphaned_checkpoint_files(self.dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.keep_best and outputs is not None:
            self._losses.append(float(outputs["loss"].detach()))
        step = trainer.global_step
        if step % self.every_n_steps != 0 and step < (trainer.max_steps or math.inf):
            return
        bad = [name for name, p in pl_module.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
        # every decision here is taken by all ranks together (DDP): a rank that raised or skipped a save
        # alone would leave the others waiting in the next collective call until the timeout
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):  # never replace a good checkpoint
            bad = bad or ["(on another rank)"]
            raise FloatingPointError(
                f"non-finite weights at step {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                f"not saved: {self.dirpath / 'last.ckpt'} still holds the last good step"
            )
        if self.keep_best and self._losses:
            # the interval's mean loss over all ranks, so that every rank makes the same decision
            local = torch.tensor(float(np.mean(self._losses)), dtype=torch.float64, device=pl_module.device)
            mean = float(trainer.strategy.reduce(local, reduce_op="mean"))
            self._losses = []
            if mean < self.best:
                self.best = mean
                trainer.save_checkpoint(self.dirpath / "best.ckpt", weights_only=False)
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict.get("best", math.inf))


def _peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory, or the process's maximum resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class PriorTrainingModule(pl.LightningModule):
    """One noise-predicting network trained with ``SDELoss``, its EMA copy, and the run's metadata.

    ``config`` is ``dataclasses.asdict(TrainConfig)`` (resolved); ``data_info`` holds what the
    export needs from the data set (``captions``, ``channels``, ``resolution``, ``n_levels``), so
    that a checkpoint alone can be exported.
    """

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = self.cfg = TrainConfig(**{**LEGACY_DEFAULTS, **config})
        self.sde = build_sde(cfg.sde, **cfg.sde_kwargs)
        captions = list(data_info["captions"])
        with torch.random.fork_rng(devices=[]):  # initial weights: a function of the seed only
            torch.manual_seed(derive_seed(cfg.seed))
            unet = build_unet(
                int(data_info["resolution"]),
                int(data_info["channels"]),
                len(captions),
                cfg.preset,
                block_out_channels=cfg.block_out_channels,
                layers_per_block=cfg.layers_per_block,
            )
        self.net = EpsNetwork(
            unet,
            self.sde,
            input_scaling=cfg.input_scaling,
            output_scaling=cfg.output_scaling,
            p_uncond=cfg.p_uncond,
        )
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        self.loss_fn = build_loss(self.sde, cfg)
        self.skipped_overflow_steps = 0  # float16 overflows the loss scaler skipped
        self.data_info = dict(data_info)
        self.dataset: Any = None  # attached by ``train``; not part of the checkpoint
        self._t_last: float | None = None

    # -- data ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("PriorTrainingModule.dataset must be set before fitting")
        batches = StepBatches(
            self.dataset,
            self.cfg.batch_size,
            self.cfg.seed,
            start_step=self.trainer.global_step,  # restored from the checkpoint when resuming
            end_step=self.trainer.max_steps,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
        )
        return DataLoader(
            batches,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant: ``lr * min(1, (step + 1) / warmup)``."""
        if self.cfg.warmup_steps <= 0:
            return self.cfg.lr
        return self.cfg.lr * min(1.0, (step + 1) / self.cfg.warmup_steps)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        if int(batch["step"]) != step:
            raise RuntimeError(f"data stream out of step: batch of step {int(batch['step'])} at step {step}")
        x0, labels = batch["image"], batch["label"]
        gen = step_generator(x0.device, self.cfg.seed, STREAM_LOSS, step, self.global_rank)
        if self.net.null_class is not None:
            labels = self.net.drop_labels(labels, gen)
        else:
            labels = None
        losses = self.loss_fn(self.net, x0, labels, generator=gen)
        loss = losses.mean()
        if self._on_any_rank(not bool(torch.isfinite(loss))):  # all ranks stop together
            raise FloatingPointError(
                f"non-finite training loss {float(loss)} at step {step}"
                + ("" if not torch.isfinite(loss) else " on another rank")
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the number of processes the global batch (--batch per device) was split over
        checkpoint["world_size"] = int(self.trainer.world_size)

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` of this rank, or-ed over all ranks (Lightning's collective boolean reduction), so
        that a decision to stop is taken by every rank at once; without a trainer, ``flag``."""
        if self._trainer is None:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _gradient_scaler(self) -> Any:
        """The float16 loss scaler of ``--precision 16-mixed`` (``None`` for every other precision)."""
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        return getattr(plugin, "scaler", None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.detach().norm() for p in self.net.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        if not torch.isfinite(norm) and self._gradient_scaler() is not None:
            # a float16 overflow: the scaler skips this step and lowers its scale (recoverable)
            self.skipped_overflow_steps += 1
            warnings.warn(
                f"float16 gradient overflow at step {self.global_step}: the loss scaler skips this step "
                f"({self.skipped_overflow_steps} skipped so far) and lowers its scale",
                stacklevel=2,
            )
            return
        if not torch.isfinite(norm):
            # before clipping and the step: the weights and the EMA are still those of the last step
            # (under DDP the gradients are already averaged, so every rank stops here together)
            raise FloatingPointError(
                f"non-finite gradients at step {self.global_step} (the loss was finite); the weights were "
                f"not updated and the checkpoints in {checkpoint_dir(self.cfg.out_dir)} are intact: resume "
                "with --resume, with a lower --lr or a --grad-clip"
            )
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        step = self.trainer.global_step  # steps completed before this one
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step(closure=optimizer_closure)
        ema_update(self.ema_net, self.net, ema_decay(step, self.cfg.ema_decay))
        self.log("train/lr", lr, on_step=True, on_epoch=False)

    # -- logging and samples ---------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == 0 or self._t_last is None:
            self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        self._t_last = now
        b = batch["image"].shape[0] * self.trainer.world_size
        self.log("perf/step_time_s", dt, on_step=True, on_epoch=False)
        self.log("perf/images_per_s", b / dt if dt > 0 else 0.0, on_step=True, on_epoch=False)
        self.log("perf/peak_mem_gib", _peak_memory_gib(self.device), on_step=True, on_epoch=False)
        step = self.trainer.global_step
        if step % self.cfg.sample_every == 0 or step >= self.trainer.max_steps:
            self.write_samples(step)
            self._t_last = time.perf_counter()  # sampling time is not step time

    def ema_prior(self) -> Prior:
        """The EMA network as an in-memory ``Prior`` (shares its weights)."""
        info = self.data_info
        return Prior(
            self.ema_net,
            self.sde,
            resolution=info["resolution"],
            channels=info["channels"],
            captions=info["captions"],
            null_class=self.ema_net.null_class,
            n_levels=info.get("n_levels"),
        )

    def write_samples(self, step: int) -> Path | None:
        """A PNG grid of ``n_samples`` EMA samples (labels cycling over the captions), also logged to
        TensorBoard. Only on global rank 0."""
        if not self.trainer.is_global_zero:
            return None
        prior = self.ema_prior()
        n = self.cfg.n_samples
        k = len(prior.captions)
        labels = [i % k for i in range(n)] if k > 0 else None
        images = sample_prior(
            prior,
            labels,
            n,
            method="euler_maruyama",
            steps=self.cfg.sample_steps,
            seed=derive_seed(self.cfg.seed, STREAM_SAMPLES),
            progress=False,
        )
        nrow = max(1, int(math.ceil(math.sqrt(n))))
        path = save_grid(images, Path(self.cfg.out_dir) / "samples" / f"step_{step:07d}.png", nrow=nrow)
        logger = self.logger
        if isinstance(logger, TensorBoardLogger):
            from torchvision.utils import make_grid

            grid = make_grid(((images + 1) / 2).clamp(0, 1), nrow=nrow, padding=2)
            logger.experiment.add_image("samples", grid, global_step=step)
        return path


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def build_loss(sde: Any, cfg: TrainConfig) -> SDELoss:
    """The run's ``lcss_prior.losses.SDELoss``."""
    kwargs: dict[str, Any] = {"method": cfg.method, "smoothing": cfg.smoothing, "reduction": cfg.reduction}
    if cfg.weighting is not None:
        kwargs["weighting"] = cfg.weighting
    return SDELoss(sde, **kwargs)


def check_objective(cfg: TrainConfig) -> None:
    """Build the SDE and the loss once, so that a bad combination fails before training."""
    try:
        sde = build_sde(cfg.sde, **cfg.sde_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--sde {cfg.sde!r}: {e}") from e
    try:
        build_loss(sde, cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--method {cfg.method!r}: {e}") from e


def load_training_data(cfg: TrainConfig) -> Any:
    """The training data set (``lcss_prior.data.build_dataset``); errors become ``ConfigError``."""

    if cfg.data not in ("digits", "shapes") and not Path(cfg.data).is_dir():
        raise ConfigError(f"--data {cfg.data!r} is neither 'digits', 'shapes' nor an existing image folder")
    kwargs: dict[str, Any] = {}
    if cfg.data == "shapes":
        kwargs["return_geometry"] = False
        if cfg.data_size is not None:
            kwargs["size"] = cfg.data_size
        if cfg.data_cache is not None:
            kwargs["cache"] = cfg.data_cache
    try:
        dataset = build_dataset(cfg.data, cfg.resolution, "train", cfg.seed, **kwargs)
        if len(dataset) == 0:
            raise ConfigError(f"--data {cfg.data!r} holds no images")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the data module's own message, made a config error
        raise ConfigError(f"cannot load --data {cfg.data!r}: {e}") from e
    return dataset


def data_info_of(dataset: Any, cfg: TrainConfig) -> dict[str, Any]:
    """What the export needs from the data set."""
    return {
        "captions": [str(c) for c in (getattr(dataset, "captions", None) or [])],
        "channels": int(dataset.channels),
        "resolution": int(getattr(dataset, "resolution", cfg.resolution)),
        "n_levels": getattr(dataset, "n_levels", None),
        "data": cfg.data,
    }


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def read_checkpoint_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, data_info)`` stored in a training checkpoint (clear error if it is not one)."""
    config, info, _ = read_checkpoint(path)
    return config, info


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """``(config, data_info, world_size)`` of a training checkpoint, its tensors checked against
    their SHA-256 (``world_size`` ``None`` for checkpoints written before it was recorded)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hp = ckpt["hyper_parameters"]
        config, info = {**LEGACY_DEFAULTS, **hp["config"]}, dict(hp["data_info"])
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path} is not an lcss-prior training checkpoint: {e}") from e
    saved = ckpt.get(INTEGRITY_KEY)  # checkpoints written before the digest existed have none
    if saved is not None and saved != checkpoint_digest(ckpt):
        raise ConfigError(
            f"{path} is corrupted: its tensors' SHA-256 differs from the one saved with them; resume from "
            "another checkpoint (e.g. best.ckpt) or start a new run"
        )
    world_size = ckpt.get("world_size")
    return config, info, None if world_size is None else int(world_size)


def check_world_size(path: str | Path, saved: int | None, world_size: int, cfg: TrainConfig) -> None:
    """A resumed run must split its steps over as many processes as the saved one (``saved``, from
    ``read_checkpoint``): ``--batch`` is per device, so other ``--devices``/``--num-nodes`` would
    silently change the global batch (and the data each step sees). Checkpoints written before the
    world size was recorded (``saved`` is ``None``) are not checked."""
    if saved is not None and int(saved) != int(world_size):
        raise ConfigError(
            f"--devices {cfg.devices!r} --num-nodes {cfg.num_nodes!r} give {world_size} process(es), but {path} was "
            f"trained on {saved}: the global batch would change from {cfg.batch_size * int(saved)} to "
            f"{cfg.batch_size * world_size} (--batch {cfg.batch_size} is per device); resume with "
            f"{saved} process(es), or start a new run"
        )


def make_trainer(cfg: TrainConfig, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """The Lightning ``Trainer`` of a run; distribution comes from Lightning's own flags."""
    devices: Any = cfg.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return pl.Trainer(
        accelerator=cfg.accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        max_steps=int(cfg.steps),
        max_epochs=-1,
        gradient_clip_val=cfg.grad_clip if cfg.grad_clip > 0 else None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=cfg.log_every,
        logger=TensorBoardLogger(save_dir=cfg.out_dir, name="tb", version="", default_hp_metric=False),
        callbacks=[StepCheckpoint(checkpoint_dir(cfg.out_dir), cfg.checkpoint_every, cfg.keep_best)]
        + list(callbacks or []),
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=cfg.progress,
        enable_model_summary=cfg.progress,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # StepBatches shards by rank itself
    )


def check_network(module: PriorTrainingModule, cfg: TrainConfig) -> None:
    """One forward pass of a zero image through the network before anything is written: a UNet
    that cannot take the data's resolution (``--resolution 30`` with three down-sampling levels)
    is a ``ConfigError`` naming the flags, not a traceback at the first step."""
    info = module.data_info
    x = torch.zeros(1, info["channels"], info["resolution"], info["resolution"])
    try:
        with torch.no_grad():
            module.net(x, torch.full((1,), 0.5))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"the network does not fit the data: --resolution {info['resolution']} with --preset "
            f"{cfg.preset!r} / --block-out-channels {cfg.block_out_channels!r} failed on a test image "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); the resolution must be divisible by 2 "
            "for every down-sampling level"
        ) from e


def checked_trainer(cfg: TrainConfig) -> pl.Trainer:
    """``make_trainer``, with Lightning's errors about the distribution flags as one ``ConfigError``
    naming them (raised before the run folder is written)."""
    try:
        return make_trainer(cfg)
    except Exception as e:  # noqa: BLE001 - Lightning raises several types for unusable flags
        flags = (
            f"--accelerator {cfg.accelerator!r} --devices {cfg.devices!r} --num-nodes {cfg.num_nodes!r} "
            f"--strategy {cfg.strategy!r} --precision {cfg.precision!r}"
        )
        raise ConfigError(f"Lightning cannot run with {flags}: {str(e).splitlines()[0]}") from e


def prepare_run(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, Path | None]:
    """Check the output folder against ``resume`` and, when resuming, merge the checkpoint's
    settings. Never deletes or overwrites anything; every problem is a ``ConfigError``."""
    ckpt_dir = checkpoint_dir(cfg.out_dir)
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if resume is None:
        if existing or (Path(cfg.out_dir) / "prior").exists():
            raise ConfigError(
                f"{cfg.out_dir} already holds a run ({', '.join(p.name for p in existing) or 'prior/'}); "
                "pass --resume to continue it or choose another --out"
            )
        return cfg, None
    path = ckpt_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    saved, _ = read_checkpoint_config(path)
    for key in RUN_DEFINING:
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"{key} = {getattr(cfg, key)!r} differs from the resumed run's {saved.get(key)!r} ({path}); "
                "a resumed run keeps the settings that define it"
            )
    return cfg, path


def merge_resumed_config(saved: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """The resumed run's config: the checkpoint's run-defining settings, with ``given`` (only the
    settings the user set explicitly) overriding the others. A conflicting run-defining setting is
    a ``ConfigError``."""
    merged = dict(saved)
    for key, value in given.items():
        if value is None:
            continue
        if key in RUN_DEFINING and saved.get(key) != value:
            raise ConfigError(
                f"--{key.replace('_', '-')} {value!r} differs from the resumed run's {saved.get(key)!r}; "
                "a resumed run keeps the settings that define it"
            )
        merged[key] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in merged.items() if k in known})


def train(cfg: TrainConfig, resume: str | None = None, dataset: Any = None) -> Path:
    """Train (or, with ``resume`` = ``"last"`` or a checkpoint path, continue) a prior; returns the
    exported prior folder ``<out>/prior``. ``dataset`` overrides ``cfg.data`` (for tests/API use).
    All settings and the output folder are checked before any training starts."""
    cfg = cfg.resolved()
    check_objective(cfg)
    if dataset is None:
        dataset = load_training_data(cfg)
    cfg, ckpt_path = prepare_run(cfg, resume)
    info = data_info_of(dataset, cfg)
    if ckpt_path is not None:
        _, saved_info, saved_world_size = read_checkpoint(ckpt_path)
        if saved_info["captions"] != info["captions"] or saved_info["channels"] != info["channels"]:
            raise ConfigError(f"the data set no longer matches the one {ckpt_path} was trained on")
    try:
        module = PriorTrainingModule(dataclasses.asdict(cfg), info)
    except ValueError as e:  # build_unet's checks (levels against the resolution, widths, groups)
        raise ConfigError(f"the network does not fit the data: {e}") from e
    module.dataset = dataset
    check_network(module, cfg)
    trainer = checked_trainer(cfg)
    if ckpt_path is not None:
        check_world_size(ckpt_path, saved_world_size, trainer.world_size, cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", encoding="utf-8")
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
    if trainer.global_step < cfg.steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {cfg.steps}")
    prior_dir = out / "prior"
    if trainer.is_global_zero:
        export_module(module, prior_dir, steps=trainer.global_step, wall_time_s=time.perf_counter() - start)
    return prior_dir


def export_module(
    module: PriorTrainingModule, out_dir: str | Path, steps: int, overwrite: bool = True, **extra: Any
) -> Path:
    """``export_prior`` of the module's EMA network, with the run's settings and the resolved loss
    configuration (``SDELoss.config`` under ``"loss"``) as training info."""
    cfg, info = module.cfg, module.data_info
    training = {k: getattr(cfg, k) for k in RUN_DEFINING}
    training.update(loss=module.loss_fn.config, steps=int(steps), weights="ema", **extra)
    return export_prior(
        module.ema_net,
        module.sde,
        out_dir,
        info["captions"],
        info["resolution"],
        info["channels"],
        module.ema_net.null_class,
        training,
        n_levels=info.get("n_levels"),
        overwrite=overwrite,
    )


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export the EMA weights of a training checkpoint as a prior folder (``lcss-prior export``)."""
    config, info = read_checkpoint_config(checkpoint)
    module = PriorTrainingModule(config, info)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    return export_module(
        module,
        out_dir,
        steps=int(state.get("global_step", 0)),
        overwrite=overwrite,
        checkpoint=str(checkpoint),
    )
