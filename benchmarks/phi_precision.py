"""grad phi through a float16 VAE decoder: the per-call scaled backward against a float32 decoder.

SSD's baselines see the VAE decode of ``x_t``; with ``half_precision_weights`` the decoder runs in
float16 and ``d phi / d image ~ 1/N`` (``N`` pixels) underflows in its backward unless scaled
(``threestudio_ssd.precision``). Two cures: scale the backward per call (what the plugin does), or
decode for the baseline with a float32 copy of the decoder. This measures both, and the plain cast
they replace, on Stable Diffusion 2.1's VAE architecture (random weights: cost and rounding do not
depend on them) at 512 px:

* ``fp16-scaled``: ``StableDiffusionScoreModel.decode`` (``call_in_precision``);
* ``fp16-plain``: cast down, decode, cast up (float16 backward on the unscaled gradient);
* ``fp32-decoder``: a float32 copy of the decoder (the reference).

``phi = <w, decode(x)> / N`` with ``w`` in [0.5, 1.5] and ``N = 3 x 512 x 512``, so
``d phi / d image`` is ~1/N as for a depth baseline. Per arm: seconds per decode + backward
(interleaved rounds, ``benchmarks.harness``), the peak memory one call adds, the decoder weights'
memory, and grad phi's cosine and relative error to the reference on the same ``x_t``.

Usage::

    python benchmarks/phi_precision.py --device cuda --rounds 10      # SD 2.1 VAE, 512 px
    python benchmarks/phi_precision.py --resolution 256 --rounds 1     # CPU (float16 is emulated: slow)
    python benchmarks/phi_precision.py --quick                        # tiny VAE, 64 px, CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without ``pip install -e``
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402 - after the sys.path insert
from threestudio_ssd.precision import call_in_precision  # noqa: E402
from threestudio_ssd.testing import tiny_sd_vae_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "phi_precision"
ARMS = ("fp16-scaled", "fp16-plain", "fp32-decoder")
SCALING = 0.18215  # SD's latent scaling factor


def build_vae(quick: bool, seed: int, resolution: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    if quick:
        return AutoencoderKL(**tiny_sd_vae_config(64, (8, 16, 16, 16), 8)), 64
    bench = _cost_module()
    return AutoencoderKL(**bench.SD21_VAE), resolution


def _cost_module():
    from threestudio_ssd.testing import load_script

    return load_script(REPO / "benchmarks" / "cost_real_scale.py")


def arms(vae16, vae32) -> dict[str, Any]:
    """Each arm's decode: latents -> image in [0, 1], float32 out."""

    def scaled(x):
        return (call_in_precision(lambda z: vae16.decode(z).sample, x / SCALING, torch.float16) + 1) / 2

    def plain(x):
        return (vae16.decode((x / SCALING).half()).sample.float() + 1) / 2

    def full(x):
        return (vae32.decode(x / SCALING).sample + 1) / 2

    return {"fp16-scaled": scaled, "fp16-plain": plain, "fp32-decoder": full}


def grad_phi(decode, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    phi = (w * decode(x)).sum() / w.numel()
    (g,) = torch.autograd.grad(phi, x)
    return g


def agreement(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    g, ref = g.double().flatten(), ref.double().flatten()
    return {
        "cosine": float(g @ ref / (g.norm() * ref.norm())) if g.norm() > 0 else float("nan"),
        "relative_error": float((g - ref).norm() / ref.norm()),
        "zero_fraction": float((g == 0).double().mean()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny VAE at 64 px (CPU smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=512, help="image size (SD 2.1's VAE; not with --quick)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device = args.device
    vae, resolution = build_vae(args.quick, args.seed, args.resolution)
    vae16 = vae.to(device=device, dtype=torch.float16).requires_grad_(False).eval()
    vae32 = copy.deepcopy(vae16).float()  # the same (rounded) weights in float32
    del vae
    factor = 2 ** (len(vae16.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, 4, resolution // factor, resolution // factor, generator=g).to(device)
    w = (0.5 + torch.rand(1, 3, resolution, resolution, generator=g)).to(device)
    decodes = arms(vae16, vae32)
    reference = grad_phi(decodes["fp32-decoder"], x, w)
    result: dict[str, Any] = {
        "benchmark": "phi_precision",
        "mode": "quick" if args.quick else "full",
        "resolution": resolution,
        "command": "python benchmarks/phi_precision.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": harness.machine(device),
        "decoder_weights_gib": {
            "float16": sum(p.numel() * 2 for p in vae16.decoder.parameters()) / harness.GIB,
            "float32": sum(p.numel() * 4 for p in vae32.decoder.parameters()) / harness.GIB,
        },
        "arms": {},
    }
    for name, decode in decodes.items():
        peak, _ = harness.peak_memory_during(lambda decode=decode: grad_phi(decode, x, w), device)
        agree = agreement(grad_phi(decode, x, w), reference)
        result["arms"][name] = {"peak_memory_gib": peak / harness.GIB, **agree}
    per_round = harness.interleaved_rounds(
        {name: harness.timed(lambda d=d: grad_phi(d, x, w), device) for name, d in decodes.items()},
        rounds=args.rounds,
        steps_per_round=1,
        seed=args.seed,
    )
    for name, summary in harness.summarize_rounds(per_round, "fp16-scaled").items():
        result["arms"][name].update(
            step_s=summary["step_s"], ratio_to_fp16_scaled=summary["ratio_to_fp16-scaled"]
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("quick" if args.quick else device.split(":")[0])
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    for name, arm in result["arms"].items():
        print(
            f"{name:13s} {arm['step_s'] * 1e3:8.1f} ms ({arm['ratio_to_fp16_scaled']:.2f}x)  "
            f"peak {arm['peak_memory_gib']:.3f} GiB  cosine {arm['cosine']:.6f}  "
            f"rel.err {arm['relative_error']:.2e}  zeros {arm['zero_fraction']:.3f}"
        )
    print(f"wrote {out / f'{tag}.json'}")
    return result


if __name__ == "__main__":
    main()
