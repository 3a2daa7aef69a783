"""Tiny, randomly initialised model folders for tests and smoke runs (no download, CPU, < 1 s).

Each builder writes a folder in the exact format a user's real model has, so that tests load it
through the user-facing code path (``StableDiffusionScoreModel(path)``,
``LCSSPriorScoreModel(path)``, ``load_depth_estimator(path)``). The models are random: they test
wiring and mathematics, never quality.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

TINY_SD_TEXT_DIM = 32
"""``cross_attention_dim`` of the tiny Stable Diffusion UNet (text embeddings ``[2B, L, 32]``)."""


def make_tiny_stable_diffusion(
    folder: str | os.PathLike, prediction_type: str = "epsilon", seed: int = 0
) -> Path:
    """A diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``scheduler/``) with random weights:
    4-channel 8x8 latents, a VAE with down factor 2 (16 px images), SD's ``scaled_linear`` schedule
    of 1000 steps, cross-attention dimension ``TINY_SD_TEXT_DIM``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_SD_TEXT_DIM,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def make_tiny_prior(
    folder: str | os.PathLike,
    captions: Sequence[str] = ("a red cube", "a blue sphere"),
    resolution: int = 8,
    sde: str = "vp",
    seed: int = 0,
) -> Path:
    """An exported class-conditional LCSS prior folder (``lcss_prior.export.export_prior``) with a
    random two-level UNet; ``null_class = len(captions)``."""
    from lcss_prior.export import export_prior
    from lcss_prior.model import build_unet
    from lcss_prior.sde import build_sde

    torch.manual_seed(seed)
    unet = build_unet(resolution, 3, len(captions), block_out_channels=(32, 32), layers_per_block=1)
    return export_prior(unet, build_sde(sde), folder, list(captions), resolution, 3, len(captions))


def make_tiny_depth_estimator(folder: str | os.PathLike, resolution: int = 16, seed: int = 0) -> Path:
    """A transformers DPT depth checkpoint (``save_pretrained``, no image-processor config) with a
    4-layer, 32-wide ViT at ``resolution`` px, patch 4: the trainer's own ``build_model`` (whose
    neck/head initialisation keeps a random DPT's output varying with the image), untrained."""
    from threestudio_ssd.depth.train import build_model

    folder = Path(folder)
    model = build_model(resolution, hidden_size=32, layers=4, heads=2, patch_size=4, seed=seed).model
    model.save_pretrained(folder)
    return folder
