"""How far mixed precision moves the score-matching losses and their gradients from float32.

LCSS's Stein term divides the difference of two network outputs ``S(x + s eps) - S(x)`` by the
radius ``s = c std(t)``; at the default ``c = 0.01`` that difference is ~1% of each output, and a
half-precision autocast rounds each output to ~0.4% (bfloat16) or ~0.05% (float16) on its own. This
script measures, on the shipped prior's network (trained weights) and real shapes renders, the
loss and the parameter gradient of each method under ``torch.autocast`` against the same batch,
draws and weights in float32: the loss's relative error, the gradient's cosine to float32's and its
relative error ``||g - g32|| / ||g32||``. The float32 gradient's own noise scale is given by a
second float32 draw (another ``eps``): an error below it is harmless, one above it is not.

    python benchmarks/lcss_precision.py --out benchmarks/results/lcss_precision.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", default=None, help="exported prior (default: the shipped shapes prior)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--methods", default="lcss,dsm", help="comma-separated SDELoss methods")
    p.add_argument("--smoothing", type=float, default=0.01, help="LCSS radius c")
    p.add_argument("--dtypes", default="bfloat16,float16", help="autocast dtypes to compare with float32")
    p.add_argument("--repeats", type=int, default=3, help="batches (seeds) per setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the numbers")
    return p.parse_args(argv)


def flat_grad(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten() for p in net.parameters() if p.grad is not None])


def loss_and_grad(net, loss_fn, x0, labels, seed: int, dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """One loss and parameter gradient; ``dtype`` None is float32, else ``torch.autocast`` (CPU)."""
    net.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = loss_fn(net, x0, labels, generator=gen).mean()
    loss.float().backward()
    return float(loss.detach()), flat_grad(net)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from lcss_prior.data.shapes import ShapesDataset
    from lcss_prior.export import load_prior
    from lcss_prior.losses import SDELoss
    from threestudio_ssd.shipped import PRIOR, repo_relative, shipped_model

    torch.set_num_threads(args.threads)
    prior_dir = args.prior or str(shipped_model(PRIOR))
    prior = load_prior(prior_dir)
    net = prior.network.float()
    net.requires_grad_(True)
    net.train(False)
    data = ShapesDataset(size=args.batch * args.repeats, resolution=prior.resolution, split="test", return_geometry=False)
    rows = []
    for method in args.methods.split(","):
        loss_fn = SDELoss(prior.sde, method=method, smoothing=args.smoothing)
        for r in range(args.repeats):
            items = [data[i] for i in range(r * args.batch, (r + 1) * args.batch)]
            x0 = torch.stack([it["image"] for it in items])
            labels = torch.tensor([it["label"] for it in items])
            l32, g32 = loss_and_grad(net, loss_fn, x0, labels, seed=r, dtype=None)
            # the float32 gradient's own noise: the same batch with other draws
            _, g32b = loss_and_grad(net, loss_fn, x0, labels, seed=1000 + r, dtype=None)
            row = {
                "method": method,
                "repeat": r,
                "loss_fp32": l32,
                "noise_rel": ((g32b - g32).norm() / g32.norm()).item(),
            }
            for name in args.dtypes.split(","):
                dtype = getattr(torch, name)
                try:
                    lh, gh = loss_and_grad(net, loss_fn, x0, labels, seed=r, dtype=dtype)
                except RuntimeError as err:  # an autocast dtype this CPU build does not support
                    row[name] = {"error": str(err).splitlines()[0]}
                    continue
                row[name] = {
                    "loss": lh,
                    "loss_rel_error": abs(lh - l32) / abs(l32) if l32 else math.nan,
                    "grad_cosine": torch.nn.functional.cosine_similarity(gh, g32, dim=0).item(),
                    "grad_rel_error": ((gh - g32).norm() / g32.norm()).item(),
                    "finite": bool(math.isfinite(lh) and torch.isfinite(gh).all()),
                }
            rows.append(row)
            print(json.dumps(row))
    return {"prior": repo_relative(prior_dir), "settings": vars(args) | {"prior": repo_relative(prior_dir)}, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
