"""Tiny random models saved the way users' models are saved, loaded through users' code paths.

* an LCSS prior over the shapes captions, exported with ``lcss_prior.export.export_prior``;
* a DPT depth model, ``save_pretrained`` (+ its image processor) like a Hub checkpoint;
* a Stable-Diffusion-shaped folder (``unet/``, ``vae/``, ``scheduler/``), ``save_pretrained``;
* a hand-built threestudio ``PromptProcessorOutput`` with random text embeddings (threestudio's
  real prompt processors need a text encoder and a subprocess).
"""

from __future__ import annotations

from pathlib import Path

import torch

SD_TEXT_DIM = 32
SD_TEXT_LEN = 8


def make_tiny_prior(folder: Path, resolution: int = 16, seed: int = 0) -> Path:
    from lcss_prior.data.shapes import CAPTIONS
    from lcss_prior.export import export_prior
    from lcss_prior.model import EpsNetwork, build_unet
    from lcss_prior.sde import build_sde

    torch.manual_seed(seed)
    sde = build_sde("vp")
    unet = build_unet(
        resolution,
        3,
        len(CAPTIONS),
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention=(False, False),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    export_prior(EpsNetwork(unet, sde), sde, folder, CAPTIONS, resolution, 3, len(CAPTIONS))
    return folder


def make_tiny_dpt(folder: Path, seed: int = 0) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
    )
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def make_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """4-channel 8x8 latents, VAE factor 2 (16 px images), 32-dim text."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SD_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(folder / "vae")
    DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).save_pretrained(folder / "scheduler")
    return folder


def sd_prompt_utils(seed: int = 0):
    """threestudio's ``PromptProcessorOutput`` with random embeddings for its four directions."""
    from threestudio.models.prompt_processors.base import DirectionConfig, PromptProcessorOutput

    g = torch.Generator().manual_seed(seed)
    names = ["side", "front", "back", "overhead"]
    directions = [
        DirectionConfig(
            "side", lambda s: s, lambda s: s, lambda e, a, d: torch.ones_like(e, dtype=torch.bool)
        ),
        DirectionConfig("front", lambda s: s, lambda s: s, lambda e, a, d: a.abs() < 45),
        DirectionConfig("back", lambda s: s, lambda s: s, lambda e, a, d: a.abs() > 135),
        DirectionConfig("overhead", lambda s: s, lambda s: s, lambda e, a, d: e > 60),
    ]

    def emb(n: int) -> torch.Tensor:
        return torch.randn(n, SD_TEXT_LEN, SD_TEXT_DIM, generator=g)

    return PromptProcessorOutput(
        text_embeddings=emb(1),
        uncond_text_embeddings=emb(1),
        text_embeddings_vd=emb(4),
        uncond_text_embeddings_vd=emb(4),
        directions=directions,
        direction2idx={n: i for i, n in enumerate(names)},
        use_perp_neg=False,
        perp_neg_f_sb=(1, 0.5, -0.606),
        perp_neg_f_fsb=(1, 0.5, 0.967),
        perp_neg_f_fs=(4, 0.5, -2.426),
        perp_neg_f_sf=(4, 0.5, -2.426),
        prompt="a test prompt",
        prompts_vd=[f"a test prompt, {n} view" for n in names],
    )


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
