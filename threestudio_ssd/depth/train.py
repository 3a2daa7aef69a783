"""``ssd-train-depth``: train a small DPT on ``shapes`` renders, a depth model this CPU can make.

The model is a transformers ``DPTForDepthEstimation`` with a tiny ViT backbone, randomly
initialised, trained to predict disparity (``1 / depth`` on the object, 0 on the empty background,
i.e. infinitely far) with the scale-and-shift-invariant loss of MiDaS (Ranftl et al. 2020): per
image, the prediction is aligned to the target by least squares over the valid pixels,
``(s, c) = argmin sum (s * pred + c - target)^2``, and the loss is the mean absolute (``l1``) or
squared (``l2``) residual of the aligned prediction. Over the whole image, that loss is dominated
by the object/background step (disparity ~0.6 against 0) and leaves the object's own relief --
what the ``depth`` baseline correlates in object mode -- almost unconstrained (a first 400-step run
reached a held-out foreground Pearson of -0.37); a second term, the same loss over the object
only divided by the object's disparity spread (``--fg-weight``), weighs that relief equally. It is saved with ``save_pretrained`` together
with a ``preprocessor_config.json`` (size, normalisation) so that
:func:`threestudio_ssd.depth.load_depth_estimator` loads it exactly like a MiDaS/DPT checkpoint,
and trained *through* that same :class:`DepthEstimator` path (the differentiable torch
preprocessing), so training and inference see identical inputs.

Held-out quality is measured on views from another split and seed (``evaluate``): per image over
the foreground, the Pearson correlation between predicted and true disparity, and after
least-squares scale-shift alignment the mean absolute error and AbsRel (``mean |d' - d| / d``) in
disparity.

Example (the run reported in docs/depth.md)::

    ssd-train-depth --output runs/depth-shapes-64 --steps 400 --batch-size 8 --lr 1e-3 \\
        --train-size 768 --eval-size 128 --num-threads 1 --cache-dir runs/shapes-cache
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from threestudio_ssd.baselines.ops import (
    depth_to_disparity,
    masked_pearson,
    median_mad_normalize,
    scale_shift_align,
)
from threestudio_ssd.depth.estimator import DepthEstimator, Preprocessing, load_depth_estimator


def scale_shift_invariant_loss(
    pred: Float[Tensor, "B H W"],
    target: Float[Tensor, "B H W"],
    mask: Bool[Tensor, "B H W"],
    kind: str = "l1",
) -> Float[Tensor, " B"]:
    """Per-image MiDaS loss ``mean_mask rho(n(pred) - n(target))`` with ``n`` the median /
    mean-absolute-deviation normalisation over the mask (:func:`median_mad_normalize`) and
    ``rho = |.|`` (``l1``) or ``(.)^2`` (``l2``). Both scales are positive, so an inverted relief
    costs as much as a wrong one (a least-squares fit with a free sign would align it away).
    Un-reduced: one value per image."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"loss kind must be 'l1' or 'l2', got {kind!r}")
    residual = median_mad_normalize(pred, mask) - median_mad_normalize(target, mask)
    rho = residual.abs() if kind == "l1" else residual**2
    m = mask.to(pred.dtype)
    return (rho * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)


def render_split(
    size: int, resolution: int, seed: int, split: str, supersample: int = 2, cache: str | Path | None = None
) -> dict[str, Tensor]:
    """Render ``size`` shapes views once: ``rgb [N,3,H,W]`` in [0,1], ``disparity [N,H,W]``
    (``1/depth`` on the object, 0 outside), ``mask [N,H,W]``, ``depth``, ``normal``, ``c2w``, ``fovy``."""
    from lcss_prior.data.shapes import ShapesDataset

    ds = ShapesDataset(
        size=size, resolution=resolution, seed=seed, split=split, supersample=supersample, cache=cache
    )
    batch = ds.stacked()  # batched renders, or the cache file read back
    out = {key: batch[key] for key in ("depth", "mask", "normal", "c2w", "fovy")}
    out["rgb"] = (batch["image"] + 1.0) / 2.0
    out["disparity"] = depth_to_disparity(out["depth"], out["mask"])
    return out


@torch.no_grad()
def evaluate(estimator: DepthEstimator, data: dict[str, Tensor], batch_size: int = 32) -> dict[str, float]:
    """Held-out quality over the foreground of each image, averaged over images.

    ``pearson``: correlation of predicted and true disparity (a metric-depth model's output is
    inverted first); ``mae``/``abs_rel``: ``mean |d' - d|`` and ``mean |d' - d| / d`` with ``d'``
    the prediction aligned to the true disparity ``d`` by least-squares scale and shift.
    Images where the correlation is undefined count in ``n_invalid`` and not in the means.
    """
    pearson, mae, abs_rel = [], [], []
    n_invalid = 0
    for start in range(0, data["rgb"].shape[0], batch_size):
        rgb = data["rgb"][start : start + batch_size]
        target = data["disparity"][start : start + batch_size]
        mask = data["mask"][start : start + batch_size]
        pred = estimator(rgb)
        if estimator.output_kind == "metric_depth":
            pred = depth_to_disparity(pred)
        r, valid = masked_pearson(pred, target, mask)
        aligned = scale_shift_align(pred, target, mask)
        m = mask.to(pred.dtype)
        n = m.sum((1, 2)).clamp_min(1.0)
        err = (aligned - target).abs() * m
        safe_target = torch.where(mask, target, torch.ones_like(target))
        pearson.append(r[valid])
        mae.append((err.sum((1, 2)) / n)[valid])
        abs_rel.append(((err / safe_target).sum((1, 2)) / n)[valid])
        n_invalid += int((~valid).sum())
    return {
        "pearson": torch.cat(pearson).mean().item(),
        "mae": torch.cat(mae).mean().item(),
        "abs_rel": torch.cat(abs_rel).mean().item(),
        "n_images": int(data["rgb"].shape[0]),
        "n_invalid": n_invalid,
    }


def build_model(
    resolution: int, *, hidden_size: int, layers: int, heads: int, patch_size: int, seed: int
) -> DepthEstimator:
    """A randomly initialised tiny DPT (ViT backbone) wrapped with the preprocessing it is saved with:
    input size ``resolution``, mean/std 0.5 (DPT's)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    if resolution % patch_size:
        raise ValueError(f"--resolution {resolution} must be a multiple of --patch-size {patch_size}")
    if hidden_size % heads:
        raise ValueError(f"--hidden-size {hidden_size} must be divisible by --heads {heads}")
    if layers < 4:
        raise ValueError(f"--layers must be >= 4 (DPT reads 4 backbone stages), got {layers}")
    config = DPTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        image_size=resolution,
        patch_size=patch_size,
        backbone_out_indices=[layers // 4 - 1, layers // 2 - 1, 3 * layers // 4 - 1, layers - 1],
        neck_hidden_sizes=[hidden_size // 4, hidden_size // 2, hidden_size, hidden_size],
        fusion_hidden_size=hidden_size // 2,
        head_in_index=-1,
    )
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config)
    # transformers initialises every convolution like the ViT's linear layers, N(0, 0.02^2), which
    # suits fine-tuning but makes a fresh DPT output ~1e-8 (each conv shrinks its input); the first
    # optimiser step then moves the last bias by ~lr, below every output, and the final ReLU dies.
    # Training from scratch, the neck and head convolutions get PyTorch's default (Kaiming-uniform)
    # initialisation instead, and the last bias starts at 1, the scale of the target disparities.
    for module in (*model.neck.modules(), *model.head.modules()):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    torch.nn.init.constant_(model.head.head[-2].bias, 1.0)
    preprocessing = Preprocessing(
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        size=(resolution, resolution),
        keep_aspect_ratio=False,
        multiple=patch_size,
        resample="bilinear",
    )
    return DepthEstimator(model, preprocessing, "relative_inverse_depth", name="dpt-shapes")


def save(estimator: DepthEstimator, output: Path, record: dict) -> None:
    """``save_pretrained`` the network, its image-processor config and ``training.json``."""
    from transformers import DPTImageProcessor

    output.mkdir(parents=True, exist_ok=True)
    estimator.model.save_pretrained(output)
    p = estimator.preprocessing
    DPTImageProcessor(
        size={"height": p.size[0], "width": p.size[1]},
        image_mean=list(p.mean),
        image_std=list(p.std),
        keep_aspect_ratio=p.keep_aspect_ratio,
        ensure_multiple_of=p.multiple,
        resample=2 if p.resample == "bilinear" else 3,
    ).save_pretrained(output)
    (output / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def train(args: argparse.Namespace) -> dict:
    """Train, evaluate before and after, save; returns the record written to ``training.json``."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    cache = Path(args.cache_dir) if args.cache_dir else None
    eval_seed = args.seed + 1
    data = {}
    for split, size, seed in (("train", args.train_size, args.seed), ("test", args.eval_size, eval_seed)):
        name = f"shapes-{split}-{args.resolution}px-{size}-seed{seed}-ss{args.supersample}.pt"
        data[split] = render_split(
            size, args.resolution, seed, split, args.supersample, cache=cache / name if cache else None
        )
    train_data, eval_data = data["train"], data["test"]
    estimator = build_model(
        args.resolution,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        patch_size=args.patch_size,
        seed=args.seed,
    )
    model = estimator.model
    model.requires_grad_(True)  # the wrapper freezes; training unfreezes (no dropout/BN: eval == train)
    before = evaluate(estimator, eval_data)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda k: (
            min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, args.steps) / args.steps))
        ),
    )
    g = torch.Generator().manual_seed(args.seed)
    n = train_data["rgb"].shape[0]
    valid_all = torch.ones_like(train_data["mask"])  # background has a true disparity too (0)
    start = time.time()
    bar = tqdm(range(args.steps), desc="training depth DPT")
    for _ in bar:
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        rgb, target, fg = train_data["rgb"][idx], train_data["disparity"][idx], train_data["mask"][idx]
        flip = torch.rand(args.batch_size, generator=g) < 0.5  # mirror views: still valid renders
        rgb = torch.where(flip[:, None, None, None], rgb.flip(-1), rgb)
        target = torch.where(flip[:, None, None], target.flip(-1), target)
        fg = torch.where(flip[:, None, None], fg.flip(-1), fg)
        pred = estimator(rgb)
        loss = scale_shift_invariant_loss(pred, target, valid_all[idx], args.loss)
        if args.fg_weight > 0:
            loss = loss + args.fg_weight * scale_shift_invariant_loss(pred, target, fg, args.loss)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.time() - start
    model.requires_grad_(False)
    after = evaluate(estimator, eval_data)
    record = {
        "arguments": vars(args),
        "held_out": {
            "split": "test",
            "seed": eval_seed,
            "size": args.eval_size,
            "before": before,
            "after": after,
        },
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save(estimator, output, record)
    # The saved folder must load through the public loader and reproduce the numbers.
    reloaded = evaluate(load_depth_estimator(output), eval_data)
    if abs(reloaded["pearson"] - after["pearson"]) > 1e-4:
        raise RuntimeError(f"reloaded model disagrees with the trained one: {reloaded} vs {after}")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ssd-train-depth", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder to save the model in (save_pretrained format)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--train-size", type=int, default=2048, help="number of pre-rendered training views")
    p.add_argument("--eval-size", type=int, default=256, help="number of held-out views (split test, seed+1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=("l1", "l2"), default="l1")
    p.add_argument(
        "--fg-weight",
        type=float,
        default=1.0,
        help="weight of a second scale-shift-invariant term over the object only, divided by the "
        "object's disparity spread (0 disables it)",
    )
    p.add_argument(
        "--min-pearson",
        type=float,
        default=0.5,
        help="exit non-zero (the model is still saved) when the held-out foreground Pearson after "
        "training is below this; a negative one means inverted relief (default 0.5)",
    )
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--supersample", type=int, default=2, help="anti-aliasing of the renders (shapes default)")
    p.add_argument("--cache-dir", default=None, help="keep rendered views here between runs (optional)")
    p.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "train_size", "eval_size", "resolution"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.resolution % args.patch_size:
        p.error(f"--resolution {args.resolution} must be a multiple of --patch-size {args.patch_size}")
    if args.hidden_size % args.heads:
        p.error(f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}")
    if args.layers < 4:
        p.error(f"--layers must be >= 4 (DPT reads 4 backbone stages), got {args.layers}")
    return args


def check_quality(after: dict, min_pearson: float) -> str | None:
    """The reason a trained model is not good enough, or None. A negative held-out foreground
    Pearson means the model predicts the relief upside down (inverted disparity)."""
    r = after["pearson"]
    if r < 0:
        return (
            f"held-out foreground Pearson is NEGATIVE ({r:.3f}): the model predicts inverted relief "
            f"(far parts near); the depth baseline would read agreement as disagreement"
        )
    if r < min_pearson:
        return f"held-out foreground Pearson {r:.3f} is below --min-pearson {min_pearson}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = train(args)
    h = record["held_out"]
    print(
        json.dumps({"output": args.output, "held_out": h, "train_seconds": record["train_seconds"]}, indent=2)
    )
    problem = check_quality(h["after"], args.min_pearson)
    if problem is not None:
        print(
            f"ssd-train-depth: NOT A GOOD MODEL: {problem}. It is saved in {args.output} for "
            "inspection; train longer or with another --seed before using it.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
