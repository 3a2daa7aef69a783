"""Variance per unit of compute, at fixed renders of the 2-D playground: does an estimator beat
simply drawing more noise?

SDS with ``n`` independent noise draws per step has variance ``V / n`` at ``n`` score-model calls,
so an estimator pays for itself only if ``variance x cost`` is below SDS's. For every arm this
script measures, at fixed images under the shapes prior (``variance_2d.py``'s setting: caption,
camera, true depth for the depth baseline, guidance scale):

* **per-step variance**: ``--samples`` independent steps of the arm at the render
  (``ScoreDistillation.estimate_variance``: each sample is one step, i.e. the mean of its
  ``noise_draws`` draws), ``Var = E||g - E g||^2`` and its standard error;
* **the optimiser's view**: Adam's first moment ``m_hat`` (``beta1 = --beta1``, bias-corrected)
  after ``--sequence-steps`` steps, over ``--sequences`` independent sequences at the same render
  (one render slot each). For arms whose steps are independent draws (everything but ``golden``
  and ``antithetic="steps"``) its variance is the per-step variance times a constant, so the
  ratio to SDS is the per-step ratio; the sequence arms are run;
* **cost**: wall time of one optimiser step on the image (forward and backward, batch 1), all arms
  interleaved in one loop (``--timing-reps`` rounds, median), and the number of score-model calls
  (``noise_draws``; the depth arms add a decode and a depth network per draw);
* **efficiency** = variance ratio x cost ratio, both to single-draw SDS (< 1: better than drawing
  more noise), per step and for ``m_hat``, by wall time and by score-model calls.

Besides the arms, SDS's variance at each render is split (law of total variance, ``(t, eps)`` and
``(t, -eps)`` draws) into the share between timesteps (the spread of ``E[g | t]``), the share odd in
``eps`` within ``t`` (what an antithetic pair removes) and the even remainder; and the share of the
part LINEAR in ``eps``, ``w (sigma J(alpha x0) eps - eps)`` with the Jacobian-vector product by a
central difference, with the within-``t`` variance left after subtracting it (what the
linearisation control variate ``sigma J(alpha x0) eps`` can reach, at two more score-model calls or
one JVP): the map of what each kind of estimator can reach.

Renders (per seed): ``start`` (the playground's initial image ``sigmoid(0.3 N(0, I))``), ``halfway``
(its average with the true render) and ``target`` (the true render of the caption's object).

    python benchmarks/efficiency_2d.py --out benchmarks/results/efficiency_2d
    python benchmarks/efficiency_2d.py --quick --out runs/efficiency_2d-quick   # tiny random prior
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without ``pip install -e``
    sys.path.insert(0, str(REPO))

from benchmarks.harness import interleaved_rounds, timed  # noqa: E402 - after the sys.path insert

_SDS = {"estimator": "sds"}
_SSD = {"estimator": "ssd", "mu_mode": "optimal"}
ARMS: dict[str, dict[str, Any]] = {
    "sds": _SDS,
    "sds-n2": {**_SDS, "noise_draws": 2},
    "sds-n4": {**_SDS, "noise_draws": 4},
    "sds-n8": {**_SDS, "noise_draws": 8},
    "sds-n4-strat": {**_SDS, "noise_draws": 4, "t_sampling": "stratified"},
    "sds-n8-strat": {**_SDS, "noise_draws": 8, "t_sampling": "stratified"},
    "sds-n2-pairs": {**_SDS, "noise_draws": 2, "antithetic": "pairs"},
    "sds-n4-strat-pairs": {**_SDS, "noise_draws": 4, "t_sampling": "stratified", "antithetic": "pairs"},
    "sds-n8-strat-pairs": {**_SDS, "noise_draws": 8, "t_sampling": "stratified", "antithetic": "pairs"},
    "sds-golden": {**_SDS, "t_sampling": "golden"},
    "sds-golden-steps": {**_SDS, "t_sampling": "golden", "antithetic": "steps"},
    "sds-n4-golden": {**_SDS, "noise_draws": 4, "t_sampling": "golden"},
    "const-optimal-bins": {**_SSD, "depth": False},
    "const-optimal-pixel-bins": {**_SSD, "depth": False, "mu_shape": "pixel"},
    "const-linear-optimal-bins": {**_SSD, "depth": False, "linear_cv": True},
    "ssd-optimal-bins": {**_SSD, "depth": True},
    "paper-optimal-bins": {**_SSD, "depth": True, "include_constant": False, "mu_init": 1.0},
}
"""Arm -> ``DistillationConfig`` fields (``depth``: the depth baseline; ``*-bins``: ``mu`` per t bin;
``*-pixel-*``: one weight per pixel and bin, the cheap per-pixel, per-t reference; ``*-linear-*``: the
linearisation control variate, ``linear_cv``)."""
SEQUENCE_ARMS = ("sds", "sds-golden", "sds-golden-steps", "sds-n4-golden")
"""Arms whose ``m_hat`` is measured by running sequences (``sds`` checks the iid formula)."""
RENDERS = ("start", "halfway", "target")
LINEAR_DELTA = 0.01
"""Relative step of the central difference ``(eps_hat(alpha x0 + d sigma eps) - eps_hat(alpha x0 -
d sigma eps)) / 2d ~ sigma J(alpha x0) eps`` behind the linear share of SDS's variance."""


@dataclass
class Settings:
    prior: str | None
    depth_model: str | None
    caption: str
    seeds: list[int]
    renders: list[str]
    arms: list[str]
    samples: int
    sequences: int
    sequence_steps: int
    beta1: float
    warmup_steps: int
    t_bins: int
    split_draws: int
    timing_reps: int
    guidance_scale: float
    threads: int | None
    quick: bool


def _variance_2d():
    """``benchmarks/variance_2d.py`` as a module (its model loading and scene)."""
    from threestudio_ssd.testing import load_script

    return load_script(REPO / "benchmarks" / "variance_2d.py")


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", default=None, help="exported lcss-prior folder (default: the shipped one)")
    p.add_argument("--depth-model", default=None, help="depth checkpoint folder (default: the shipped one)")
    p.add_argument("--caption", default="a red cube")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (initial image and draws)")
    p.add_argument("--renders", default=",".join(RENDERS), help=f"comma-separated subset of {list(RENDERS)}")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    p.add_argument("--samples", type=int, default=48, help="independent steps per per-step variance")
    p.add_argument("--sequences", type=int, default=48, help="independent sequences per m_hat variance")
    p.add_argument("--sequence-steps", type=int, default=30, help="steps per sequence")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam's beta1 of the moving average")
    p.add_argument("--warmup-steps", type=int, default=12, help="steps (of 16 slots) that fit the optimal mu")
    p.add_argument("--t-bins", type=int, default=5, help="timestep bins of the *-bins arms' mu")
    p.add_argument("--split-draws", type=int, default=64, help="(t, eps) pairs of SDS's variance split")
    p.add_argument("--timing-reps", type=int, default=12, help="interleaved timing rounds")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny random prior and depth model, small sizes")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    seeds = [int(v) for v in a.seeds.split(",") if v.strip()]
    renders = [r for r in a.renders.split(",") if r]
    arms = [r for r in a.arms.split(",") if r]
    for name, chosen, known in (("renders", renders, RENDERS), ("arms", arms, ARMS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; known: {list(known)}")
    if "sds" not in arms:
        arms.insert(0, "sds")  # every ratio is to SDS
    if a.quick:
        seeds, renders = seeds[:1], renders[:1]
        a.samples, a.sequences, a.sequence_steps, a.warmup_steps = 8, 6, 4, 2
        a.split_draws, a.timing_reps = 8, 2
    for key in ("samples", "sequences", "split_draws"):
        if getattr(a, key) < 2:
            p.error(f"--{key.replace('_', '-')} must be >= 2")
    if not 0.0 < a.beta1 < 1.0:
        p.error(f"--beta1 must be in (0, 1), got {a.beta1}")
    s = Settings(
        prior=a.prior,
        depth_model=a.depth_model,
        caption=a.caption,
        seeds=seeds,
        renders=renders,
        arms=arms,
        samples=a.samples,
        sequences=a.sequences,
        sequence_steps=a.sequence_steps,
        beta1=a.beta1,
        warmup_steps=a.warmup_steps,
        t_bins=a.t_bins,
        split_draws=a.split_draws,
        timing_reps=a.timing_reps,
        guidance_scale=a.guidance_scale,
        threads=a.threads,
        quick=a.quick,
    )
    return s, Path(a.out)


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------


def variance_with_error(samples: torch.Tensor) -> tuple[float, float]:
    """``E||x - E x||^2`` from independent ``samples [K, ...]`` and its standard error (the standard
    deviation of the per-sample squared deviations over ``sqrt(K)``)."""
    x = samples.detach().double().reshape(samples.shape[0], -1)
    k = x.shape[0]
    dev = (x - x.mean(0)).pow(2).sum(1) * k / (k - 1)
    return dev.mean().item(), (dev.std() / math.sqrt(k)).item()


def ema_factor(beta: float, steps: int) -> float:
    """``Var(m_hat) / Var(g)`` for independent steps: Adam's bias-corrected moving average
    ``m_hat = (1 - beta) sum_k beta^(L-1-k) g_k / (1 - beta^L)``."""
    return (1 - beta) ** 2 * (1 - beta ** (2 * steps)) / (1 - beta**2) / (1 - beta**steps) ** 2


def build_arm(name: str, s: Settings, score_model, depth):
    from threestudio_ssd.distillation import ScoreDistillation

    spec = dict(ARMS[name])
    uses_depth = spec.pop("depth", False)
    if spec["estimator"] == "ssd":
        spec["mu_t_bins"] = s.t_bins
    return ScoreDistillation(score_model, [depth] if uses_depth else [], guidance_scale=s.guidance_scale, **spec)


def warm_up(dist, rgb, label, render, s: Settings, seed: int) -> None:
    """Fit an ``optimal`` ``mu`` at the render (16 slots per step), then it stays fixed."""
    if dist.mu is None:
        return
    slots, g = 16, torch.Generator().manual_seed(seed)
    for _ in range(s.warmup_steps):
        dist(rgb.expand(slots, -1, -1, -1), label.repeat(slots), render, generator=g)


def sequence_variance(dist, rgb, label, s: Settings, seed: int) -> dict[str, float]:
    """``--sequences`` independent sequences of ``--sequence-steps`` steps at the render (one slot
    each): the variance of ``m_hat`` at the end and the mean per-step variance over the steps."""
    n, g = s.sequences, torch.Generator().manual_seed(seed)
    beta, m, per_step = s.beta1, None, []
    with torch.no_grad():
        for _ in range(s.sequence_steps):
            grad = dist(rgb.expand(n, -1, -1, -1), label.repeat(n), None, generator=g, update_mu=False).grad
            m = (1 - beta) * grad if m is None else beta * m + (1 - beta) * grad
            per_step.append(variance_with_error(grad)[0])
    m_hat = m / (1 - beta**s.sequence_steps)
    var, err = variance_with_error(m_hat)
    return {"var_mhat": var, "var_mhat_err": err, "var_step_in_sequences": statistics.fmean(per_step)}


def variance_split(score_model, rgb, label, s: Settings, seed: int) -> dict[str, float]:
    """SDS's variance at the render split into between-t, odd-in-eps and even-within-t shares, from
    ``--split-draws`` pairs ``(t, eps)``, ``(t, -eps)`` (law of total variance; the odd and even
    parts of a draw are uncorrelated by the symmetry of ``eps``)."""
    from threestudio_ssd.distillation import ScoreDistillation
    from threestudio_ssd.stein import between_timestep_variance, timestep_bin

    pairs = ScoreDistillation(score_model, estimator="sds", guidance_scale=s.guidance_scale)
    k, g = s.split_draws, torch.Generator().manual_seed(seed)
    t = 0.02 + 0.96 * torch.rand(k, generator=g)
    x0 = score_model.encode(rgb).expand(k, -1, -1, -1)
    eps = torch.randn(x0.shape, generator=g)
    plus = pairs._step(x0, t, eps, label.repeat(k), None).grad
    minus = pairs._step(x0, t, -eps, label.repeat(k), None).grad
    total, _ = variance_with_error(plus)
    odd, even = (plus - minus) / 2, (plus + minus) / 2
    n_bins = max(1, min(8, k // 4))
    split = between_timestep_variance(even, t, n_bins)  # odd parts have E[. | t] = 0
    # the part linear in eps, w (sigma J(alpha x0) eps - eps), J by a central difference (odd in eps,
    # so it is itself a zero-mean control variate for any step); what is left within t after it
    delta = LINEAR_DELTA
    with torch.no_grad():
        cond, w = label.repeat(k), score_model.weight(t).view(-1, 1, 1, 1)
        ahead = score_model.eps(score_model.add_noise(x0, delta * eps, t), t, cond, s.guidance_scale)
        behind = score_model.eps(score_model.add_noise(x0, -delta * eps, t), t, cond, s.guidance_scale)
    linear = w * ((ahead - behind) / (2 * delta) - eps)
    after_linear = between_timestep_variance(plus - linear, t, n_bins)
    # with the best weight per t bin (in-sample least squares: one number per bin, an optimistic
    # but close estimate of what optimal per-t weights reach)
    bins = timestep_bin(t, n_bins)
    flat_plus, flat_lin = plus.flatten(1).double(), linear.flatten(1).double()
    weight = torch.zeros(k, dtype=torch.float64)
    for b in bins.unique():
        sel = bins == b
        centred_p = flat_plus[sel] - flat_plus[sel].mean(0)
        centred_l = flat_lin[sel] - flat_lin[sel].mean(0)
        weight[sel] = (centred_p * centred_l).sum() / centred_l.pow(2).sum().clamp_min(1e-30)
    after_best = between_timestep_variance(plus - weight.view(-1, 1, 1, 1).to(plus) * linear, t, n_bins)
    return {
        "var_sds": total,
        "between_share": split.between / total,
        "odd_share": variance_with_error(odd)[0] / total,
        "even_within_share": split.within / total,
        "linear_share": variance_with_error(linear)[0] / total,
        "within_after_linear_share": after_linear.within / total,
        "within_after_best_linear_share": after_best.within / total,
        "bins": n_bins,
    }


def step_times(dists: dict[str, Any], rgb, label, render, reps: int) -> dict[str, float]:
    """Median wall time of one optimiser step (forward + backward on the image, batch 1) per arm,
    all arms interleaved round by round in a shuffled order after a warm-up round
    (``benchmarks.harness.interleaved_rounds``), so they share the machine's load."""
    logits = torch.logit(rgb.clamp(1e-4, 1 - 1e-4))
    g = torch.Generator().manual_seed(0)

    def step(dist) -> None:
        x = logits.clone().requires_grad_(True)
        dist(torch.sigmoid(x), label, render, generator=g, update_mu=False).loss.backward()

    fns = {name: timed(lambda dist=dist: step(dist)) for name, dist in dists.items()}
    per_round = interleaved_rounds(fns, rounds=reps, steps_per_round=1, seed=0)
    return {name: statistics.median(r["step"] for r in rounds) for name, rounds in per_round.items()}


def score_calls(dist) -> float:
    """Score-model calls per step (each draw one guided call, three with the linearisation control
    variate; the depth arms' decode and depth network are not counted here -- their wall time is)."""
    return float(dist.config.noise_draws * (3 if dist.config.linear_cv else 1))


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def render_image(name: str, seed: int, true_rgb: torch.Tensor) -> torch.Tensor:
    init = torch.sigmoid(0.3 * torch.randn(true_rgb.shape, generator=torch.Generator().manual_seed(seed)))
    return {"start": init, "halfway": 0.5 * (init + true_rgb), "target": true_rgb}[name]


def run(s: Settings, out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from threestudio_ssd.baselines import build_baseline

    v2d = _variance_2d()
    if s.threads:
        torch.set_num_threads(s.threads)
    scene_settings = v2d.Settings(
        **{
            **{f: None for f in v2d.Settings.__dataclass_fields__},
            "prior": s.prior,
            "depth_model": s.depth_model,
            "caption": s.caption,
            "quick": s.quick,
            "elevation": 20.0,
            "azimuth": 30.0,
            "distance": 1.6,
            "fovy": 45.0,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        score_model, depth_model, prior_name, depth_name = v2d.load_models(scene_settings, Path(tmp))
    label = torch.tensor([score_model.caption_to_label(s.caption)])
    render, true_rgb = v2d.scene(scene_settings, score_model.resolution)
    depth = build_baseline("depth", estimator=depth_model)
    results: list[dict[str, Any]] = []
    cases = [(seed, r) for seed in s.seeds for r in s.renders]
    for seed, rname in tqdm(cases, desc="efficiency_2d", unit="render"):
        rgb = render_image(rname, seed, true_rgb)
        dists = {name: build_arm(name, s, score_model, depth) for name in s.arms}
        row: dict[str, Any] = {"seed": seed, "render": rname, "arms": {}}
        row["split"] = variance_split(score_model, rgb, label, s, seed=100 + seed)
        for name, dist in dists.items():
            warm_up(dist, rgb, label, render, s, seed=200 + seed)
            est = dist.estimate_variance(
                rgb, label, render, n_draws=s.samples, generator=torch.Generator().manual_seed(300 + seed),
                batch_size=max(1, 64 // dist.config.noise_draws),
            )
            var, err = variance_with_error(est.ssd)
            arm = {"var_step": var, "var_step_err": err, "score_calls": score_calls(dist)}
            if name in SEQUENCE_ARMS:
                arm.update(sequence_variance(dist, rgb, label, s, seed=400 + seed))
            row["arms"][name] = arm
        for name, sec in step_times(dists, rgb, label, render, s.timing_reps).items():
            row["arms"][name]["step_s"] = sec
        results.append(row)
        write_outputs(s, results, out, prior_name, depth_name)
    return write_outputs(s, results, out, prior_name, depth_name)


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def derive(s: Settings, row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Ratios to SDS at one render: variance (per step and m_hat), cost (wall, calls), efficiency."""
    sds = row["arms"]["sds"]
    factor = ema_factor(s.beta1, s.sequence_steps)
    out = {}
    for name, a in row["arms"].items():
        var_ratio = a["var_step"] / sds["var_step"]
        if "var_mhat" in a:  # measured; SDS's own m_hat variance is the reference
            mhat_ratio = a["var_mhat"] / sds["var_mhat"]
        else:  # independent steps: Var(m_hat) = factor * Var(g), the ratio is the per-step one
            mhat_ratio = var_ratio
        wall = a["step_s"] / sds["step_s"] if "step_s" in a else math.nan
        calls = a["score_calls"] / sds["score_calls"]
        out[name] = {
            "var_ratio": var_ratio,
            "var_ratio_err": var_ratio
            * math.hypot(a["var_step_err"] / a["var_step"], sds["var_step_err"] / sds["var_step"]),
            "mhat_ratio": mhat_ratio,
            "cost_wall": wall,
            "cost_calls": calls,
            "eff_wall": var_ratio * wall,
            "eff_calls": var_ratio * calls,
            "eff_mhat_wall": mhat_ratio * wall,
            "eff_mhat_calls": mhat_ratio * calls,
        }
    if "var_mhat" in sds:
        out["sds"]["mhat_iid_check"] = sds["var_mhat"] / (factor * sds["var_step"])
    return out


def summarise(s: Settings, results: list[dict[str, Any]]) -> dict[str, Any]:
    derived = [derive(s, row) for row in results]
    summary = {}
    for name in s.arms:
        per = [d[name] for d in derived if name in d]
        summary[name] = {
            key: statistics.fmean(p[key] for p in per) for key in per[0] if not key.startswith("mhat_iid")
        } | {
            "eff_wall_max": max(p["eff_wall"] for p in per),
            "eff_mhat_wall_max": max(p["eff_mhat_wall"] for p in per),
        }
    splits = [row["split"] for row in results]
    summary_split = {
        key: statistics.fmean(sp[key] for sp in splits)
        for key in (
            "between_share",
            "odd_share",
            "even_within_share",
            "linear_share",
            "within_after_linear_share",
            "within_after_best_linear_share",
        )
    }
    checks = [d["sds"]["mhat_iid_check"] for d in derived if "mhat_iid_check" in d["sds"]]
    return {
        "arms": summary,
        "split_mean": summary_split,
        "per_render": derived,
        "sds_mhat_iid_check": checks,
    }


def write_outputs(s: Settings, results, out: Path, prior_name: str, depth_name: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(s, results)
    from threestudio_ssd.shipped import repo_relative

    settings = asdict(s)
    for key in ("prior", "depth_model"):  # no path of this machine in a result
        settings[key] = repo_relative(settings[key]) if settings[key] and not s.quick else None
    data = {
        "settings": settings,
        "prior": prior_name,
        "depth_model": depth_name,
        "quick_mode_random_models": s.quick,
        "results": results,
        "summary": summary,
    }
    (out / "efficiency_2d.json").write_text(json.dumps(data, indent=1))
    write_markdown(s, summary, results, out.with_suffix(".md"), prior_name)
    plot(s, summary, out / "efficiency.png")
    return data


def write_markdown(s: Settings, summary, results, path: Path, prior_name: str) -> None:
    cmd = "python benchmarks/efficiency_2d.py " + " ".join(sys.argv[1:])
    lines = [
        "## Variance per unit of compute (`benchmarks/efficiency_2d.py`)",
        "",
    ]
    if s.quick:
        lines += ["**QUICK MODE: tiny RANDOM prior and depth model -- these numbers mean nothing.**", ""]
    lines += [
        f"Command: `{cmd}`",
        "",
        f"Prior {prior_name}; caption {s.caption!r}; seeds {s.seeds}; renders {s.renders} "
        f"({len(results)} render(s)); {s.samples} independent steps per per-step variance; "
        f"m_hat: Adam beta1 {s.beta1}, {s.sequences} sequences of {s.sequence_steps} steps. "
        "Ratios are to single-draw SDS at the same render, then averaged over renders; efficiency = "
        "variance ratio x cost ratio (< 1: better than SDS; SDS with n draws is 1 by score-model calls).",
        "",
        "| arm | Var/Var_SDS per step (+- se) | m_hat Var ratio | cost: wall (calls) | efficiency per step: wall (calls) | efficiency m_hat: wall (calls) | worst render, wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in s.arms:
        a = summary["arms"][name]
        lines.append(
            f"| {name} | {a['var_ratio']:.3f} +- {a['var_ratio_err']:.3f} | {a['mhat_ratio']:.3f} | "
            f"{a['cost_wall']:.2f} ({a['cost_calls']:.0f}) | {a['eff_wall']:.3f} ({a['eff_calls']:.3f}) | "
            f"{a['eff_mhat_wall']:.3f} ({a['eff_mhat_calls']:.3f}) | {a['eff_wall_max']:.3f} |"
        )
    sp = summary["split_mean"]
    lines += [
        "",
        f"SDS's variance at these renders (mean of shares): between timesteps {sp['between_share']:.3f}, "
        f"odd in eps within t {sp['odd_share']:.3f}, even within t {sp['even_within_share']:.3f}; "
        f"the part linear in eps (w (sigma J(alpha x0) eps - eps), what a linearisation control "
        f"variate removes) {sp['linear_share']:.3f}, within-t variance left after removing it "
        f"{sp['within_after_linear_share']:.3f} with weight 1, {sp['within_after_best_linear_share']:.3f} with the "
        f"best weight per t bin (an antithetic pair leaves {sp['even_within_share']:.3f}). "
        f"Check of the iid m_hat formula on SDS (measured / predicted): "
        f"{', '.join(f'{c:.2f}' for c in summary['sds_mhat_iid_check'])}.",
        "",
        f"Figure: `{path.stem}/efficiency.png`; numbers: `{path.stem}/efficiency_2d.json`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(s: Settings, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = s.arms
    fig = Figure(figsize=(max(6, 0.7 * len(names) + 2), 4))
    ax = fig.subplots()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [summary["arms"][n]["eff_wall"] for n in names], 0.4, label="per step")
    ax.bar([i + 0.2 for i in x], [summary["arms"][n]["eff_mhat_wall"] for n in names], 0.4, label="Adam m_hat")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("variance x wall cost, ratio to SDS")
    title = "efficiency vs single-draw SDS (< 1 beats drawing more noise; dashed: target 0.5)"
    ax.set_title(("QUICK MODE, RANDOM MODELS: " if s.quick else "") + title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, out = parse_args(argv)
    if not settings.quick:
        from threestudio_ssd.shipped import DEPTH, PRIOR, shipped_model

        settings.prior = settings.prior or str(shipped_model(PRIOR))
        settings.depth_model = settings.depth_model or str(shipped_model(DEPTH))
    return run(settings, out)


if __name__ == "__main__":
    main()
