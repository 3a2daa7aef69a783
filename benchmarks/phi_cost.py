"""Per-call cost of the ``depth`` baseline with its gradient, relative to one prior evaluation.

Measures, side by side in one process, on one batch of 64 px images:

* ``phi + grad``: ``baseline_value_and_grad`` of the ``depth`` baseline through a DPT depth model
  (the one trained by ``ssd-train-depth``, or a fresh one of the same architecture when no folder is
  given) -- one forward and one backward pass of the estimator;
* ``unet``: one forward pass (no grad) of the project's prior network (``lcss_prior.model.build_unet``,
  a class-conditional diffusers ``UNet2DModel``) at 64 px with ``block_out_channels=(64, 128, 128)``
  and 2 layers per block (a reasonable CPU prior), and of the ``small`` preset;

timed interleaved (so both see the same machine load) and prints median times and ratios. SSD adds ``phi + grad`` to every guidance step, whose
cost is otherwise one (or, with classifier-free guidance, two batched) prior evaluations.

    python benchmarks/phi_cost.py --threads 1          # the shipped models/depth-shapes-64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without ``pip install -e``
    sys.path.insert(0, str(REPO))

from benchmarks.harness import interleaved_rounds, timed  # noqa: E402 - after the sys.path insert


def timed_alternately(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved in a shuffled order per round after a
    warm-up round (``benchmarks.harness.interleaved_rounds``)."""
    per_round = interleaved_rounds({n: timed(fn) for n, fn in fns.items()}, rounds=repeats, steps_per_round=1, seed=0)
    return {name: statistics.median(r["step"] for r in rounds) for name, rounds in per_round.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth-model", default=None, help="depth checkpoint folder (default: the shipped models/depth-shapes-64)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lcss_prior.data.shapes import CAPTIONS, ShapesDataset
    from lcss_prior.model import build_unet
    from threestudio_ssd.baselines import RenderOutputs, build_baseline
    from threestudio_ssd.depth import load_depth_estimator
    from threestudio_ssd.stein import baseline_value_and_grad

    res, b = args.resolution, args.batch_size
    ds = ShapesDataset(size=b, resolution=res, seed=0, supersample=1)
    items = [ds[i] for i in range(b)]
    x0 = torch.stack([it["image"] for it in items])
    render = RenderOutputs(
        depth=torch.stack([it["depth"] for it in items]),
        opacity=torch.stack([it["mask"] for it in items]).float(),
    )
    if args.depth_model is None:
        from threestudio_ssd.shipped import DEPTH, shipped_model

        args.depth_model = shipped_model(DEPTH)
    estimator = load_depth_estimator(args.depth_model)
    baseline = build_baseline("depth", estimator=estimator)
    x_t = x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def phi_and_grad():
        return baseline_value_and_grad(lambda x: baseline((x + 1) / 2, render).phi, x_t)

    unets = {
        "unet (64,128,128)x2": build_unet(
            res, 3, len(CAPTIONS), block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16
        ),
        "unet preset small": build_unet(res, 3, len(CAPTIONS), preset="small"),
    }
    t = torch.full((b,), 500)
    labels = torch.zeros(b, dtype=torch.long)

    def forward(unet):
        @torch.no_grad()
        def run():
            return unet.eval()(x_t, t, class_labels=labels).sample

        return run

    fns = {"depth phi + grad": phi_and_grad, **{name: forward(u) for name, u in unets.items()}}
    secs = timed_alternately(fns, args.repeats)
    sizes = {"depth phi + grad": estimator, **unets}
    print(f"batch {b} x 3 x {res} x {res}, torch threads {torch.get_num_threads()}, {args.repeats} repeats")
    for name, s in secs.items():
        n = sum(q.numel() for q in sizes[name].parameters()) / 1e6
        print(f"{name:22s}: {s * 1e3:8.1f} ms  ({n:.2f} M parameters)")
    for name in unets:
        print(f"ratio phi+grad / {name} forward = {secs['depth phi + grad'] / secs[name]:.2f}")


if __name__ == "__main__":
    main()
