"""LCSS against DSM, SSM and FD-SSM: cost per step, peak memory, quality and stability, measured side by side.

Three parts, all with the project's own code (``lcss_prior.train.PriorTrainingModule`` builds the
network, loss and optimiser; ``lcss_prior.train.train`` trains; ``lcss_prior.evaluate`` measures):

1. **Cost.** For each configuration (the ``digits`` and ``shapes`` training presets, and the
   networks of part 2), the four methods get the same network (same initial weights), the same
   batch and the same optimiser. In interleaved rounds (``for r in rounds: for m in shuffled
   methods``) each method runs ``k`` optimiser steps (label dropout, loss forward, backward,
   gradient clipping, AdamW step), timed by phase. Reported: median seconds per step and the
   median over rounds of the ratio to DSM *in the same round* (both saw the same machine load),
   with its inter-quartile range. Peak memory (``peak_memory_during``): in one fresh process with
   glibc's mmap threshold fixed at 64 KiB (freed tensors go back to the OS at once), per method
   after a warm-up step (optimiser state allocated) and ``malloc_trim``, the peak resident set
   (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the step;
   on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step. One
   ``torch.profiler`` step per method lists where the time goes.
2. **Quality.** Each method trains with the same seed, network, batch, data order and learning-rate
   schedule (``lcss_prior.train.train``, i.e. ``lcss-prior train``) for ``N`` steps (*equal steps*)
   and for ``k_m = round(N t_DSM / t_m)`` steps (*equal wall time*: DSM's budget of ``N`` steps,
   converted with the per-step times of part 1, which are robust to the shared machine's load in a
   way that sequential trainings are not). Training is bit-for-bit resumable, so the shorter run is
   the first segment of the longer one. Each EMA prior is measured on held-out data: bits/dim
   (probability-flow ODE, ``lcss_prior.likelihood``), FID and KID in the features of an in-domain
   classifier (``lcss_prior.metrics.train_feature_extractor``) and that classifier's accuracy on
   the generated samples against the caption each was generated for (overall and the worst
   caption). Stability: loss and gradient-norm curves (TensorBoard scalars of the runs), the count
   of non-finite logged values, divergence, final gradient norms.
3. **Output.** ``<out>/results.json``, ``<out>/*.png`` and the markdown section ``--report``.

SSM's double backprop through the UNet's self-attention needs PyTorch's *math* attention kernel
(the fused CPU flash kernel has no double backward), so every method runs under
``sdpa_kernel(MATH)``: the same network computation for all four.

    python benchmarks/score_matching.py --quick --out runs/sm-quick          # a few minutes
    python benchmarks/score_matching.py --no-progress                  # the report (2 CPUs: ~30 min)
    python benchmarks/score_matching.py --device cuda --digits-steps 4000 --digits-widths 32,64,64 \\
        --shapes-resolution 32 --shapes-steps 3000 --shapes-widths 32,64,64     # scaled up on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without ``pip install -e``
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402 - after the sys.path insert
from lcss_prior.losses import METHODS as LOSS_METHODS  # noqa: E402

METHODS = tuple(LOSS_METHODS)  # lcss_prior.losses' objectives, in its order (LCSS, DSM, SSM, FD-SSM)
LABELS = {"lcss": "LCSS", "dsm": "DSM", "ssm": "SSM", "fdssm": "FD-SSM"}
COLORS = {"lcss": "tab:red", "dsm": "tab:blue", "ssm": "tab:green", "fdssm": "tab:orange"}
PHASES = ("loss", "backward", "optimizer")
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetConfig:
    """One network + batch on which the four methods are compared."""

    name: str
    data: str  # "digits" or "shapes"
    resolution: int
    batch_size: int
    preset: str = "tiny"
    widths: tuple[int, ...] | None = None  # None: the preset's

    def describe(self) -> str:
        w = "preset " + self.preset if self.widths is None else "widths " + ",".join(map(str, self.widths))
        return f"{self.data} {self.resolution} px, {w}, batch {self.batch_size}"


def _train_config(cfg: NetConfig, method: str, **overrides: Any) -> Any:
    """The ``lcss_prior.train.TrainConfig`` of ``cfg`` trained with ``method`` (resolved)."""
    from lcss_prior.train import TrainConfig

    return TrainConfig(
        data=cfg.data,
        resolution=cfg.resolution,
        method=method,
        preset=cfg.preset,
        block_out_channels=None if cfg.widths is None else list(cfg.widths),
        batch_size=cfg.batch_size,
        progress=False,
        **overrides,
    ).resolved()


def _data_info(cfg: NetConfig) -> dict[str, Any]:
    """What ``PriorTrainingModule`` needs from the data set (captions, channels, resolution)."""
    from lcss_prior.data import DigitsDataset
    from lcss_prior.data.shapes import CAPTIONS

    if cfg.data == "digits":
        return {"captions": list(DigitsDataset.captions), "channels": 1, "resolution": cfg.resolution}
    if cfg.data == "shapes":
        return {"captions": list(CAPTIONS), "channels": 3, "resolution": cfg.resolution}
    raise ValueError(f"unknown data set {cfg.data!r} in configuration {cfg.name!r}; use digits or shapes")


def _batch(cfg: NetConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real training batch of ``cfg`` (images in [-1, 1], labels)."""
    from lcss_prior.data import build_dataset

    if cfg.data == "digits":
        ds = build_dataset("digits", cfg.resolution, "train", seed)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: cfg.batch_size]
        return ds.images[idx].clone(), ds.labels[idx].clone()
    ds = build_dataset("shapes", cfg.resolution, "train", seed, size=cfg.batch_size, return_geometry=False)
    items = ds.render_items(range(cfg.batch_size))
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


# --------------------------------------------------------------------------------------------------
# part 1: time and memory of one optimiser step
# --------------------------------------------------------------------------------------------------


class Stepper:
    """Network, loss and optimiser of one method exactly as ``PriorTrainingModule`` builds them,
    and one optimiser step on a fixed batch (label dropout, loss, backward, clipping, AdamW)."""

    def __init__(
        self, cfg: NetConfig, method: str, x0: torch.Tensor, labels: torch.Tensor, device: str
    ) -> None:
        from lcss_prior.train import PriorTrainingModule

        tcfg = _train_config(cfg, method)
        self.module = PriorTrainingModule(dataclasses.asdict(tcfg), _data_info(cfg)).to(device)
        self.net, self.loss_fn = self.module.net.train(), self.module.loss_fn
        self.optimizer = self.module.configure_optimizers()
        self.grad_clip = tcfg.grad_clip
        self.x0, self.labels = x0.to(device), labels.to(device)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(1234)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> dict[str, float]:
        """One optimiser step; seconds per phase (``PHASES``)."""
        t0 = self._sync()
        labels = self.net.drop_labels(self.labels, self.generator)
        loss = self.loss_fn(self.net, self.x0, labels, generator=self.generator).mean()
        t1 = self._sync()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = self._sync()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.optimizer.step()
        t3 = self._sync()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} while timing")
        return {"loss": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}


def time_methods(
    cfg: NetConfig,
    rounds: int,
    steps_per_round: int,
    device: str,
    seed: int,
    progress: bool = True,
    profile: bool = False,
) -> dict[str, Any]:
    """Interleaved timing (``harness.interleaved_rounds``) of one optimiser step of the four methods on
    ``cfg``, all with the same initial weights, batch and optimiser.

    Returns, per method: ``step_s`` (median seconds per step over rounds), ``phases_s`` (median per
    phase), ``ratio_to_dsm`` (median over rounds of ``t_m / t_DSM`` in the same round) with
    ``ratio_to_dsm_iqr``; ``lcss_over_ssm`` (the same for LCSS / SSM); ``params``; with
    ``profile``, the top operators of one profiled step per method."""
    x0, labels = _batch(cfg, seed)
    steppers = {m: Stepper(cfg, m, x0, labels, device) for m in METHODS}
    per_round = harness.interleaved_rounds(
        {m: st.step for m, st in steppers.items()},
        rounds,
        steps_per_round,
        seed,
        progress,
        f"timing {cfg.name}",
    )
    out: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "description": cfg.describe(),
        "params": sum(p.numel() for p in steppers["dsm"].net.parameters()),
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "methods": harness.summarize_rounds(per_round, "dsm"),
    }
    lcss_ssm = harness.summarize_rounds({"lcss": per_round["lcss"], "ssm": per_round["ssm"]}, "ssm")["lcss"]
    out["lcss_over_ssm"] = lcss_ssm["ratio_to_ssm"]
    out["lcss_over_ssm_iqr"] = lcss_ssm["ratio_to_ssm_iqr"]
    if profile:
        out["profile"] = profile_steps(steppers)
    return out


def profile_steps(steppers: dict[str, Stepper], top: int = 6) -> dict[str, list[dict[str, Any]]]:
    """The ``top`` operators by self CPU time of one ``torch.profiler``-profiled step per method."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for m, stepper in steppers.items():
        activities = [ProfilerActivity.CPU]
        if stepper.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            stepper.step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[m] = [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "share": e.self_cpu_time_total / total if total else float("nan"),
                "calls": e.count,
            }
            for e in rows
        ]
    return out


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of ``spec["steps"]`` optimiser steps per configuration and method (run in a
    fresh process, see ``measure_memory``).

    CPU: ``VmHWM - VmRSS`` around the steps, ``VmHWM`` reset with ``/proc/self/clear_refs``; CUDA:
    ``max_memory_allocated - memory_allocated``. The first method of each configuration is
    measured again at the end, to show that the order does not matter (``repeat``)."""
    torch.set_num_threads(int(spec["threads"]))
    device, order = spec["device"], list(spec["methods"])
    results: dict[str, Any] = {}
    for config in spec["configs"]:
        cfg = NetConfig(**{**config, "widths": _tuple(config["widths"])})
        x0, labels = _batch(cfg, int(spec["seed"]))
        res: dict[str, Any] = {}
        for i, m in enumerate(order + order[:1]):
            stepper = Stepper(cfg, m, x0, labels, device)
            with sdpa_kernel([SDPBackend.MATH]):
                stepper.step()  # warm-up: Adam state and the allocator's first touch
                delta, base = harness.peak_memory_during(
                    lambda st=stepper: [st.step() for _ in range(int(spec["steps"]))], device
                )
            key = m if i < len(order) else "repeat"
            res[key] = {"method": m, "peak_delta_mib": delta / MIB, "base_mib": base / MIB}
            del stepper
            harness.release_memory()
        results[cfg.name] = res
    return results


def _tuple(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in v)


def measure_memory(
    configs: list[NetConfig], device: str, threads: int, seed: int, steps: int = 2
) -> dict[str, Any]:
    """``memory_probe`` of ``configs`` in one fresh Python process with glibc's mmap threshold fixed
    at 64 KiB (methods in a seeded shuffled order); adds each method's ratio to DSM."""
    order = list(METHODS)
    random.Random(seed + 1).shuffle(order)
    spec = {
        "configs": [dataclasses.asdict(c) for c in configs],
        "device": device,
        "threads": threads,
        "seed": seed,
        "steps": steps,
        "methods": order,
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", json.dumps(spec)]
    try:
        results = harness.json_from_subprocess(command, timeout=3600, env=env)
    except RuntimeError as err:
        raise RuntimeError(f"memory probe failed ({err})") from err
    how = (
        "CUDA `max_memory_allocated` minus `memory_allocated` before the steps"
        if device.startswith("cuda")
        else "peak resident set (`VmHWM`, reset via `/proc/self/clear_refs`) minus the resident set "
        "before the steps, after a warm-up step and `malloc_trim`, in a fresh process with "
        "`MALLOC_MMAP_THRESHOLD_=65536` (freed tensors return to the OS)"
    )
    for res in results.values():
        dsm = res["dsm"]["peak_delta_mib"]
        for m in METHODS:
            res[m]["ratio_to_dsm"] = res[m]["peak_delta_mib"] / dsm if dsm > 0 else float("nan")
        res["order"] = order
        res["method"] = how
    return results


# --------------------------------------------------------------------------------------------------
# part 2: quality after equal steps and equal wall time
# --------------------------------------------------------------------------------------------------


@dataclass
class QualitySettings:
    """Sizes of one data set's quality comparison (command-line options)."""

    net: NetConfig
    steps: int
    warmup: int
    train_size: int | None  # shapes: rendered training views
    test_size: int | None  # shapes: rendered held-out views (digits: its fixed 360)
    classifier_steps: int
    classifier_feature_dim: int
    n_samples: int
    sample_steps: int
    bpd_samples: int
    bpd_tol: float
    log_every: int


def _datasets(
    q: QualitySettings, work: Path, seed: int, shapes_cache: str | None
) -> tuple[Any, Any, str | None]:
    """Training and held-out data sets of ``q`` (shapes are rendered once into cache files)."""
    from lcss_prior.data import build_dataset

    net = q.net
    if net.data == "digits":
        return (
            build_dataset("digits", net.resolution, "train", seed),
            build_dataset("digits", net.resolution, "test", seed),
            None,
        )
    cache = shapes_cache or str(work / f"shapes{net.resolution}-train-{q.train_size}.pt")
    kw = {"return_geometry": False}
    train = build_dataset("shapes", net.resolution, "train", seed, size=q.train_size, cache=cache, **kw)
    test_cache = work / f"shapes{net.resolution}-test-{q.test_size}.pt"
    test = build_dataset(
        "shapes", net.resolution, "test", seed, size=q.test_size, cache=str(test_cache), **kw
    )
    return train, test, cache


def _read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """All TensorBoard scalars below ``tb_dir`` as ``{tag: {step: value}}`` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(tb_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, {}).update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return out


def train_method(
    q: QualitySettings,
    method: str,
    step_targets: list[int],
    work: Path,
    train_set: Any,
    cache: str | None,
    seed: int,
    accelerator: str,
) -> dict[str, Any]:
    """Train ``method`` to each of ``step_targets`` (ascending; one run, resumed bit-for-bit) and
    keep the exported EMA prior of each as ``<run>/prior_step<k>``."""
    from lcss_prior.train import train

    run = work / q.net.data / method
    if run.exists():
        shutil.rmtree(run)
    overrides: dict[str, Any] = {
        "out_dir": str(run),
        "warmup_steps": q.warmup,
        "seed": seed,
        "checkpoint_every": max(step_targets),
        "sample_every": max(step_targets),
        "n_samples": 4,
        "sample_steps": 10,
        "log_every": q.log_every,
        "accelerator": accelerator,
        "devices": "1",
    }
    if q.net.data == "shapes":
        overrides.update(data_size=q.train_size, data_cache=cache)
    priors: dict[int, str] = {}
    info: dict[str, Any] = {"diverged": False, "error": None}
    start = time.perf_counter()
    for i, k in enumerate(step_targets):
        cfg = _train_config(q.net, method, steps=k, **overrides)
        try:
            prior = train(cfg, resume=None if i == 0 else "last", dataset=train_set)
        except FloatingPointError as e:  # the trainer stops at the first non-finite loss
            info.update(diverged=True, error=str(e))
            break
        kept = run / f"prior_step{k}"
        prior.rename(kept)
        priors[k] = str(kept)
    info["train_wall_s"] = time.perf_counter() - start
    scalars = _read_scalars(run / "tb")
    loss = scalars.get("train/loss", {})
    grad = scalars.get("train/grad_norm", {})
    step_time = list(scalars.get("perf/step_time_s", {}).values())
    steps = sorted(loss)
    grad_steps = sorted(grad)
    tail = grad_steps[-max(1, len(grad_steps) // 10) :]
    info.update(
        priors=priors,
        curve={
            "step": steps,
            "loss": [loss[s] for s in steps],
            "grad_step": grad_steps,
            "grad_norm": [grad[s] for s in grad_steps],
        },
        nonfinite_logged=int(sum(not math.isfinite(v) for v in [*loss.values(), *grad.values()])),
        final_grad_norm=grad[grad_steps[-1]] if grad_steps else float("nan"),
        final_grad_norm_median_last10pct=statistics.median(grad[s] for s in tail) if tail else float("nan"),
        lightning_step_s_median=statistics.median(step_time) if step_time else float("nan"),
    )
    return info


def evaluate_prior_dir(
    prior_dir: str, test_set: Any, extractor: Any, q: QualitySettings, seed: int, device: str
) -> dict[str, Any]:
    """``lcss_prior.evaluate.evaluate_prior`` (bpd, FID, KID, accuracy) of one exported prior."""
    from lcss_prior.evaluate import evaluate_prior
    from lcss_prior.export import load_prior

    prior = load_prior(prior_dir, device=device)
    report = evaluate_prior(
        prior,
        test_set,
        ("bpd", "fid", "kid", "accuracy"),
        extractor=extractor,
        n_samples=min(q.n_samples, len(test_set)),
        method="euler_maruyama",
        steps=q.sample_steps,
        seed=seed,
        bpd_samples=q.bpd_samples,
        bpd_tol=q.bpd_tol,
        batch_size=256,
        progress=False,
    )
    return report["metrics"]


def sample_grid_rows(
    priors: dict[str, str], q: QualitySettings, seed: int, device: str
) -> dict[str, torch.Tensor]:
    """Two samples per caption from each method's prior (same seed: same starting noise)."""
    from lcss_prior.export import load_prior
    from lcss_prior.sampling import sample_prior

    rows = {}
    for m, path in priors.items():
        prior = load_prior(path, device=device)
        n = 2 * len(prior.captions)
        labels = [i % len(prior.captions) for i in range(n)]
        rows[m] = sample_prior(
            prior, labels, n, method="euler_maruyama", steps=q.sample_steps, seed=seed, progress=False
        )
    return rows


def run_quality(
    q: QualitySettings,
    timing: dict[str, Any],
    work: Path,
    seed: int,
    device: str,
    shapes_cache: str | None,
    progress: bool = True,
    stages: harness.PhaseTimer | None = None,
) -> dict[str, Any]:
    """Part 2 on one data set: train all methods, measure equal-steps and equal-wall-time priors."""
    from lcss_prior.metrics import train_feature_extractor

    stages = stages or harness.PhaseTimer()
    data = q.net.data
    work.mkdir(parents=True, exist_ok=True)
    with stages.phase(f"{data} data"):
        train_set, test_set, cache = _datasets(q, work, seed, shapes_cache)
    with stages.phase(f"{data} feature classifier"):
        extractor = train_feature_extractor(
            train_set,
            q.classifier_steps,
            eval_dataset=test_set,
            feature_dim=q.classifier_feature_dim,
            seed=seed,
            progress=False,
        )
    # equal wall time: DSM's budget of q.steps steps, in each method's side-by-side step time
    ratios = {m: timing["methods"][m]["ratio_to_dsm"] for m in METHODS}
    wall_steps = {m: max(1, round(q.steps / ratios[m])) for m in METHODS}
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    out: dict[str, Any] = {
        "settings": {**dataclasses.asdict(q), "train_size": len(train_set), "test_size": len(test_set)},
        "feature_extractor": dict(getattr(extractor, "metrics", {})),
        "budget": {
            "equal_steps": q.steps,
            "equal_wall_time_steps": wall_steps,
            "wall_time_budget_s": q.steps * timing["methods"]["dsm"]["step_s"],
            "timing_config": timing["config"]["name"],
        },
        "runs": {},
        "equal_steps": {},
        "equal_wall_time": {},
    }
    bar = tqdm(METHODS, desc=f"quality {q.net.data}", disable=not progress, leave=False)
    for m in bar:
        targets = sorted({q.steps, wall_steps[m]})
        with stages.phase(f"{data} training"):
            run = train_method(q, m, targets, work, train_set, cache, seed, accelerator)
        out["runs"][m] = run
        for key, k in (("equal_steps", q.steps), ("equal_wall_time", wall_steps[m])):
            if k not in run["priors"]:
                out[key][m] = {"steps": k, "diverged": True}
            elif key == "equal_wall_time" and k == q.steps:
                out[key][m] = out["equal_steps"][m]  # the same prior
            else:
                with stages.phase(f"{data} evaluation"):
                    metrics = evaluate_prior_dir(run["priors"][k], test_set, extractor, q, seed, device)
                out[key][m] = {"steps": k, **metrics}
    equal = {m: out["runs"][m]["priors"][q.steps] for m in METHODS if q.steps in out["runs"][m]["priors"]}
    with stages.phase(f"{data} sample grid"):
        out["samples"] = sample_grid_rows(equal, q, seed, device)
    return out


# --------------------------------------------------------------------------------------------------
# part 3: plots, JSON, markdown
# --------------------------------------------------------------------------------------------------


def plot_timing(timing: dict[str, Any], memory: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(timing)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs = np.arange(len(names)) + (j - (len(METHODS) - 1) / 2) * width
        med = [timing[n]["methods"][m]["ratio_to_dsm"] for n in names]
        iqr = np.array([timing[n]["methods"][m]["ratio_to_dsm_iqr"] for n in names]).T
        err = np.abs(iqr - np.array(med))
        axes[0].bar(xs, med, width, yerr=err, color=COLORS[m], label=LABELS[m], capsize=2)
        mem = [memory[n][m]["ratio_to_dsm"] if n in memory else np.nan for n in names]
        axes[1].bar(xs, mem, width, color=COLORS[m], label=LABELS[m])
    for ax, title in zip(axes, ("time per step / DSM (median, IQR over rounds)", "peak step memory / DSM")):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].axhline(2.2, color="tab:red", ls="--", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: list[float], k: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < k or k < 2:
        return v
    return np.convolve(v, np.ones(k) / k, mode="valid")


def plot_curves(quality: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS) + 1, figsize=(16, 3.2))
    for ax, m in zip(axes, METHODS):
        c = quality["runs"][m]["curve"]
        k = max(1, len(c["loss"]) // 20)
        ax.plot(c["step"], c["loss"], color=COLORS[m], alpha=0.3, lw=0.8)
        ax.plot(c["step"][k - 1 :] if k > 1 else c["step"], _smooth(c["loss"], k), color=COLORS[m], lw=1.5)
        ax.set_title(f"{LABELS[m]} training loss", fontsize=10)
        ax.set_xlabel("step")
    ax = axes[-1]
    for m in METHODS:
        c = quality["runs"][m]["curve"]
        ax.semilogy(c["grad_step"], c["grad_norm"], color=COLORS[m], lw=1, label=LABELS[m])
    ax.set_title("gradient norm (before clipping)", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_samples(rows: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 0.9 * len(rows) + 0.4), squeeze=False)
    for ax, (m, x) in zip(axes[:, 0], rows.items()):
        img = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # N H W C
        strip = np.concatenate(list(img), axis=1)
        ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(LABELS[m], rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"


def _verdict(met: bool, resolved: bool) -> str:
    return ("yes" if met else "NO") + ("" if resolved else " (within noise)")


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets to report (not assert): measured value, ``met`` (point estimate) and ``resolved``
    (the inter-quartile range of the time ratios, or +- 2 standard errors of the bits/dim
    difference, lies on one side of the threshold). Bits/dim standard errors are combined as if
    independent, which overstates the noise of the (paired: same images, dequantisation and
    probes) difference."""
    rows = []

    def add(target: str, value: float | None, met: bool, resolved: bool, note: str = "") -> None:
        rows.append(
            {
                "target": target,
                "value": value,
                "met": met,
                "resolved": resolved,
                "verdict": _verdict(met, resolved),
                "note": note,
            }
        )

    for name, t in result["timing"].items():
        lc = t["methods"]["lcss"]
        lo, hi = lc["ratio_to_dsm_iqr"]
        add(
            f"{name}: LCSS step time <= 2.2x DSM",
            lc["ratio_to_dsm"],
            lc["ratio_to_dsm"] <= 2.2,
            hi <= 2.2 or lo > 2.2,
            f"IQR [{lo:.2f}, {hi:.2f}]",
        )
        lo, hi = t["lcss_over_ssm_iqr"]
        add(
            f"{name}: LCSS step time <= 0.6x SSM",
            t["lcss_over_ssm"],
            t["lcss_over_ssm"] <= 0.6,
            hi <= 0.6 or lo > 0.6,
            f"IQR [{lo:.2f}, {hi:.2f}]",
        )
    for data, q in result["quality"].items():
        eq = q["equal_steps"]
        if any("bpd" not in eq[m] for m in ("lcss", "dsm")):
            add(
                f"{data}: LCSS bits/dim within 2% of DSM (equal steps)",
                None,
                False,
                True,
                "LCSS or DSM diverged",
            )
            continue
        lc, ds = eq["lcss"], eq["dsm"]
        rel = lc["bpd"] / ds["bpd"] - 1.0
        se_rel = math.hypot(lc["bpd_stderr"], ds["bpd_stderr"]) / ds["bpd"]
        add(
            f"{data}: LCSS bits/dim within 2% of DSM (equal steps)",
            rel,
            rel <= 0.02,
            abs(rel - 0.02) > 2 * se_rel,
            f"{lc['bpd']:.4f} +- {lc['bpd_stderr']:.4f} vs {ds['bpd']:.4f} +- {ds['bpd_stderr']:.4f}; "
            f"relative difference +- {se_rel:.4f}",
        )
        for other in ("ssm", "fdssm"):
            o = eq[other]
            target = f"{data}: LCSS bits/dim < {LABELS[other]} (equal steps)"
            if "bpd" not in o:
                add(target, None, True, True, f"{LABELS[other]} diverged")
                continue
            diff = o["bpd"] - lc["bpd"]
            se = math.hypot(o["bpd_stderr"], lc["bpd_stderr"])
            add(
                target,
                diff,
                diff > 0,
                abs(diff) > 2 * se,
                f"{LABELS[other]} - LCSS = {diff:.4f} +- {se:.4f} bits/dim",
            )
    return rows





def write_markdown(result: dict[str, Any], path: Path, out_dir: Path) -> Path:
    """The report section: machine, command, tables, targets (the reading is added by hand below
    ``KEEP_MARKER`` and kept on regeneration)."""
    rel = os.path.relpath(out_dir, path.parent)
    mc = result["machine"]
    lines = [
        "## Score matching: LCSS vs DSM, SSM, FD-SSM",
        "",
        f"Produced by `{result['command']}` in {result['wall_s'] / 60:.1f} min "
        f"({'quick mode, tiny sizes: checks the pipeline, not the methods' if result['settings']['quick'] else 'full mode'}).",
        f"Machine: `{mc['platform']}`, {mc['cpu_model']}, {mc['cpu_count']} CPUs (load average "
        f"{mc['load_average_start'][0]:.1f} at the start, {mc['load_average_end'][0]:.1f} at the end: shared), "
        f"device `{mc['device']}`{' (' + mc['device_name'] + ')' if 'device_name' in mc else ''}, "
        f"Python {mc['python']}, torch {mc['torch']}, {mc['torch_threads']} torch thread(s). "
        f"Raw numbers: [`{rel}/results.json`]({rel}/results.json).",
        "",
        "Where the run's time went (wall seconds): "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["stages_s"].items())
        + ".",
        "",
        "### Cost per optimiser step (same network, batch and optimiser; measured side by side)",
        "",
        f"{result['settings']['timing_rounds']} interleaved rounds of {result['settings']['timing_steps']} "
        "step(s) per method in shuffled order; time = median over rounds; ratio = median over rounds of "
        "the ratio to DSM in the same round [inter-quartile range]. Memory: "
        f"{next(iter(result['memory'].values()))['method'] if result['memory'] else '-'}. "
        "Phases: loss = label dropout + loss forward (all network calls), backward, optimizer = clipping + AdamW.",
        "",
    ]
    rows = []
    for name, t in result["timing"].items():
        mem = result["memory"].get(name, {})
        for m in METHODS:
            r, mm = t["methods"][m], mem.get(m, {})
            iqr = r["ratio_to_dsm_iqr"]
            rows.append(
                [
                    f"{name}: {t['description']}, {t['params'] / 1e6:.2f} M params",
                    LABELS[m],
                    f"{1e3 * r['step_s']:.0f}",
                    f"{r['ratio_to_dsm']:.2f} [{iqr[0]:.2f}, {iqr[1]:.2f}]",
                    " / ".join(f"{1e3 * r['phases_s'][p]:.0f}" for p in PHASES),
                    _f(mm.get("peak_delta_mib")),
                    _f(mm.get("ratio_to_dsm")),
                ]
            )
        iqr = t["lcss_over_ssm_iqr"]
        rows.append([name, "LCSS / SSM", None, f"{t['lcss_over_ssm']:.2f} [{iqr[0]:.2f}, {iqr[1]:.2f}]", None, None, None])
    header = ["configuration", "method", "ms / step", "ratio to DSM", "loss / backward / optimizer ms"]
    lines += harness.markdown_table([*header, "peak step memory MiB", "memory / DSM"], rows, align="llrrrrr")
    if any("repeat" in v for v in result["memory"].values()):
        lines += [
            "",
            "Order check of the memory probe (first method measured again last): "
            + "; ".join(
                f"{n}: {LABELS[v['repeat']['method']]} {v[v['repeat']['method']]['peak_delta_mib']:.1f} then "
                f"{v['repeat']['peak_delta_mib']:.1f} MiB"
                for n, v in result["memory"].items()
            )
            + ".",
        ]
    profiles = {name: t["profile"] for name, t in result["timing"].items() if "profile" in t}
    if profiles:
        lines += ["", "Top operators by self CPU time in one profiled step (share of the step):", ""]
        for name, prof in profiles.items():
            for m in METHODS:
                ops = ", ".join(f"`{o['op']}` {100 * o['share']:.0f}%" for o in prof[m][:4])
                lines.append(f"- {name}, {LABELS[m]}: {ops}")
    lines += ["", "![timing](" + rel + "/timing.png)", ""]
    from lcss_prior.train import TrainConfig

    defaults = TrainConfig()
    for data, q in result["quality"].items():
        s = q["settings"]
        b = q["budget"]
        fe = q["feature_extractor"]
        lines += [
            f"### Quality on {data} ({q['description']})",
            "",
            f"Training: `lcss_prior.train.train` (= `lcss-prior train`), seed {result['settings']['seed']}, "
            f"{s['steps']} steps, warm-up {s['warmup']}, training set {s['train_size']}, the project's "
            f"defaults otherwise (AdamW 1e-3, clip 1, EMA 0.999, VP SDE, LCSS smoothing c = {defaults.smoothing:g}, "
            f"input/output scaling {defaults.input_scaling}/{defaults.output_scaling}, {defaults.reduction} reduction). "
            f"Equal wall time = DSM's {b['equal_steps']} steps "
            f"({b['wall_time_budget_s']:.0f} s at its side-by-side step time on `{b['timing_config']}`): "
            + ", ".join(f"{LABELS[m]} {b['equal_wall_time_steps'][m]}" for m in METHODS)
            + " steps. "
            f"Held-out data: {s['test_size']} images; bits/dim on {s['bpd_samples']} of them (probability-flow "
            f"ODE, RK45 rtol = atol = {s['bpd_tol']:g}, Hutchinson, dequantised), FID/KID/accuracy on "
            f"{min(s['n_samples'], s['test_size'])} samples (Euler-Maruyama, {s['sample_steps']} steps, labels cycling over "
            f"the captions) against as many held-out images, in the features of an in-domain classifier "
            f"({s['classifier_steps']} steps, {s['classifier_feature_dim']} features; held-out accuracy {_f(fe.get('eval_accuracy'))}).",
            "",
        ]
        rows = []
        for key, label in (("equal_steps", "equal steps"), ("equal_wall_time", "equal wall time")):
            for m in METHODS:
                r = q[key][m]
                if r.get("diverged"):
                    rows.append([label, LABELS[m], r["steps"], "diverged", None, None, None, None])
                    continue
                rows.append(
                    [
                        label,
                        LABELS[m],
                        r["steps"],
                        f"{r['bpd']:.3f} +- {r['bpd_stderr']:.3f}",
                        _f(r["fid"]),
                        f"{_f(r['kid_mean'])} +- {_f(r['kid_std'], 2)}",
                        _f(r["accuracy"]),
                        _f(r["accuracy_min_caption"]),
                    ]
                )
        header = ["budget", "method", "steps", "bits/dim", "FID", "KID", "sample accuracy", "worst caption"]
        lines += harness.markdown_table(header, rows, align="llrrrrrr")
        lines += [
            "",
            f"Stability (whole run to the larger of the two budgets; logged every {s['log_every']} steps):",
            "",
        ]
        rows = [
            [
                LABELS[m],
                "yes: " + str(q["runs"][m]["error"]) if q["runs"][m]["diverged"] else "no",
                q["runs"][m]["nonfinite_logged"],
                _f(q["runs"][m]["final_grad_norm"]),
                _f(q["runs"][m]["final_grad_norm_median_last10pct"]),
                _f(q["runs"][m]["lightning_step_s_median"]),
            ]
            for m in METHODS
        ]
        header = ["method", "diverged", "non-finite logged values", "final grad norm"]
        header += ["median grad norm, last 10%", "Lightning s / step (median)"]
        lines += harness.markdown_table(header, rows, align="llrrrr")
        lines += [
            "",
            f"![curves]({rel}/curves_{data}.png)",
            "",
            f"![samples]({rel}/samples_{data}.png)",
            "",
        ]
    lines += [
        "### Targets (reported, not asserted)",
        "",
    ]
    rows = [[t["target"], _f(t["value"]), t["verdict"], t["note"]] for t in result["targets"]]
    lines += harness.markdown_table(["target", "measured", "met", "note"], rows, align="lrll")
    return harness.write_report(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _widths(text: str) -> tuple[int, ...] | None:
    if text.lower() in ("", "preset", "none"):
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers or 'preset', got {text!r}"
        ) from None


QUICK = {
    "timing_rounds": 2,
    "timing_steps": 1,
    "memory_steps": 1,
    "profile": True,
    "digits_widths": (8, 16, 16),
    "digits_batch": 16,
    "digits_steps": 6,
    "digits_classifier_steps": 5,
    "digits_n_samples": 20,
    "shapes_resolution": 8,
    "shapes_widths": (8, 16, 16),
    "shapes_batch": 8,
    "shapes_steps": 4,
    "shapes_train_size": 40,
    "shapes_test_size": 20,
    "shapes_classifier_steps": 5,
    "shapes_n_samples": 20,
    "timing_presets": "quick",
    "sample_steps": 5,
    "bpd_samples": 4,
    "bpd_tol": 1e-2,
    "classifier_feature_dim": 16,
    "warmup": 2,
    "log_every": 1,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes: checks the pipeline")
    p.add_argument(
        "--out", default="benchmarks/results/score_matching", help="folder for results.json and PNGs"
    )
    p.add_argument("--report", default=None, help="markdown section to write (default: <out>.md)")
    p.add_argument(
        "--work-dir", default="runs/score_matching_bench", help="training runs (large; not results)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", default="digits,shapes", help="quality comparisons to run (comma list)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("part 1: cost")
    g.add_argument("--timing-rounds", type=int, default=6)
    g.add_argument("--timing-steps", type=int, default=1, help="optimiser steps per method per round")
    g.add_argument("--memory-steps", type=int, default=1)
    g.add_argument("--no-profile", dest="profile", action="store_false")
    g.add_argument(
        "--timing-presets",
        default="presets",
        help="'presets': the digits (8 px, batch 64) and shapes (32 px, batch 32) training presets, plus "
        "the quality networks; 'quick': only the quality networks",
    )
    for data, res, widths, batch, steps, cls_steps, n in (
        ("digits", 8, (16, 32, 32), 64, 600, 400, 360),
        ("shapes", 16, (16, 32, 32), 32, 200, 300, 160),
    ):
        g = p.add_argument_group(f"part 2: quality on {data}")
        g.add_argument(f"--{data}-resolution", type=int, default=res)
        g.add_argument(
            f"--{data}-widths", type=_widths, default=widths, help="UNet widths, or 'preset' (tiny)"
        )
        g.add_argument(f"--{data}-batch", type=int, default=batch)
        g.add_argument(f"--{data}-steps", type=int, default=steps, help="equal-steps budget N")
        g.add_argument(f"--{data}-classifier-steps", type=int, default=cls_steps)
        g.add_argument(f"--{data}-n-samples", type=int, default=n, help="samples for FID/KID/accuracy")
    p.add_argument("--shapes-train-size", type=int, default=1000, help="rendered training views")
    p.add_argument("--shapes-test-size", type=int, default=160, help="rendered held-out views")
    p.add_argument(
        "--shapes-cache", default=None, help="shapes training render cache file (default: in --work-dir)"
    )
    p.add_argument(
        "--classifier-feature-dim", type=int, default=128, help="feature size of the in-domain FID/KID"
    )
    p.add_argument("--sample-steps", type=int, default=200, help="Euler-Maruyama steps of the samples")
    p.add_argument("--bpd-samples", type=int, default=128)
    p.add_argument("--bpd-tol", type=float, default=1e-4, help="rtol = atol of the likelihood ODE")
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:  # quick sizes, unless given explicitly on the command line
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in ("digits", "shapes")]
    if bad:
        p.error(f"--datasets: unknown data set(s) {bad}; choose from digits, shapes")
    args.datasets = datasets
    if args.timing_presets not in ("presets", "quick"):
        p.error(f"--timing-presets must be 'presets' or 'quick', got {args.timing_presets!r}")
    for name in ("timing_rounds", "timing_steps", "memory_steps", "threads", "bpd_samples", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def quality_settings(args: argparse.Namespace, data: str) -> QualitySettings:
    a = vars(args)
    net = NetConfig(
        name=f"{data}-quality",
        data=data,
        resolution=a[f"{data}_resolution"],
        batch_size=a[f"{data}_batch"],
        widths=a[f"{data}_widths"],
    )
    return QualitySettings(
        net=net,
        steps=a[f"{data}_steps"],
        warmup=args.warmup,
        train_size=args.shapes_train_size if data == "shapes" else None,
        test_size=args.shapes_test_size if data == "shapes" else None,
        classifier_steps=a[f"{data}_classifier_steps"],
        classifier_feature_dim=args.classifier_feature_dim,
        n_samples=a[f"{data}_n_samples"],
        sample_steps=args.sample_steps,
        bpd_samples=args.bpd_samples,
        bpd_tol=args.bpd_tol,
        log_every=args.log_every,
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Parts 1-3; returns the result dictionary written to ``<out>/results.json``."""
    torch.set_num_threads(args.threads)
    if not args.progress:  # Lightning's per-fit banners ("GPU available: False", tips)
        import pytorch_lightning  # noqa: F401 - it sets its loggers' levels on import

        for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out_dir, work = Path(args.out), Path(args.work_dir)
    report = Path(args.report) if args.report else out_dir.with_suffix(".md")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/score_matching.py", *argv]),
        "machine": harness.machine(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "memory_probe"},
        "timing": {},
        "memory": {},
        "quality": {},
    }
    stages = harness.PhaseTimer()
    result["stages_s"] = stages.seconds
    qualities = {d: quality_settings(args, d) for d in args.datasets}
    configs: dict[str, NetConfig] = {}
    if args.timing_presets == "presets":
        configs["digits-preset"] = NetConfig("digits-preset", "digits", 8, 64)
        configs["shapes-preset"] = NetConfig("shapes-preset", "shapes", 32, 32)
    for q in qualities.values():
        configs[q.net.name] = q.net
    with sdpa_kernel([SDPBackend.MATH]):
        for name, cfg in configs.items():
            print(f"[score_matching] timing {name}: {cfg.describe()}", flush=True)
            with stages.phase(f"timing {name}"):
                result["timing"][name] = time_methods(
                    cfg,
                    args.timing_rounds,
                    args.timing_steps,
                    args.device,
                    args.seed,
                    args.progress,
                    profile=args.profile,
                )
        print("[score_matching] peak memory (one fresh process)", flush=True)
        with stages.phase("memory"):
            result["memory"] = measure_memory(
                list(configs.values()), args.device, args.threads, args.seed, args.memory_steps
            )
        for data, q in qualities.items():
            print(f"[score_matching] quality {data}: {q.net.describe()}, {q.steps} steps", flush=True)
            res = run_quality(
                q,
                result["timing"][q.net.name],
                work,
                args.seed,
                args.device,
                args.shapes_cache,
                args.progress,
                stages,
            )
            res["description"] = q.net.describe()
            plot_curves(res, out_dir / f"curves_{data}.png", f"{data}: {q.net.describe()}, seed {args.seed}")
            plot_samples(
                res.pop("samples"),
                out_dir / f"samples_{data}.png",
                f"{data}: EMA samples after {q.steps} steps (two per caption, same starting noise)",
            )
            result["quality"][data] = res
    plot_timing(result["timing"], result["memory"], out_dir / "timing.png")
    result["targets"] = targets(result)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - start
    (out_dir / "results.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n", encoding="utf-8")
    write_markdown(result, report, out_dir)
    print(
        f"[score_matching] wrote {out_dir}/results.json, PNGs and {report} in {result['wall_s'] / 60:.1f} min"
    )
    for t in result["targets"]:
        print(f"  {t['verdict']:>20s}  {t['target']}: {_f(t['value'])}  {t['note']}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return None
    return run(args, argv)


if __name__ == "__main__":
    main()
