"""3-D distillation on a CPU against a known object: SDS vs VSD vs SSD (and SSD with its constant
baseline alone, ``const``) with the REAL threestudio system, data module and renderer, from the
same seeds.

Each run is ``python -m threestudio_ssd.launch``'s CPU path (``launcher.run_on_cpu``: threestudio's
``load_config``, ``random-camera-datamodule``, ``steindreamer-system``, ``implicit-volume`` with
``stein-dense-volume-renderer``, its checkpoint/logger callbacks) on the twin configs
``configs/{sds,vsd,steindreamer}-cpu-shapes.yaml`` (identical but for the estimator), with one
extra Lightning callback (:class:`Distill3DCallback`) that

* evaluates at step 0 and every ``--eval-every`` steps: the data module's own validation cameras
  (``n_val_views = --eval-views`` azimuths ``360 i / V`` at ``eval_elevation_deg``,
  ``eval_camera_distance``, ``eval_fovy_deg``, ``--eval-resolution`` px) are rendered by the
  system (``eval`` mode, no gradient) and compared with the TRUE object of the prompt rendered
  from the same cameras (``threestudio_ssd.evaluation.groundtruth``: ``true_views``,
  ``shapes_metrics`` -- mask IoU of ``opacity > 0.5`` and PSNR); the callback checks that the data
  module's ``c2w`` equal the ground truth's cameras;
* times every training step (``on_train_batch_start`` to ``on_train_batch_end``, minus the
  variance monitor's own time; evaluation runs outside that window) with wall-clock stamps;
* reads ``train/var_proxy_ratio`` (the guidance's running second-moment ratio) and the system's
  variance monitor (``system.variance_monitor``: every ``--monitor-every`` steps, ``--monitor-draws``
  draws of ``(t, eps)`` at the current view, the estimator's gradient variance and SDS's on the same
  draws, ``ScoreDistillation.estimate_variance``).

The arms of one seed run at the same time, one process each (``--threads`` torch threads each), so
they share the machine's load; wall-time ratios use only the steps that started while every arm
of that seed was still running (after one finishes, the others get more CPU). The load average is
recorded before and after each seed.

Summary (``distill_3d.json``, ``distill_3d.md``, ``iou_psnr.png``, ``variance_ratio.png``):
per arm, IoU/PSNR against the step (mean and min/max over seeds); steps to reach ``--iou-target``;
steps to reach SDS's final mean IoU, relative to SDS's own (target to REPORT: SSD <= 0.7x); the
monitored variance ratio (mean over monitor steps and seeds); median step time and its ratio to
SDS within each seed.

    python benchmarks/distill_3d.py --seeds 0,1 --steps 200 \\
        --out benchmarks/results/distill_3d
    python benchmarks/distill_3d.py --quick --out runs/distill_3d-quick     # tiny random models, minutes

Uses ``--threestudio-root``, else the pinned threestudio (``threestudio_ssd.checkout``); the runs live in
``--work-dir`` (a temporary folder by default), only the summary goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARMS = ("sds", "vsd", "ssd", "const")
CONFIGS = {
    "sds": "sds-cpu-shapes.yaml",
    "vsd": "vsd-cpu-shapes.yaml",
    "ssd": "steindreamer-cpu-shapes.yaml",
    "const": "steindreamer-cpu-shapes.yaml",
}
"""Arm -> its twin config in ``configs/`` (they differ in the estimator and its own keys only)."""
ESTIMATORS = {"sds": "sds", "vsd": "vsd", "ssd": "ssd", "const": "ssd"}
"""Arm -> the guidance's ``estimator``. ``const`` is SSD with the constant baseline only (same
learned scalar ``mu`` as ``ssd``, no depth model): what the weight alone removes, so that the depth
baseline's own share of SSD's reduction is ``ssd`` against ``const``, not against SDS."""
CONST_OVERRIDES = ["system.guidance.baselines=[constant]", "system.guidance.depth_estimator_path=null"]
_G = "system.guidance."
SCHEMES = {
    "n2": [f"{_G}noise_draws=2"],
    "n4": [f"{_G}noise_draws=4"],
    "n8": [f"{_G}noise_draws=8"],
    "n2-pairs": [f"{_G}noise_draws=2", f"{_G}antithetic=pairs"],
    "n4-strat": [f"{_G}noise_draws=4", f"{_G}t_sampling=stratified"],
    "n4-strat-pairs": [f"{_G}noise_draws=4", f"{_G}t_sampling=stratified", f"{_G}antithetic=pairs"],
    "n8-strat-pairs": [f"{_G}noise_draws=8", f"{_G}t_sampling=stratified", f"{_G}antithetic=pairs"],
    "golden": [f"{_G}t_sampling=golden"],
    "golden-steps": [f"{_G}t_sampling=golden", f"{_G}antithetic=steps"],
    "n4-golden": [f"{_G}noise_draws=4", f"{_G}t_sampling=golden"],
}
"""Noise schemes of ``DistillationConfig`` (``noise_draws``, ``t_sampling``, ``antithetic``)."""
SCHEME_ARMS = {
    f"{base}-{name}": (base, overrides)
    for base in ("sds", "ssd", "const")
    for name, overrides in SCHEMES.items()
    if base == "sds" or "steps" not in name  # the configs' learned mu refuses antithetic steps
}
"""Opt-in arms (``--arms``): ``<arm>-<scheme>`` is the arm's config with the scheme's keys.
``sds-n2/4/8`` (SDS with several noise draws per step, variance V/n at one render) calibrate the
benchmark: if they do not converge faster, it cannot show a variance reduction."""
KNOWN_ARMS = ARMS + tuple(SCHEME_ARMS)


def base_arm(arm: str) -> str:
    """The arm whose config and estimator a scheme arm uses (an arm of ``ARMS`` is its own)."""
    return SCHEME_ARMS[arm][0] if arm in SCHEME_ARMS else arm


CONFIGS.update({arm: CONFIGS[base] for arm, (base, _) in SCHEME_ARMS.items()})
ESTIMATORS.update({arm: ESTIMATORS[base] for arm, (base, _) in SCHEME_ARMS.items()})
RECORD = "distill_3d_record.json"


@dataclass
class Settings:
    prior: str | None
    depth_model: str | None
    prompt: str
    arms: list[str]
    seeds: list[int]
    steps: int
    eval_every: int
    eval_views: int
    eval_resolution: int
    monitor_every: int
    monitor_draws: int
    iou_target: float
    resolution: int
    samples_per_ray: int
    threads: int
    quick: bool
    overrides: list[str]


# -- arguments ------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--prior", default=None, help="exported lcss-prior folder (default: the shipped models/shapes-lcss-32)"
    )
    p.add_argument(
        "--depth-model", default=None, help="depth checkpoint folder, for SSD (default: models/depth-shapes-64)"
    )
    p.add_argument("--prompt", default="a red cube", help="a caption of the shapes vocabulary")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(KNOWN_ARMS)}")
    p.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-views", type=int, default=4, help="validation cameras per evaluation")
    p.add_argument("--eval-resolution", type=int, default=64, help="side of the evaluation renders (px)")
    p.add_argument("--monitor-every", type=int, default=25, help="steps between variance estimates")
    p.add_argument("--monitor-draws", type=int, default=16, help="(t, eps) draws per variance estimate")
    p.add_argument(
        "--iou-target",
        type=float,
        default=0.75,
        help="the fixed IoU whose first step is reported (above the init's)",
    )
    p.add_argument("--resolution", type=int, default=32, help="training render size (data.width/height)")
    p.add_argument("--samples-per-ray", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--threestudio-root", default=None, help="threestudio checkout (default: the pinned one, python -m threestudio_ssd.checkout)")
    p.add_argument(
        "--work-dir", default=None, help="where the runs are written (default: a temporary folder)"
    )
    p.add_argument("--out", required=True, help="folder for the JSON and PNGs; the markdown goes to <out>.md")
    p.add_argument(
        "--quick", action="store_true", help="tiny random prior and DPT, 16 px, 4 steps, 1 seed (smoke test)"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds per seed before the runs are killed"
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="run nothing: rebuild the summary from the records of --seeds already in --work-dir",
    )
    p.add_argument("overrides", nargs="*", help="extra threestudio overrides (key=value) for every run")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in KNOWN_ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {unknown}; known: {list(KNOWN_ARMS)}")
    if "sds" not in arms:
        arms.insert(0, "sds")  # every ratio is to SDS
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_views = args.seeds[:1], 4, 2, 2
        args.eval_resolution = args.resolution = 16
        args.samples_per_ray, args.monitor_every, args.monitor_draws = 8, 2, 4
        args.overrides = ["system.geometry.mlp_network_config.n_neurons=16", *args.overrides]
    else:
        from threestudio_ssd.shipped import DEPTH, PRIOR, shipped_model

        args.prior = args.prior or str(shipped_model(PRIOR))
        args.depth_model = args.depth_model or str(shipped_model(DEPTH))
    for key in ("steps", "eval_every", "eval_views", "eval_resolution", "monitor_draws", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.eval_views == 3:
        parser.error(
            "--eval-views 3 crashes threestudio's camera data module (torch.cross on [3, 3]); use 2 or 4"
        )
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    settings = Settings(
        prior=args.prior,
        depth_model=args.depth_model,
        prompt=args.prompt,
        arms=arms,
        seeds=list(args.seeds),
        steps=args.steps,
        eval_every=args.eval_every,
        eval_views=args.eval_views,
        eval_resolution=args.eval_resolution,
        monitor_every=args.monitor_every,
        monitor_draws=args.monitor_draws,
        iou_target=args.iou_target,
        resolution=args.resolution,
        samples_per_ray=args.samples_per_ray,
        threads=args.threads,
        quick=args.quick,
        overrides=list(args.overrides),
    )
    return settings, args


# -- the in-run callback (runs inside the worker process) -----------------------------------------


def make_callback(prompt: str, eval_every: int, record_path: str):
    """The :class:`Distill3DCallback` (a Lightning callback; defined here so that importing this
    script needs no Lightning)."""
    import pytorch_lightning as pl
    import torch

    from threestudio_ssd.evaluation.groundtruth import shapes_metrics, true_views
    from threestudio_ssd.evaluation.views import TestCameras

    class Distill3DCallback(pl.Callback):
        """Evaluation against the true object, step times and variance readings of one run (module
        docstring); writes ``record_path`` (JSON) at the end of training."""

        def __init__(self) -> None:
            self.evals: list[dict[str, Any]] = []
            self.steps: list[dict[str, float]] = []
            self.proxy: list[dict[str, float]] = []
            self._start = 0.0
            self._monitor_len = 0
            self.truth: dict[str, torch.Tensor] | None = None
            self.batch: dict[str, Any] | None = None

        def _eval_batch(self, trainer) -> dict[str, Any]:
            dataset = trainer.datamodule.val_dataset
            batch = dataset.collate([dataset[i] for i in range(len(dataset))])
            cfg = dataset.cfg
            n = len(dataset)
            cameras = TestCameras(
                elevation_deg=cfg.eval_elevation_deg,
                distance=cfg.eval_camera_distance,
                fovy_deg=cfg.eval_fovy_deg,
                n_views=n + 1,  # azimuths linspace(0, 360, n + 1)[:n], the validation split's
            )
            expected = cameras.c2w(list(range(n))).to(batch["c2w"])
            if not torch.allclose(batch["c2w"], expected, atol=1e-4):
                raise RuntimeError(
                    "the data module's validation cameras differ from the ground truth's (camera conventions "
                    f"changed?): max |c2w difference| {(batch['c2w'] - expected).abs().max().item():.3g}"
                )
            self.truth = true_views(prompt, cameras, list(range(n)), (cfg.eval_height, cfg.eval_width))
            return batch

        @torch.no_grad()
        def evaluate(self, trainer, pl_module) -> None:
            if self.batch is None:
                self.batch = self._eval_batch(trainer)
            start = time.perf_counter()
            was_training = pl_module.training
            pl_module.eval()
            try:
                out = pl_module(self.batch)
            finally:
                pl_module.train(was_training)
            rgb = out["comp_rgb"].permute(0, 3, 1, 2).clamp(0, 1).float().cpu()
            opacity = out["opacity"][..., 0].float().cpu()
            metrics = shapes_metrics(rgb, opacity, self.truth)
            self.evals.append(
                {
                    "step": int(pl_module.true_global_step),
                    "iou": metrics["iou"].tolist(),
                    "psnr_foreground": metrics["psnr_foreground"].tolist(),
                    "psnr_full": metrics["psnr_full"].tolist(),
                    "iou_mean": metrics["iou"].mean().item(),
                    "psnr_foreground_mean": metrics["psnr_foreground"].mean().item(),
                    "psnr_full_mean": metrics["psnr_full"].mean().item(),
                    "seconds": time.perf_counter() - start,
                }
            )

        def on_train_start(self, trainer, pl_module) -> None:
            self.evaluate(trainer, pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._monitor_len = len(getattr(pl_module, "variance_history", []))
            self._wall = time.time()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seconds = time.perf_counter() - self._start
            history = getattr(pl_module, "variance_history", [])
            monitor = sum(r["seconds"] for r in history[self._monitor_len :])
            step = int(pl_module.true_global_step)  # optimizer steps done, this one included
            self.steps.append(
                {
                    "step": step,
                    "wall_start": self._wall,
                    "seconds": seconds - monitor,
                    "monitor_seconds": monitor,
                }
            )
            proxy = trainer.callback_metrics.get("train/var_proxy_ratio")
            if proxy is not None:
                self.proxy.append({"step": step, "var_proxy_ratio": float(proxy)})
            if step % eval_every == 0 or step == trainer.max_steps:
                self.evaluate(trainer, pl_module)

        def on_train_end(self, trainer, pl_module) -> None:
            record = {
                "evals": self.evals,
                "steps": self.steps,
                "var_proxy": self.proxy,
                "variance_monitor": list(getattr(pl_module, "variance_history", [])),
                "estimator": pl_module.guidance.cfg.estimator,
                "baselines": list(pl_module.guidance.cfg.baselines),
                "noise": {
                    key: getattr(pl_module.guidance.cfg, key) for key in ("noise_draws", "t_sampling", "antithetic")
                },
            }
            Path(record_path).write_text(json.dumps(record))

    return Distill3DCallback()


def worker(spec: dict[str, Any]) -> None:
    """One run (``--worker SPEC.json``): ``launcher.run_on_cpu`` with the callback, in the root."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    root = spec["root"]
    os.chdir(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    from threestudio_ssd.launch import build_parser as launch_parser
    from threestudio_ssd.threestudio.launcher import import_launch_module, run_on_cpu

    args, extras = launch_parser().parse_known_args(
        ["--config", spec["config"], "--train", *spec["overrides"]]
    )
    callback = make_callback(spec["prompt"], int(spec["eval_every"]), spec["record"])
    run_on_cpu(args, extras, import_launch_module(root), root, extra_callbacks=[callback])


# -- orchestration ----------------------------------------------------------------------------------


def run_overrides(
    settings: Settings, arm: str, seed: int, models: dict[str, str], runs_dir: Path
) -> list[str]:
    """threestudio overrides of one run (all arms get the same ones but the config)."""
    res, eres = settings.resolution, settings.eval_resolution
    out = [
        f"system.guidance.prior_path={models['prior']}",
        f"system.prompt_processor.prompt={settings.prompt}",
        f"seed={seed}",
        f"system.guidance.seed={seed}",
        f"system.guidance.vsd_seed={seed}" if arm == "vsd" else None,
        *(CONST_OVERRIDES if base_arm(arm) == "const" else []),
        *SCHEME_ARMS.get(arm, (None, []))[1],
        f"exp_root_dir={runs_dir}",
        "name=distill3d",
        f"tag={arm}-seed{seed}",
        "use_timestamp=false",
        f"trainer.max_steps={settings.steps}",
        f"trainer.val_check_interval={settings.steps}",
        "trainer.log_every_n_steps=1",
        f"data.width={res}",
        f"data.height={res}",
        f"data.eval_width={eres}",
        f"data.eval_height={eres}",
        f"data.n_val_views={settings.eval_views}",
        "data.n_test_views=2",
        f"system.renderer.num_samples_per_ray={settings.samples_per_ray}",
        f"system.variance_monitor.every={settings.monitor_every}",
        f"system.variance_monitor.n_draws={settings.monitor_draws}",
        f"system.variance_monitor.seed={seed}",
    ]
    if models.get("depth") and base_arm(arm) != "const":
        out.append(f"system.guidance.depth_estimator_path={models['depth']}")
    return [o for o in out if o is not None] + settings.overrides


def quick_models(folder: Path, prompt: str) -> dict[str, str]:
    from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

    prior = make_tiny_prior(folder / "prior", captions=(prompt, "a blue sphere"), resolution=16)
    return {"prior": str(prior), "depth": str(make_tiny_depth_estimator(folder / "dpt", resolution=16))}


def run_seed(settings: Settings, seed: int, root: Path, models: dict[str, str], work: Path, timeout: float):
    """The arms of one seed, at the same time (one process each); returns ``{arm: record}`` and the
    load averages before and after."""
    runs_dir = work / "runs"
    procs = {}
    load_before = os.getloadavg()
    for arm in settings.arms:
        record = work / f"{arm}-seed{seed}.{RECORD}"
        spec = {
            "root": str(root),
            "config": f"custom/threestudio-ssd/configs/{CONFIGS[arm]}",
            "overrides": run_overrides(settings, arm, seed, models, runs_dir),
            "prompt": settings.prompt,
            "eval_every": settings.eval_every,
            "record": str(record),
            "threads": settings.threads,
        }
        spec_path = work / f"{arm}-seed{seed}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log = open(work / f"{arm}-seed{seed}.log", "w")  # noqa: SIM115 - closed below
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["OMP_NUM_THREADS"] = str(settings.threads)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs[arm] = (proc, log, record)
    from tqdm.auto import tqdm

    deadline = time.monotonic() + timeout
    failed = []
    with tqdm(total=len(procs), desc=f"seed {seed}: arms {','.join(procs)}", unit="run") as bar:
        pending = dict(procs)
        while pending:
            for arm, (proc, log, _) in list(pending.items()):
                if proc.poll() is not None:
                    log.close()
                    if proc.returncode != 0:
                        failed.append(arm)
                    del pending[arm]
                    bar.update(1)
            if pending and time.monotonic() > deadline:
                for proc, log, _ in pending.values():
                    proc.kill()
                    proc.wait()
                    log.close()
                failed += list(pending)
                break
            time.sleep(1.0)
    if failed:
        tails = {a: (work / f"{a}-seed{seed}.log").read_text()[-3000:] for a in failed}
        raise RuntimeError(
            f"runs failed (seed {seed}): {failed}\n"
            + "\n".join(f"--- {a} ---\n{t}" for a, t in tails.items())
        )
    records = {arm: json.loads(rec.read_text()) for arm, (_, _, rec) in procs.items()}
    load = {"before": list(load_before), "after": list(os.getloadavg())}
    (work / f"seed{seed}.load.json").write_text(json.dumps(load))
    return records, load


def read_seed(settings: Settings, seed: int, work: Path):
    """The records of one finished seed from ``work`` (``--summarize-only``) and its load averages
    (``None`` when they were not recorded)."""
    paths = {arm: work / f"{arm}-seed{seed}.{RECORD}" for arm in settings.arms}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--summarize-only: seed {seed} has no record(s) {missing}")
    load_path = work / f"seed{seed}.load.json"
    load = json.loads(load_path.read_text()) if load_path.is_file() else {"before": None, "after": None}
    return {arm: json.loads(p.read_text()) for arm, p in paths.items()}, load


# -- summary ----------------------------------------------------------------------------------------


def first_step_reaching(evals: list[dict[str, Any]], target: float, key: str = "iou_mean") -> int | None:
    """The first evaluated step whose ``key`` is ``>= target`` (``None`` if never)."""
    for e in evals:
        if e[key] >= target:
            return e["step"]
    return None


def mean_curve(runs: list[list[dict[str, Any]]], key: str) -> list[dict[str, float]]:
    """Mean, min and max of ``key`` over runs at each step evaluated in all of them."""
    steps = sorted(set.intersection(*[{e["step"] for e in r} for r in runs]))
    out = []
    for s in steps:
        values = [next(e[key] for e in r if e["step"] == s) for r in runs]
        out.append({"step": s, "mean": statistics.fmean(values), "min": min(values), "max": max(values)})
    return out


def overlap_step_times(records: dict[str, dict[str, Any]]) -> tuple[dict[str, list[float]], bool]:
    """Per arm, the step times of steps that started before the first arm finished (all arms of the
    seed were running then, so they shared the same load), and True. If some arm has no step in that
    window (it started after another had finished, e.g. short runs on a busy machine), all steps of
    every arm and False: those times did not share one load, and the summary says so."""
    end = min(r["steps"][-1]["wall_start"] for r in records.values())
    window = {arm: [s["seconds"] for s in r["steps"] if s["wall_start"] <= end] for arm, r in records.items()}
    if all(window.values()):
        return window, True
    return {arm: [s["seconds"] for s in r["steps"]] for arm, r in records.items()}, False


def summarize(settings: Settings, records: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    arms, seeds = settings.arms, sorted(records)
    curves = {
        arm: {
            key: mean_curve([records[s][arm]["evals"] for s in seeds], key)
            for key in ("iou_mean", "psnr_foreground_mean", "psnr_full_mean")
        }
        for arm in arms
    }
    sds_final = curves["sds"]["iou_mean"][-1]["mean"]
    sds_steps_to_final = first_step_reaching(
        [{"step": c["step"], "iou_mean": c["mean"]} for c in curves["sds"]["iou_mean"]], sds_final
    )
    summary: dict[str, Any] = {"sds_final_iou": sds_final, "iou_target": settings.iou_target, "arms": {}}
    for arm in arms:
        iou = curves[arm]["iou_mean"]
        mean_evals = [{"step": c["step"], "iou_mean": c["mean"]} for c in iou]
        per_seed_target = [first_step_reaching(records[s][arm]["evals"], settings.iou_target) for s in seeds]
        reach_sds = first_step_reaching(mean_evals, sds_final)
        ratios = [
            r["ratio"]
            for s in seeds
            for r in records[s][arm]["variance_monitor"]
            if math.isfinite(r["ratio"]) and r["step"] > 0
        ]
        step_ratio = []
        medians = []
        overlapped = []
        for s in seeds:
            times, ok = overlap_step_times(records[s])
            overlapped.append(ok)
            med = statistics.median(times[arm])
            medians.append(med)
            step_ratio.append(med / statistics.median(times["sds"]))
        proxy = [p["var_proxy_ratio"] for s in seeds for p in records[s][arm]["var_proxy"][-1:]]
        summary["arms"][arm] = {
            "final_iou_mean": iou[-1]["mean"],
            "final_iou_min": iou[-1]["min"],
            "final_iou_max": iou[-1]["max"],
            "final_psnr_foreground_mean": curves[arm]["psnr_foreground_mean"][-1]["mean"],
            "final_psnr_full_mean": curves[arm]["psnr_full_mean"][-1]["mean"],
            "best_iou_mean": max(c["mean"] for c in iou),
            "steps_to_iou_target_per_seed": per_seed_target,
            "steps_to_iou_target_mean_curve": first_step_reaching(mean_evals, settings.iou_target),
            "steps_to_sds_final_iou": reach_sds,
            "steps_to_sds_final_iou_ratio": (
                reach_sds / sds_steps_to_final if reach_sds is not None and sds_steps_to_final else None
            ),
            "variance_ratio_mean": statistics.fmean(ratios) if ratios else None,
            "variance_ratio_min": min(ratios) if ratios else None,
            "variance_ratio_max": max(ratios) if ratios else None,
            "var_proxy_ratio_final": statistics.fmean(proxy) if proxy else None,
            "median_step_s_per_seed": medians,
            "step_time_ratio_to_sds_per_seed": step_ratio,
            "step_time_ratio_to_sds_mean": statistics.fmean(step_ratio),
            "mean_iou_over_run": statistics.fmean(c["mean"] for c in iou),
            "efficiency": (
                statistics.fmean(ratios) * statistics.fmean(step_ratio) if ratios else None
            ),
            "step_times_in_shared_window_per_seed": overlapped,
        }
    summary["sds_steps_to_final_iou"] = sds_steps_to_final
    summary["curves"] = curves
    return summary


def compact_runs(records: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The records for the JSON, small: per-step lists as columns, floats to 5 significant digits,
    wall-clock stamps relative to the seed's first step."""

    def r5(x: Any) -> Any:
        return float(f"{x:.5g}") if isinstance(x, float) else x

    def columns(rows: list[dict[str, Any]], offset: float = 0.0) -> dict[str, list[Any]]:
        keys = list(rows[0]) if rows else []
        return {k: [r5(r[k] - offset) if k == "wall_start" else r5(r[k]) for r in rows] for k in keys}

    out: dict[str, Any] = {}
    for seed, arms in records.items():
        t0 = min(r["steps"][0]["wall_start"] for r in arms.values() if r["steps"])
        out[str(seed)] = {
            arm: {
                "estimator": r["estimator"],
                "baselines": r.get("baselines"),
                "noise": r.get("noise"),
                "evals": [
                    {k: [r5(v) for v in x] if isinstance(x, list) else r5(x) for k, x in e.items()}
                    for e in r["evals"]
                ],
                "steps": columns(r["steps"], t0),
                "var_proxy": columns(r["var_proxy"]),
                "variance_monitor": [{k: r5(v) for k, v in m.items()} for m in r["variance_monitor"]],
            }
            for arm, r in arms.items()
        }
    return out


def plot(settings: Settings, records: dict[int, dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    colors = {"sds": "tab:blue", "vsd": "tab:green", "ssd": "tab:red", "const": "tab:orange"}
    extra = iter(["tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black", "gold", "navy"])
    colors.update({arm: next(extra) for arm in settings.arms if arm not in colors})
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "iou_mean", "mask IoU (opacity > 0.5 vs true mask)"),
        (axes[1], "psnr_foreground_mean", "PSNR on the true mask (dB)"),
    ):
        for arm in settings.arms:
            c = summary["curves"][arm][key]
            steps = [p["step"] for p in c]
            ax.plot(steps, [p["mean"] for p in c], "-o", ms=3, color=colors[arm], label=arm.upper())
            ax.fill_between(steps, [p["min"] for p in c], [p["max"] for p in c], color=colors[arm], alpha=0.2)
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].axhline(summary["sds_final_iou"], color="grey", ls=":", lw=1, label="SDS final")
    axes[0].legend()
    fig.suptitle(f"{settings.prompt!r}: mean over seeds {settings.seeds} (band: min-max)")
    fig.tight_layout()
    fig.savefig(out / "iou_psnr.png", dpi=100)

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for arm in settings.arms:
        for i, s in enumerate(sorted(records)):
            hist = records[s][arm]["variance_monitor"]
            ax.plot(
                [r["step"] for r in hist],
                [r["ratio"] for r in hist],
                "-o" if i == 0 else "--s",
                ms=3,
                color=colors[arm],
                label=f"{arm.upper()} seed {s}",
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="Var(estimator) / Var(SDS), same draws", title="gradient variance ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "variance_ratio.png", dpi=100)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def write_markdown(settings: Settings, result: dict[str, Any], path: Path, command: str) -> None:
    summary = result["summary"]
    lines = [
        "## 3-D distillation on shapes: SDS vs VSD vs SSD (`benchmarks/distill_3d.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Prompt {settings.prompt!r}; seeds {settings.seeds}; {settings.steps} steps; training renders "
        f"{settings.resolution} px, evaluation every {settings.eval_every} steps on {settings.eval_views} "
        f"validation cameras at {settings.eval_resolution} px against the true object; variance monitor every "
        f"{settings.monitor_every} steps with {settings.monitor_draws} draws. Arms of a seed ran at the same time "
        f"(one process each, {settings.threads} thread(s)); load average before/after each seed: "
        + "; ".join(
            f"seed {s}: {_fmt(v['before'][0]) if v['before'] else 'not recorded'} -> "
            f"{_fmt(v['after'][0]) if v['after'] else 'not recorded'}"
            for s, v in result["load"].items()
        )
        + (f". Total wall time {result['wall_s'] / 60:.1f} min." if result["wall_s"] is not None else "."),
        "",
        "| arm | final IoU mean [min, max] | best IoU | PSNR fg / full (dB) | steps to IoU "
        f">= {settings.iou_target} (per seed) | steps to SDS's final IoU ({_fmt(summary['sds_final_iou'])}) "
        "| ratio to SDS's | mean IoU over the run | variance ratio to SDS (mean [min, max]) | step time ratio to SDS "
        "| variance x time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in settings.arms:
        a = summary["arms"][arm]
        lines.append(
            f"| {arm.upper()} | {_fmt(a['final_iou_mean'])} [{_fmt(a['final_iou_min'])}, {_fmt(a['final_iou_max'])}] "
            f"| {_fmt(a['best_iou_mean'])} | {_fmt(a['final_psnr_foreground_mean'])} / {_fmt(a['final_psnr_full_mean'])} "
            f"| {_fmt(a['steps_to_iou_target_per_seed'])} | {_fmt(a['steps_to_sds_final_iou'])} "
            f"| {_fmt(a['steps_to_sds_final_iou_ratio']) if summary['sds_steps_to_final_iou'] else 'n/a (SDS at step 0)'} "
            f"| {_fmt(a['mean_iou_over_run'])} "
            f"| {_fmt(a['variance_ratio_mean'])} [{_fmt(a['variance_ratio_min'])}, {_fmt(a['variance_ratio_max'])}] "
            f"| {_fmt(a['step_time_ratio_to_sds_per_seed'])} (median step {_fmt(a['median_step_s_per_seed'])} s) "
            f"| {_fmt(a['efficiency'])} |"
        )
    lines += [
        "",
        "Steps to a target IoU are read on the seed-mean curve at the evaluation steps (resolution "
        f"{settings.eval_every} steps); the mean IoU over the run is the seed-mean curve averaged over its "
        "evaluation steps (step 0 included: higher is faster convergence). The variance ratio is the system's variance monitor at the run's own "
        "current view (steps > 0; SDS is 1 by construction). VSD's ratio compares estimators with different "
        "means (VSD is not unbiased for the SDS gradient). Step times exclude the monitor and the evaluation, "
        "and use only steps during which every arm of the seed was running. Variance x time: the mean variance "
        "ratio times the mean step-time ratio (< 1: the arm beats SDS per unit of compute at one view).",
        "",
        "Figures: `distill_3d/iou_psnr.png`, `distill_3d/variance_ratio.png`; numbers: `distill_3d/distill_3d.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(json.loads(Path(argv[1]).read_text()))
        return {}
    settings, args = parse_args(argv)
    from threestudio_ssd.checkout import get_threestudio, make_extension_root
    from threestudio_ssd.shipped import repo_relative

    src = args.threestudio_root or str(get_threestudio())
    if src not in sys.path:
        sys.path.insert(0, src)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only and not args.work_dir:
        raise SystemExit("--summarize-only needs the --work-dir of the runs")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="distill_3d_"))
    work.mkdir(parents=True, exist_ok=True)
    models = (
        quick_models(work / "models", settings.prompt)
        if settings.quick and not args.summarize_only
        else {"prior": settings.prior, "depth": settings.depth_model}
    )
    start = time.perf_counter()
    records, load = {}, {}
    if args.summarize_only:
        for seed in settings.seeds:
            records[seed], load[seed] = read_seed(settings, seed, work)
    else:
        root = make_extension_root(src, work / "threestudio_root")
        for seed in settings.seeds:
            records[seed], load[seed] = run_seed(settings, seed, root, models, work, args.timeout)
    summary = summarize(settings, records)
    result = {
        "settings": {
            **asdict(settings),
            "prior": repo_relative(settings.prior) if settings.prior else None,
            "depth_model": repo_relative(settings.depth_model) if settings.depth_model else None,
        },
        "models": {k: repo_relative(v) for k, v in models.items() if v},
        # a folder outside the repository is this machine's business, not the result's
        "work_dir": repo_relative(work) if not Path(repo_relative(work)).is_absolute() else "(temporary)",
        "wall_s": None if args.summarize_only else time.perf_counter() - start,
        "load": {str(k): v for k, v in load.items()},
        "summary": summary,
        "runs": compact_runs(records),
    }
    (out / "distill_3d.json").write_text(json.dumps(result))
    plot(settings, records, summary, out)
    command = "python benchmarks/distill_3d.py " + " ".join(argv)
    write_markdown(settings, result, Path(str(out).rstrip("/") + ".md"), command)
    return result


if __name__ == "__main__":
    main()
