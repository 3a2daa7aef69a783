"""Per-call cost of the ``depth`` baseline with its gradient, relative to one prior evaluation.

Measures, side by side in one process, on one batch of 64 px images:

* ``phi + grad``: ``baseline_value_and_grad`` of the ``depth`` baseline through a DPT depth model
  (the one trained by ``ssd-train-depth``, or a fresh one of the same architecture when no folder is
  given) -- one forward and one backward pass of the estimator;
* ``unet``: one forward pass (no grad) of a diffusers ``UNet2DModel`` at 64 px with
  ``block_out_channels=(64, 128, 128)`` and 2 layers per block, a reasonable CPU prior;

and prints their median times and ratio. SSD adds ``phi + grad`` to every guidance step, whose
cost is otherwise one (or, with classifier-free guidance, two batched) prior evaluations.

    python benchmarks/phi_cost.py --depth-model /work/artifacts/depth-shapes-64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth-model", default=None, help="depth checkpoint folder (default: a fresh tiny DPT)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel

    from lcss_prior.data.shapes import ShapesDataset
    from threestudio_ssd.baselines import RenderOutputs, build_baseline
    from threestudio_ssd.depth import load_depth_estimator
    from threestudio_ssd.depth.train import build_model
    from threestudio_ssd.stein import baseline_value_and_grad

    res, b = args.resolution, args.batch_size
    ds = ShapesDataset(size=b, resolution=res, seed=0, supersample=1)
    items = [ds[i] for i in range(b)]
    x0 = torch.stack([it["image"] for it in items])
    render = RenderOutputs(
        depth=torch.stack([it["depth"] for it in items]),
        opacity=torch.stack([it["mask"] for it in items]).float(),
    )
    estimator = (
        load_depth_estimator(args.depth_model) if args.depth_model else build_model(res, 64, 4, 4, 8, 0)
    )
    baseline = build_baseline("depth", estimator=estimator)
    x_t = x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def phi_and_grad():
        return baseline_value_and_grad(lambda x: baseline((x + 1) / 2, render).phi, x_t)

    unet = UNet2DModel(
        sample_size=res,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    t = torch.full((b,), 500)

    @torch.no_grad()
    def unet_forward():
        return unet(x_t, t).sample

    phi_s = timed(phi_and_grad, args.repeats)
    unet_s = timed(unet_forward, args.repeats)
    n_depth = sum(q.numel() for q in estimator.parameters())
    n_unet = sum(q.numel() for q in unet.parameters())
    print(f"batch {b} x 3 x {res} x {res}, torch threads {torch.get_num_threads()}")
    print(f"depth phi + grad : {phi_s * 1e3:8.1f} ms   (DPT, {n_depth / 1e6:.2f} M parameters)")
    print(f"UNet forward     : {unet_s * 1e3:8.1f} ms   (UNet2DModel, {n_unet / 1e6:.2f} M parameters)")
    print(f"ratio phi+grad / UNet forward = {phi_s / unet_s:.2f}")


if __name__ == "__main__":
    main()
