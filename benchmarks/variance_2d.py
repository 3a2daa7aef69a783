"""The 2-D variance playground: SDS, VSD and SSD optimising IMAGES directly under a shapes prior.

Each arm optimises its own image ``rgb = sigmoid(logits)`` (``[1, 3, H, W]``, the prior's
resolution, all arms from the same initial logits) with Adam, through
``threestudio_ssd.distillation.ScoreDistillation`` -- the estimator code the threestudio guidance
uses -- and with the same ``(t, eps)`` stream (one generator per arm, same seed; VSD trains its
particle model from its own generator). Arms:

* ``sds``: ``w (eps_hat - eps)``.
* ``vsd``: ``w (eps_hat - eps_hat_particle)``, a camera-conditioned copy of the prior trained online
  on the image (full fine-tune; ``--vsd-lora-rank`` for LoRA). Not unbiased for the SDS mean.
* ``const-optimal-bins``: the constant baseline alone with the variance-optimal ``mu`` per
  timestep bin: re-weighting the noise per ``t``, the part of any reduction that needs no baseline.
* ``ssd-{learned,optimal}[-bins]``: constant + depth baseline, ``mu`` learned (the paper, Adam on
  ``loss_mu``) or optimal (least squares from earlier steps), one set or per timestep bin.
* ``paper-learned``, ``paper-optimal-bins``: the paper's single-baseline form (depth without the
  constant), ``mu`` initialised at 1.

The depth baseline needs render outputs, but an image has no geometry: the playground uses the TRUE
depth and opacity of the caption's object seen from one fixed camera
(``lcss_prior.data.shapes.render_scene``), i.e. the scenario "the 3-D model's depth is right, its
texture is being optimised". VSD's particle model gets that camera's ``c2w``.

Every ``--eval-every`` steps, at each arm's current image: ``K = --n-draws`` independent ``(t, eps)``
draws (the same draws for every arm at a given step) give the arm's gradient variance and SDS's on
the same draws (``ScoreDistillation.estimate_variance``) and their ratio, the share of SDS's
variance between timesteps (``stein.between_timestep_variance``: the floor no noise control
variate removes), and the prior's denoising loss of the image (DSM, conditional, fixed draws: lower
means "more likely" under the prior). Steps of all arms run interleaved, so their wall times are
measured side by side. Outputs in ``--out``: ``variance_2d.json``, ``variance_ratio.png``,
``prior_loss.png``, ``images.png`` (rows: arms; columns: snapshots).

    python benchmarks/variance_2d.py --out benchmarks/results/variance_2d   # the shipped models
    python benchmarks/variance_2d.py --quick --out runs/variance_2d-quick   # tiny random models, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from threestudio_ssd.shipped import repo_relative

ARMS: dict[str, dict[str, Any]] = {
    "sds": {"estimator": "sds"},
    "vsd": {"estimator": "vsd"},
    "const-optimal-bins": {"estimator": "ssd", "mu_mode": "optimal", "bins": True, "depth": False},
    "ssd-learned": {"estimator": "ssd", "mu_mode": "learned", "bins": False, "depth": True},
    "ssd-learned-bins": {"estimator": "ssd", "mu_mode": "learned", "bins": True, "depth": True},
    "ssd-optimal": {"estimator": "ssd", "mu_mode": "optimal", "bins": False, "depth": True},
    "ssd-optimal-bins": {"estimator": "ssd", "mu_mode": "optimal", "bins": True, "depth": True},
    "paper-learned": {"estimator": "ssd", "mu_mode": "learned", "bins": False, "depth": True, "paper": True},
    "paper-optimal-bins": {
        "estimator": "ssd",
        "mu_mode": "optimal",
        "bins": True,
        "depth": True,
        "paper": True,
    },
}
"""Arm name -> how its ``ScoreDistillation`` is built (``build_arm``)."""


@dataclass
class Settings:
    prior: str | None
    depth_model: str | None
    caption: str
    steps: int
    eval_every: int
    n_draws: int
    n_loss_draws: int
    t_bins: int
    floor_bins: int
    guidance_scale: float
    lr: float
    mu_lr: float
    particle_lr: float
    vsd_lora_rank: int | None
    elevation: float
    azimuth: float
    distance: float
    fovy: float
    seed: int
    threads: int | None
    quick: bool
    arms: list[str]


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--prior", default=None, help="exported lcss-prior folder (default: the shipped models/shapes-lcss-32)"
    )
    p.add_argument(
        "--depth-model",
        default=None,
        help="depth checkpoint folder (default: the shipped models/depth-shapes-64)",
    )
    p.add_argument("--caption", default="a red cube")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--n-draws", type=int, default=64, help="noise draws per variance estimate")
    p.add_argument("--n-loss-draws", type=int, default=64, help="draws of the prior's denoising loss")
    p.add_argument("--t-bins", type=int, default=5, help="timestep bins of the mu of the *-bins arms")
    p.add_argument("--floor-bins", type=int, default=10, help="timestep bins of the between-t floor")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="s in eps_u + s (eps_c - eps_u)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam on the image logits")
    p.add_argument("--mu-lr", type=float, default=0.02, help="Adam on learned mu")
    p.add_argument("--particle-lr", type=float, default=1e-3, help="Adam on VSD's particle model")
    p.add_argument("--vsd-lora-rank", type=int, default=None, help="LoRA rank (default: full fine-tune)")
    p.add_argument("--elevation", type=float, default=20.0)
    p.add_argument("--azimuth", type=float, default=30.0)
    p.add_argument("--distance", type=float, default=1.6)
    p.add_argument("--fovy", type=float, default=45.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    p.add_argument("--quick", action="store_true", help="tiny random prior and depth model, a few steps")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args(argv)
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"unknown --arms {unknown}; known: {list(ARMS)}")
    if "sds" not in arms:
        arms.insert(0, "sds")  # the reference of every ratio and time
    if a.quick:
        a.steps, a.eval_every, a.n_draws, a.n_loss_draws, a.t_bins, a.floor_bins = 4, 2, 8, 8, 2, 2
    else:
        from threestudio_ssd.shipped import DEPTH, PRIOR, shipped_model

        a.prior = a.prior or str(shipped_model(PRIOR))
        a.depth_model = a.depth_model or str(shipped_model(DEPTH))
    if min(a.steps, a.eval_every, a.t_bins, a.floor_bins) < 1 or a.n_draws < 2:
        p.error("--steps, --eval-every, --t-bins, --floor-bins must be >= 1 and --n-draws >= 2")
    values = {k: v for k, v in vars(a).items() if k != "out"}
    values["arms"] = arms
    return Settings(**values), Path(a.out)


# ----------------------------------------------------------------------------------------------
# models and scene
# ----------------------------------------------------------------------------------------------


def load_models(s: Settings, workdir: Path):
    """The score model and the depth estimator (tiny random ones written to ``workdir`` in quick)."""
    from threestudio_ssd.depth import load_depth_estimator
    from threestudio_ssd.score_models import LCSSPriorScoreModel

    prior_dir, depth_dir = s.prior, s.depth_model
    if s.quick:
        from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

        prior_dir = prior_dir or make_tiny_prior(workdir / "prior", resolution=16)
        depth_dir = depth_dir or make_tiny_depth_estimator(workdir / "depth")
    score_model = LCSSPriorScoreModel(prior_dir)
    names = (repo_relative(prior_dir), repo_relative(depth_dir))
    if s.quick:  # temporary folders: name what they held, not where
        names = ("(tiny random prior, quick mode)", "(tiny random depth model, quick mode)")
    return score_model, load_depth_estimator(depth_dir), *names


def scene(s: Settings, resolution: tuple[int, int]):
    """The true render of the caption's object from the fixed camera: ``RenderOutputs`` (depth,
    opacity, c2w, fovy) at the prior's resolution, and the RGB render itself (for the figure)."""
    from lcss_prior.data.shapes import camera_c2w, parse_caption, render_scene
    from threestudio_ssd.baselines import RenderOutputs

    shape, color = parse_caption(s.caption)
    c2w = camera_c2w(s.elevation, s.azimuth, s.distance)
    out = render_scene(shape, color, c2w, s.fovy, resolution, supersample=2)
    render = RenderOutputs(
        depth=out["depth"][None],
        opacity=out["mask"][None].float(),
        c2w=c2w[None],
        fovy_deg=torch.tensor([s.fovy]),
    )
    return render, out["rgb"].permute(2, 0, 1)[None]


def build_arm(name: str, s: Settings, score_model, depth_baseline):
    from threestudio_ssd.distillation import ScoreDistillation

    spec = ARMS[name]
    common = {"guidance_scale": s.guidance_scale, "vsd_lora_rank": s.vsd_lora_rank, "vsd_seed": s.seed}
    if spec["estimator"] != "ssd":
        return ScoreDistillation(score_model, estimator=spec["estimator"], **common)
    paper = spec.get("paper", False)
    return ScoreDistillation(
        score_model,
        [depth_baseline] if spec["depth"] else [],
        estimator="ssd",
        include_constant=not paper,
        mu_mode=spec["mu_mode"],
        mu_t_bins=s.t_bins if spec["bins"] else None,
        mu_init=1.0 if paper else None,
        **common,
    )


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------


def prior_loss(score_model, rgb: torch.Tensor, label: torch.Tensor, n: int, seed: int) -> float:
    """The prior's conditional DSM loss of the image, ``0.5 mean ||eps_hat(x_t) - eps||^2`` averaged
    over ``n`` fixed draws of ``t ~ U[t_eps, 1]`` and ``eps`` (``lcss_prior.losses.SDELoss``)."""
    from lcss_prior.losses import SDELoss

    sde = score_model.prior.sde
    loss = SDELoss(sde, method="dsm", reduction="mean")
    x0 = score_model.encode(rgb).expand(n, -1, -1, -1)

    def model_fn(x_t, t, cond):
        return score_model.eps(x_t, t, cond, 1.0)

    with torch.no_grad():
        return loss(model_fn, x0, label.repeat(n), torch.Generator().manual_seed(seed)).mean().item()


def measure(dist, rgb, label, render, s: Settings, seed: int) -> dict[str, float]:
    from threestudio_ssd.stein import between_timestep_variance, timestep_bin

    est = dist.estimate_variance(
        rgb, label, render, n_draws=s.n_draws, generator=torch.Generator().manual_seed(seed), batch_size=16
    )
    # the floor's bins: the most (up to --floor-bins) in which every non-empty bin has two draws
    # (coarser bins give a lower bound of the floor)
    n_bins = s.floor_bins
    while n_bins > 1 and (lambda c: bool(((c > 0) & (c < 2)).any()))(
        torch.bincount(timestep_bin(est.t, n_bins), minlength=n_bins)
    ):
        n_bins -= 1
    floor = between_timestep_variance(est.sds, est.t, n_bins)
    return {
        "floor_bins": n_bins,
        "var": est.var_ssd,
        "var_sds": est.var_sds,
        "ratio": est.ratio,
        "between_share_sds": floor.between_share,
        "floor_ratio": floor.between / est.var_sds if est.var_sds > 0 else math.nan,
        "n_fallback": est.n_fallback,
    }


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def run(s: Settings, out_dir: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from threestudio_ssd.baselines import build_baseline

    if s.threads:
        torch.set_num_threads(s.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        score_model, depth_model, prior_dir, depth_dir = load_models(s, Path(tmp))
    label = torch.tensor([score_model.caption_to_label(s.caption)])
    render, true_rgb = scene(s, score_model.resolution)
    depth = build_baseline("depth", estimator=depth_model)

    init = 0.3 * torch.randn(1, 3, *score_model.resolution, generator=torch.Generator().manual_seed(s.seed))
    arms: dict[str, dict[str, Any]] = {}
    for name in s.arms:
        dist = build_arm(name, s, score_model, depth)
        logits = init.clone().requires_grad_(True)
        groups = [{"params": [logits], "lr": s.lr}]
        if dist.mu is not None and dist.config.mu_mode == "learned":
            groups.append({"params": list(dist.mu.parameters()), "lr": s.mu_lr})
        if dist.particle is not None:
            groups.append(
                {"params": [p for p in dist.particle.parameters() if p.requires_grad], "lr": s.particle_lr}
            )
        arms[name] = {
            "dist": dist,
            "logits": logits,
            "opt": torch.optim.Adam(groups),
            "generator": torch.Generator().manual_seed(s.seed + 1),
            "times": [],
            "evals": [],
            "snapshots": [],
        }

    def evaluate(step: int) -> None:
        for arm in arms.values():
            rgb = torch.sigmoid(arm["logits"]).detach()
            m = measure(arm["dist"], rgb, label, render, s, seed=10_000 + step)
            m["prior_loss"] = prior_loss(score_model, rgb, label, s.n_loss_draws, seed=20_000 + step)
            m["step"] = step
            arm["evals"].append(m)
            arm["snapshots"].append(rgb[0])

    evaluate(0)
    for step in tqdm(range(1, s.steps + 1), desc="variance_2d", unit="step"):
        for arm in arms.values():
            start = time.perf_counter()
            rgb = torch.sigmoid(arm["logits"])
            out = arm["dist"](rgb, label, render, generator=arm["generator"])
            loss = out.loss
            for extra in (out.loss_mu, out.loss_vsd_particle):
                if extra is not None:
                    loss = loss + extra
            arm["opt"].zero_grad(set_to_none=True)
            loss.backward()
            arm["opt"].step()
            arm["times"].append(time.perf_counter() - start)
        if step % s.eval_every == 0 or step == s.steps:
            evaluate(step)
            write_outputs(s, arms, out_dir, true_rgb, prior_dir, depth_dir, final=False)
    return write_outputs(s, arms, out_dir, true_rgb, prior_dir, depth_dir, final=True)


def summarise(s: Settings, arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per arm: ratio at the last evaluation and its mean over the evaluations after step 0 (at
    step 0 every ``mu`` is its initial value), the prior loss, step times relative to SDS."""
    sds_time = statistics.median(arms["sds"]["times"])
    out = {}
    for name, arm in arms.items():
        later = [e for e in arm["evals"] if e["step"] > 0] or arm["evals"]
        out[name] = {
            "ratio_final": arm["evals"][-1]["ratio"],
            "ratio_mean": statistics.fmean(e["ratio"] for e in later),
            "between_share_sds_mean": statistics.fmean(e["between_share_sds"] for e in later),
            "floor_ratio_mean": statistics.fmean(e["floor_ratio"] for e in later),
            "prior_loss_initial": arm["evals"][0]["prior_loss"],
            "prior_loss_final": arm["evals"][-1]["prior_loss"],
            "step_time_median_s": statistics.median(arm["times"]),
            "step_time_ratio_to_sds": statistics.median(arm["times"]) / sds_time,
            "n_fallback_total": float(sum(e["n_fallback"] for e in arm["evals"])),
        }
    if "ssd-optimal-bins" in out and "const-optimal-bins" in out:
        out["depth_contribution"] = {
            "ratio_mean": out["ssd-optimal-bins"]["ratio_mean"] / out["const-optimal-bins"]["ratio_mean"],
            "ratio_final": out["ssd-optimal-bins"]["ratio_final"] / out["const-optimal-bins"]["ratio_final"],
        }
    return out


def write_outputs(s, arms, out_dir: Path, true_rgb, prior_dir, depth_dir, final: bool) -> dict[str, Any]:
    result = {
        "settings": {
            **asdict(s),
            "prior": repo_relative(s.prior) if s.prior else None,
            "depth_model": repo_relative(s.depth_model) if s.depth_model else None,
        },
        "prior_dir": prior_dir,
        "depth_model_dir": depth_dir,
        "complete": final,
        "summary": summarise(s, arms),
        "arms": {name: {"evals": arm["evals"], "step_times_s": arm["times"]} for name, arm in arms.items()},
    }
    (out_dir / "variance_2d.json").write_text(json.dumps(result, indent=1) + "\n")
    if final:
        plot(arms, out_dir, true_rgb)
    return result


def plot(arms: dict[str, dict[str, Any]], out_dir: Path, true_rgb: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, fname, ylabel, log in (
        ("ratio", "variance_ratio.png", "gradient variance / SDS's (same image, same draws)", True),
        ("prior_loss", "prior_loss.png", "prior DSM loss of the image", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, arm in arms.items():
            ax.plot(
                [e["step"] for e in arm["evals"]],
                [e[key] for e in arm["evals"]],
                marker="o",
                ms=3,
                label=name,
            )
        if key == "ratio":
            sds = arms["sds"]["evals"]
            ax.plot(
                [e["step"] for e in sds],
                [e["floor_ratio"] for e in sds],
                "k--",
                label="between-t floor (SDS image)",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)

    n_snap = max(len(arm["snapshots"]) for arm in arms.values())
    fig, axes = plt.subplots(
        len(arms), n_snap + 1, figsize=(1.3 * (n_snap + 1), 1.3 * len(arms)), squeeze=False
    )
    for row, (name, arm) in enumerate(arms.items()):
        for col in range(n_snap + 1):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == n_snap:
                img = true_rgb[0]
                ax.set_title("true render" if row == 0 else "", fontsize=6)
            elif col < len(arm["snapshots"]):
                img = arm["snapshots"][col]
                if row == 0:
                    ax.set_title(f"step {arm['evals'][col]['step']}", fontsize=6)
            else:
                continue
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        axes[row][0].set_ylabel(name, fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "images.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, out_dir = parse_args(argv)
    result = run(settings, out_dir)
    width = max(len(n) for n in result["summary"])
    print(f"{'arm':<{width}}  ratio_mean  ratio_final  floor  prior_loss  time/sds")
    for name, row in result["summary"].items():
        if name == "depth_contribution":
            print(f"depth baseline's own contribution (ssd-optimal-bins / const-optimal-bins): {row}")
            continue
        print(
            f"{name:<{width}}  {row['ratio_mean']:10.3f}  {row['ratio_final']:11.3f}  "
            f"{row['floor_ratio_mean']:5.3f}  {row['prior_loss_final']:10.4f}  {row['step_time_ratio_to_sds']:8.2f}"
        )
    return result


if __name__ == "__main__":
    main()
