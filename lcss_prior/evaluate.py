"""``lcss-prior eval``: measure an exported prior against a data set.

    lcss-prior eval --prior DIR --data digits --metrics bpd,fid,kid,accuracy --n-samples 1000 \
        --features PATH --out report.json

Metrics (a registry, ``METRICS``; each adds keys to the report):

* ``bpd`` -- dequantised bits/dim of the data set's split under the prior's probability-flow ODE
  (``lcss_prior.likelihood.bits_per_dim``, unconditional, Hutchinson trace), mean and standard error.
* ``fid`` / ``kid`` -- between ``n_samples`` generated images (labels spread evenly over the
  captions) and as many data images, in the feature space of ``--features``: an in-domain
  classifier (``lcss_prior.metrics.train_feature_extractor``) or local Inception-v3 weights.
* ``accuracy`` -- the in-domain classifier's accuracy on the generated images against the caption
  each was generated for, overall and per caption (does every caption give recognisable samples?),
  beside its accuracy on the real images for reference.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lcss_prior.likelihood import bits_per_dim
from lcss_prior.metrics import (
    FeatureClassifier,
    classifier_accuracy,
    extract_features,
    fid_from_features,
    kid_from_features,
    load_extractor,
    stack_dataset,
    train_feature_extractor,
)
from lcss_prior.sampling import SAMPLERS, cli_error, sample_prior


class _Context:
    """What the metrics share, computed once on first use: generated samples, real images, features."""

    def __init__(self, prior: Any, dataset: Any, extractor: Any, settings: dict[str, Any]) -> None:
        self.prior, self.dataset, self.extractor, self.settings = prior, dataset, extractor, settings
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def sample_labels(self) -> Tensor | None:
        if self.prior.null_class is None:
            return None
        return torch.arange(self.settings["n_samples"]) % len(self.prior.captions)

    @property
    def samples(self) -> Tensor:
        s = self.settings
        return self._once(
            "samples",
            lambda: sample_prior(
                self.prior,
                self.sample_labels,
                s["n_samples"],
                guidance_scale=s["guidance_scale"],
                method=s["method"],
                steps=s["steps"],
                seed=s["seed"],
                batch_size=s["batch_size"],
                progress=s["progress"],
            ),
        )

    @property
    def real(self) -> tuple[Tensor, Tensor]:
        n, seed = self.settings["n_samples"], self.settings["seed"]
        return self._once("real", lambda: stack_dataset(self.dataset, n, False, seed=seed))

    def features(self, which: str) -> Tensor:
        if self.extractor is None:
            raise ValueError("fid/kid need a feature extractor: pass --features PATH")
        images = self.samples if which == "fake" else self.real[0]
        batch = self.settings["batch_size"]
        return self._once(f"features_{which}", lambda: extract_features(images, self.extractor, batch))


def _metric_bpd(ctx: _Context) -> dict[str, Any]:
    s = ctx.settings
    n_levels = getattr(ctx.dataset, "n_levels", None) or ctx.prior.n_levels
    mean, stderr = bits_per_dim(
        ctx.prior,
        None,
        ctx.dataset,
        n_levels=n_levels,
        batch_size=s["batch_size"],
        max_samples=s["bpd_samples"],
        rtol=s["bpd_tol"],
        atol=s["bpd_tol"],
        seed=s["seed"],
        progress=s["progress"],
    )
    return {
        "bpd": mean,
        "bpd_stderr": stderr,
        "bpd_n": min(s["bpd_samples"], len(ctx.dataset)),
        "n_levels": n_levels,
    }


def _metric_fid(ctx: _Context) -> dict[str, Any]:
    return {"fid": fid_from_features(ctx.features("real"), ctx.features("fake"))}


def _metric_kid(ctx: _Context) -> dict[str, Any]:
    # subsets of 1000 (the usual size) but at most half the samples, so that the std over subsets
    # is informative (subsets as large as the sets are all the same and give std 0)
    real, fake = ctx.features("real"), ctx.features("fake")
    size = max(2, min(1000, min(len(real), len(fake)) // 2))
    mean, std = kid_from_features(real, fake, subset_size=size, seed=ctx.settings["seed"])
    return {"kid_mean": mean, "kid_std": std, "kid_subset_size": size}


def _metric_accuracy(ctx: _Context) -> dict[str, Any]:
    if not isinstance(ctx.extractor, FeatureClassifier):
        raise ValueError("accuracy needs an in-domain classifier (--features from train_feature_extractor)")
    if ctx.sample_labels is None:
        raise ValueError("accuracy needs a class-conditional prior (this one is unconditional)")
    captions = list(ctx.prior.captions)
    if ctx.extractor.captions and list(ctx.extractor.captions) != captions:
        raise ValueError(
            f"the classifier was trained on captions {ctx.extractor.captions}, the prior has {captions}"
        )
    overall, per_label = classifier_accuracy(ctx.extractor, ctx.samples, ctx.sample_labels)
    real_accuracy, _ = classifier_accuracy(ctx.extractor, *ctx.real)
    per_caption = {captions[k]: v for k, v in sorted(per_label.items())}
    return {
        "accuracy": overall,
        "accuracy_min_caption": min(per_caption.values()),
        "accuracy_per_caption": per_caption,
        "accuracy_real": real_accuracy,
    }


METRICS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "bpd": _metric_bpd,
    "fid": _metric_fid,
    "kid": _metric_kid,
    "accuracy": _metric_accuracy,
}


def evaluate_prior(
    prior: Any,
    dataset: Any,
    metrics: Sequence[str] = ("bpd", "fid", "kid", "accuracy"),
    extractor: Any | None = None,
    n_samples: int = 1000,
    guidance_scale: float = 1.0,
    method: str = "pc",
    steps: int = 500,
    seed: int = 0,
    bpd_samples: int = 256,
    bpd_tol: float = 1e-5,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute ``metrics`` (names in ``METRICS``) of ``prior`` against ``dataset`` and return
    ``{"metrics": {...}, "settings": {...}}``. Samples and features are computed once and shared;
    ``bpd_tol`` is the likelihood ODE's ``rtol = atol``."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    if method not in SAMPLERS:
        raise KeyError(f"unknown sampling method {method!r}; registered methods: {sorted(SAMPLERS)}")
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (covariances), got {n_samples}")
    settings = {
        "n_samples": int(n_samples),
        "guidance_scale": float(guidance_scale),
        "method": method,
        "steps": int(steps),
        "seed": int(seed),
        "bpd_samples": int(bpd_samples),
        "bpd_tol": float(bpd_tol),
        "batch_size": int(batch_size),
        "progress": bool(progress),
    }
    ctx = _Context(prior, dataset, extractor, settings)
    results: dict[str, Any] = {}
    for name in metrics:
        results.update(METRICS[name](ctx))
    settings.pop("progress")
    return {"metrics": results, "settings": settings}


def format_table(report: dict[str, Any]) -> str:
    """The report's metrics as an aligned two-column text table (per-caption values indented)."""
    rows: list[tuple[str, str]] = []
    for key, value in report["metrics"].items():
        if isinstance(value, dict):
            rows += [(f"  {key}[{k}]", _fmt(v)) for k, v in value.items()]
        else:
            rows.append((key, _fmt(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# CLI: lcss-prior eval
# --------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``lcss-prior eval``."""
    parser.add_argument("--prior", required=True, help="exported prior folder")
    parser.add_argument("--data", required=True, help="data set name (digits, shapes) or image folder")
    parser.add_argument("--split", default="test", help="data split to compare with (default: test)")
    parser.add_argument("--metrics", default="bpd,fid,kid,accuracy", help=f"comma list of {sorted(METRICS)}")
    parser.add_argument("--n-samples", type=int, default=1000, help="generated (and real) images for fid/kid")
    parser.add_argument("--bpd-samples", type=int, default=256, help="data images for bits/dim")
    parser.add_argument("--bpd-tol", type=float, default=1e-5, help="rtol = atol of the likelihood ODE")
    parser.add_argument("--features", default=None, help="feature extractor file: classifier or Inception")
    parser.add_argument(
        "--train-features",
        type=int,
        default=None,
        metavar="STEPS",
        help="if --features does not exist, train an in-domain classifier on the train split for STEPS "
        "steps and save it there",
    )
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--method", default="pc", help=f"sampler: one of {sorted(SAMPLERS)}")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and the metrics' draws")
    parser.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the data split (default: the one the prior was trained with, from prior.json; "
        "another one is refused for the prior's own data set, whose test split would then overlap "
        "its training images)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    return parser


def data_seed_for(prior: Any, data: str, explicit: int | None) -> int:
    """The seed of the data split to evaluate ``prior`` on. For the data set the prior was trained
    on (``prior.json``'s ``training.data``), the training seed: the digits train/test split is a
    seeded permutation, so another seed's "test" split is mostly training images. Another data
    set: ``explicit``, else 0."""
    training = (getattr(prior, "metadata", None) or {}).get("training") or {}
    if training.get("data") == data and "seed" in training:
        seed = int(training["seed"])
        if explicit is not None and explicit != seed:
            raise ValueError(
                f"--data-seed {explicit} differs from the seed the prior was trained with ({seed}, "
                f"prior.json): its {data!r} test split would overlap the training images; omit --data-seed"
            )
        return seed
    return 0 if explicit is None else explicit


def _dataset(name: str, prior: Any, split: str, seed: int) -> Any:
    from lcss_prior.data import DATASETS, build_dataset

    kwargs = {} if name in DATASETS else {"channels": prior.channels}
    return build_dataset(name, prior.resolution, split=split, seed=seed, **kwargs)


def cli_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``lcss-prior eval``: print the metrics table, write the JSON report if ``--out``."""
    try:
        return _eval_command(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        cli_error("eval", e)


def _eval_command(args: argparse.Namespace) -> dict[str, Any]:
    from lcss_prior.export import load_prior

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    needs_features = {"fid", "kid", "accuracy"} & set(metrics)
    if needs_features and args.features is None:
        raise ValueError(f"metrics {sorted(needs_features)} need --features PATH")
    prior = load_prior(args.prior, device=args.device)
    data_seed = data_seed_for(prior, args.data, args.data_seed)
    dataset = _dataset(args.data, prior, args.split, data_seed)
    extractor = None
    if args.features is not None:
        path = Path(args.features)
        if not path.exists() and args.train_features:
            train_set = _dataset(args.data, prior, "train", data_seed)
            train_feature_extractor(
                train_set, args.train_features, path=path, eval_dataset=dataset, seed=args.seed
            )
        extractor = load_extractor(path, device=args.device)
    report = evaluate_prior(
        prior,
        dataset,
        metrics,
        extractor=extractor,
        n_samples=args.n_samples,
        guidance_scale=args.guidance_scale,
        method=args.method,
        steps=args.steps,
        seed=args.seed,
        bpd_samples=args.bpd_samples,
        bpd_tol=args.bpd_tol,
        batch_size=args.batch_size,
    )
    report = {
        "prior": str(args.prior),
        "data": args.data,
        "split": args.split,
        "data_seed": data_seed,
        "features": args.features,
        **report,
    }
    print(format_table(report))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return report
