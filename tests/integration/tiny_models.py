"""The integration tests' tiny models and inputs.

The model folders come from ``threestudio_ssd.testing``'s builders (saved the way users' models
are saved, loaded through users' code paths); here are the settings these tests build them with:

* ``PRIOR``: an LCSS prior over the shapes captions (the CPU configs' prompts), 16 px;
* ``DPT``: a DPT depth model with its image processor, like a Hub checkpoint;
* ``SD``: a Stable-Diffusion-shaped folder (``unet/``, ``vae/``, DDIM ``scheduler/``), 16 px.

Also a hand-built threestudio ``PromptProcessorOutput`` with random text embeddings (threestudio's
real prompt processors need a text encoder and a subprocess) and a ray-traced sphere render.
"""

from __future__ import annotations

from typing import Any

import torch

from lcss_prior.data.shapes import CAPTIONS
from threestudio_ssd.testing import TINY_SD_TEXT_DIM

PRIOR: dict[str, Any] = dict(
    captions=CAPTIONS, resolution=16, block_out_channels=(8, 16), norm_num_groups=4, input_scaling="edm"
)
"""``make_tiny_prior`` keyword arguments."""
DPT: dict[str, Any] = dict(resolution=32, hidden_size=16, patch_size=8, with_image_processor=True)
"""``make_tiny_depth_estimator`` keyword arguments."""
SD: dict[str, Any] = dict(
    scheduler="ddim", unet_block_out_channels=(16, 32), vae_block_out_channels=(8, 16), norm_num_groups=8
)
"""``make_tiny_stable_diffusion`` keyword arguments (text embeddings ``[*, SD_TEXT_LEN, 32]``)."""
SD_TEXT_LEN = 8

#: one camera of threestudio's batch convention (degrees), for guidance calls
CAMERA = {
    "elevation": torch.tensor([10.0]),
    "azimuth": torch.tensor([30.0]),
    "camera_distances": torch.tensor([2.0]),
}

#: overrides that make the CPU shapes configs' runs small (16 px, 2 test views)
SMALL_RENDERS = [
    "data.width=16",
    "data.height=16",
    "data.eval_width=16",
    "data.eval_height=16",
    "data.n_test_views=2",
]
#: and their NeRF (8 samples per ray, 16-wide MLPs)
SMALL_NERF = ["system.renderer.num_samples_per_ray=8", "system.geometry.mlp_network_config.n_neurons=16"]


def launch_args(config: str, mode: str, prior, dpt, *overrides: str) -> list[str]:
    """``python -m threestudio_ssd.launch --config <config> <mode>`` with the tiny prior and depth
    model folders and ``overrides``."""
    models = [f"system.guidance.prior_path={prior}", f"system.guidance.depth_estimator_path={dpt}"]
    return ["-m", "threestudio_ssd.launch", "--config", config, mode, *models, *overrides]


def sd_prompt_utils(seed: int = 0):
    """threestudio's ``PromptProcessorOutput`` with random embeddings for its four directions."""
    from threestudio_ssd.threestudio.prompt_processor import text_embedding_prompt_output

    g = torch.Generator().manual_seed(seed)

    def emb(n: int) -> torch.Tensor:
        return torch.randn(n, SD_TEXT_LEN, TINY_SD_TEXT_DIM, generator=g)

    return text_embedding_prompt_output(emb(1), emb(1), emb(4), emb(4), "a test prompt")


def sphere_render(
    height: int, width: int, radius: float = 0.5, distance: float = 2.0, fovy_deg: float = 40.0
):
    """threestudio-encoded render outputs of a sphere seen from ``+z`` (for the guidance's
    ``depth``, ``opacity``, ``comp_normal``, ``c2w``, ``fovy`` arguments), batch 1."""
    import math

    focal = 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    d = torch.stack([(u - width / 2) / focal, -(v - height / 2) / focal, -torch.ones_like(u)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    o = torch.tensor([0.0, 0.0, distance])
    b = (d * o).sum(-1)
    disc = b * b - (o * o).sum() + radius**2
    hit = disc > 0
    t = torch.where(hit, -b - disc.clamp_min(0).sqrt(), torch.zeros_like(b))
    normal = torch.where(hit[..., None], (o + t[..., None] * d) / radius, torch.zeros_like(d))
    opacity = hit.float()
    c2w = torch.eye(4)
    c2w[2, 3] = distance
    return {
        "depth": (t * opacity)[None, ..., None],
        "opacity": opacity[None, ..., None],
        "comp_normal": ((normal + 1) / 2 * opacity[..., None])[None],
        "c2w": c2w[None],
        "fovy": torch.tensor([math.radians(fovy_deg)]),
    }
