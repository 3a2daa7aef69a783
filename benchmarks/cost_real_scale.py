"""Per-step time and peak memory of SDS, SSD (full and preview baseline decoder) and VSD with the
real Stable Diffusion 2.1-base and DPT-Hybrid (MiDaS v3) architectures at 512 px.

One *step* of each arm, batch 1, on a 512 px render that carries the gradient (the 3-D model's own
render, backward and optimiser are the same for every arm and are left out):

* ``sds``: ``ScoreDistillation(estimator="sds")`` on ``StableDiffusionScoreModel``: VAE encode of
  the render with gradient, one classifier-free-guided UNet call (batch 2), the target-trick loss
  and its backward to the render.
* ``ssd``: the same with ``estimator="ssd"`` and the ``depth`` baseline: in addition the noisy
  latent is decoded by the VAE (512 px), DPT-Hybrid runs on the decode (resized to its 384 px
  input), and ``phi = 1 - Pearson`` is differentiated back through the depth network and the decoder
  (``baseline_value_and_grad``); ``mu`` in ``optimal`` mode (a least-squares update, no optimiser).
* ``ssd-preview``: ``ssd`` with ``baseline_decoder="preview"``: the depth baseline sees
  ``score_model.decode_preview(x_t)`` (a fitted per-pixel affine latent -> RGB map at the 64x64
  latent resolution, one 1x1 convolution) instead of the VAE decode; no VAE decoder runs in its step
  (the encoder still does, for the render's latents). The map is fitted once
  (``StableDiffusionScoreModel.fit_preview``: VAE encode + decode of a few synthetic images) after
  loading, outside every timed step; its time and ``R^2`` are recorded (``preview_fit``).
* ``vsd``: threestudio's own ``stable-diffusion-vsd-guidance`` set up as its
  ``configs/prolificdreamer.yaml`` does (SD 2.1-base for the pretrained branch, SD 2.1 (768-v) for
  the LoRA branch with the camera embedding; guidance scale 7.5): its forward,
  ``(loss_vsd + loss_lora).backward()`` and an Adam step (lr 1e-4, the config's
  ``optimizer.params.guidance.lr``) on the LoRA and camera-embedding parameters.
* ``sds-threestudio``: threestudio's ``stable-diffusion-guidance`` (``configs/dreamfusion-sd.yaml``:
  guidance scale 100): the same estimator as ``sds`` in threestudio's implementation, as a reference
  for ``vsd``.

Models: the published configuration values (written below, with their sources) with random
weights -- cost does not depend on the weights and nothing can be downloaded here -- saved with
``save_pretrained`` into a model folder and loaded through the user-facing loaders
(``StableDiffusionScoreModel(path)``, ``load_depth_estimator(path)``, and threestudio's own
``StableDiffusionPipeline.from_pretrained`` for its guidances). ``--quick`` runs the same code on
tiny random models at the same 512 px geometry (``QUICK_UNET``, ``QUICK_VAE``, and
``threestudio_ssd.testing``'s tiny depth model).

Time: all arms in ONE process, in interleaved rounds (``for r in rounds: for arm in
shuffled(arms): one step``) after ``--warmup`` rounds, so that every arm sees the same machine load;
the median per-step time of each arm, the ratios of medians and the medians of the per-round
(paired) ratios are reported. To fit the arms into memory together, the timing process shares the
frozen SD 2.1-base UNet and VAE between ``sds``, ``ssd`` and the pretrained branch of the
threestudio guidances (same architecture, dtype and device, so the same compute; ``--no-share``
turns this off). One further step of each SSD arm present is split by timers into its parts
(``breakdown_ssd``, ``breakdown_ssd_preview``: the arm's own step split by
``ScoreDistillation``'s phase hook into encode, UNet, decode, depth + phi, their backward).

Peak memory: every arm in a fresh subprocess that loads only that arm's models (no sharing) and
runs ``--memory-steps`` steps. On the CPU: resident set after loading (``VmRSS``), and the peak
resident set during the steps (``VmHWM`` after resetting it through ``/proc/self/clear_refs``
once the models are loaded; not ``ru_maxrss``, which a child inherits from its parent at exec). On CUDA:
``torch.cuda.memory_allocated`` after loading and ``torch.cuda.max_memory_allocated`` over the
steps (peak reset after loading).

Usage::

    THREESTUDIO_SRC=/path/to/threestudio python benchmarks/cost_real_scale.py          # CPU, 512 px
    THREESTUDIO_SRC=... python benchmarks/cost_real_scale.py --device cuda --fp16 --rounds 20
    python benchmarks/cost_real_scale.py --arms sds,ssd,ssd-preview --no-memory --tag cpu-preview
    python benchmarks/cost_real_scale.py --quick --out runs/cost-quick                        # < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without ``pip install -e``
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402 - after the sys.path insert
from threestudio_ssd.testing import tiny_sd_unet_config, tiny_sd_vae_config  # noqa: E402

ARMS = ("sds", "ssd", "ssd-preview", "vsd", "sds-threestudio")
THREESTUDIO_ARMS = ("vsd", "sds-threestudio")
#: our SSD arms and the image their baselines see (``DistillationConfig.baseline_decoder``)
SSD_ARMS: dict[str, str] = {"ssd": "full", "ssd-preview": "preview"}
#: the result key of each SSD arm's step split (``breakdown_ssd``)
BREAKDOWN_KEYS: dict[str, str] = {"ssd": "breakdown_ssd", "ssd-preview": "breakdown_ssd_preview"}
TEXT_LENGTH = 77  # CLIP's context length: threestudio's text embeddings are [*, 77, D]
RESULTS = REPO / "benchmarks" / "results" / "cost_real_scale"

# --------------------------------------------------------------------------------------------
# Published configurations (random weights are drawn for them; nothing is downloaded).
#
# Stable Diffusion 2.1-base: the public ``unet/config.json``, ``vae/config.json`` and
# ``scheduler/scheduler_config.json`` of ``stabilityai/stable-diffusion-2-1-base`` (values from our
# knowledge of those files, cross-checked with the search tool against public copies of the SD 2.x
# UNet config: block_out_channels, attention_head_dim [5, 10, 20, 20], cross_attention_dim 1024,
# use_linear_projection). Architecture keys only; diffusers fills the rest with its defaults, which
# are the values those files hold.
SD21_BASE_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=False,
)
SD21_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD21_BASE_SCHEDULER: dict[str, Any] = dict(
    _class_name="PNDMScheduler",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)
# Stable Diffusion 2.1 (768-v), the LoRA branch of ProlificDreamer's config
# (``stabilityai/stable-diffusion-2-1``): the same UNet and VAE with 96x96 latents and attention
# upcast to float32, a v-prediction DDIM schedule. Only these keys differ from 2.1-base.
SD21_V_UNET_OVERRIDES: dict[str, Any] = dict(sample_size=96, upcast_attention=True)
SD21_V_SCHEDULER: dict[str, Any] = {
    **SD21_BASE_SCHEDULER,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
}
# DPT-Hybrid (MiDaS v3.0, ``Intel/dpt-hybrid-midas``): its public ``config.json``. The BiT backbone
# values were checked with the search tool against a public copy of that file (the depth estimator
# of ``stable-diffusion-2-depth``, whose ``_name_or_path`` is ``Intel/dpt-hybrid-midas``); the DPT
# values are those transformers' own conversion script (``convert_dpt_hybrid_to_pytorch.py``,
# installed here) sets for the MiDaS hybrid checkpoint. Preprocessing: transformers'
# ``DPTImageProcessor`` defaults, which that checkpoint uses (384x384, bicubic, mean = std = 0.5).
DPT_HYBRID_MIDAS: dict[str, Any] = dict(
    is_hybrid=True,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    image_size=384,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    backbone_out_indices=[2, 5, 8, 11],
    readout_type="project",
    reassemble_factors=[1, 1, 1, 0.5],
    neck_hidden_sizes=[256, 512, 768, 768],
    fusion_hidden_size=256,
    head_in_index=-1,
    use_batch_norm_in_fusion_residual=False,
    backbone_featmap_shape=[1, 1024, 24, 24],
    neck_ignore_stages=[0, 1],
    backbone_config=dict(
        global_padding="same",
        layer_type="bottleneck",
        depths=[3, 4, 9],
        hidden_sizes=[256, 512, 1024, 2048],
        embedding_size=64,
        hidden_act="relu",
        out_features=["stage1", "stage2", "stage3"],
        embedding_dynamic_padding=True,
    ),
)
# threestudio's VSD replaces the LoRA UNet's class embedding by ``TimestepEmbedding(16, 1280)``
# (hard-coded), so the LoRA UNet's time embedding must be 1280 wide (SD's is: 4 x 320). The tiny
# ``--quick`` UNet gets ``time_embedding_dim=1280`` for its LoRA copy.
VSD_TIME_EMBEDDING_DIM = 1280
# ``--quick``: tiny random models at the real 512 px / 64x64-latent geometry, from
# ``threestudio_ssd.testing``'s config builders. threestudio's SD guidances resize every render to
# 512 px before their VAE, so a tiny VAE must still downsample by 8, i.e. have 4 levels (the
# factor-2 VAE of ``make_tiny_stable_diffusion``'s default would give 256x256 latents there, and its
# attention matrices then take tens of GiB). The depth model is
# ``threestudio_ssd.testing.make_tiny_depth_estimator``'s.
QUICK_UNET: dict[str, Any] = tiny_sd_unet_config(
    latent_size=64,
    block_out_channels=(16, 32),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=8,
)
QUICK_VAE: dict[str, Any] = tiny_sd_vae_config(resolution=512, block_out_channels=(4,) * 4, norm_num_groups=4)
# UNet config keys that do not change any parameter's shape: a LoRA copy that differs from the base
# only in these shares the base's (random) weight file instead of drawing and writing 3.5 GB again.
SHAPE_FREE_UNET_KEYS = frozenset({"sample_size", "upcast_attention"})


@dataclass
class Settings:
    """Command-line settings (see ``parse_args``)."""

    quick: bool = False
    device: str = "cpu"
    fp16: bool = False
    rounds: int = 3
    warmup: int = 1
    threads: int | None = 2
    arms: tuple[str, ...] = ARMS
    out: str = str(RESULTS)
    model_dir: str | None = None
    threestudio_src: str | None = None
    seed: int = 0
    memory: bool = True
    memory_steps: int = 1
    breakdown: bool = True
    share: bool = True
    progress: bool = True
    tag: str | None = None
    probe: str | None = None  # internal: run one arm's memory probe and print its JSON


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random models (threestudio_ssd.testing)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--fp16", action="store_true", help="float16 weights (SD, DPT, threestudio guidances)")
    p.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--out", default=str(RESULTS), help="folder for <tag>.json and <tag>.md")
    p.add_argument("--tag", default=None, help="result file name (default: quick | cpu | cuda[-fp16])")
    p.add_argument(
        "--model-dir", default=None, help="folder for the random model folders (reused when present)"
    )
    p.add_argument(
        "--threestudio-src", default=os.environ.get("THREESTUDIO_SRC"), help="threestudio checkout"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory probes")
    p.add_argument("--memory-steps", type=int, default=1, help="steps per memory probe")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the SSD split")
    p.add_argument("--no-share", dest="share", action="store_false", help="no shared frozen SD modules")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    arms = tuple(x.strip() for x in a.arms.split(",") if x.strip())
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        p.error(f"--arms: unknown or empty {unknown or arms}; choose from {ARMS}")
    for name in SSD_ARMS:
        if name in arms and "sds" not in arms:
            p.error(f"--arms: {name!r} is reported relative to 'sds'; include 'sds'")
    for key in ("rounds", "memory_steps"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if not (a.device == "cpu" or a.device.startswith("cuda")):
        p.error(f"--device must be cpu or cuda[:i], got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch.cuda.is_available() is False on this machine")
    return Settings(
        quick=a.quick,
        device=a.device,
        fp16=a.fp16,
        rounds=a.rounds,
        warmup=a.warmup,
        threads=a.threads or None,
        arms=arms,
        out=a.out,
        model_dir=a.model_dir,
        threestudio_src=a.threestudio_src,
        seed=a.seed,
        memory=a.memory,
        memory_steps=a.memory_steps,
        breakdown=a.breakdown,
        share=a.share,
        progress=a.progress,
        tag=a.tag,
        probe=a.probe,
    )


def to_argv(s: Settings) -> list[str]:
    """The command line that reproduces ``s`` (used for the memory subprocesses)."""
    argv = ["--device", s.device, "--threads", str(s.threads or 0), "--arms", ",".join(s.arms)]
    argv += ["--seed", str(s.seed), "--memory-steps", str(s.memory_steps), "--out", s.out]
    if s.quick:
        argv.append("--quick")
    if s.fp16:
        argv.append("--fp16")
    if s.model_dir:
        argv += ["--model-dir", s.model_dir]
    if s.threestudio_src:
        argv += ["--threestudio-src", s.threestudio_src]
    return argv


# --------------------------------------------------------------------------------------------
# Model folders


@dataclass(frozen=True)
class ModelPaths:
    """The model folders: ``sd`` (a StableDiffusionPipeline folder: unet, vae, scheduler,
    text_encoder, model_index.json), ``sd_lora`` (VSD's LoRA branch, same layout) and ``depth``."""

    sd: Path
    sd_lora: Path
    depth: Path


def prepare_models(s: Settings, root: Path) -> ModelPaths:
    """Write the random model folders under ``root`` (or reuse them: ``manifest.json`` records
    the mode they were written for)."""
    mode = "quick" if s.quick else "full"
    paths = ModelPaths(root / "sd", root / "sd_lora", root / "depth")
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("mode") == mode:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _step(f"drawing random {'tiny' if s.quick else 'SD 2.1-base'} UNet/VAE and depth weights")
    UNet2DConditionModel(**(QUICK_UNET if s.quick else SD21_BASE_UNET)).save_pretrained(
        paths.sd / "unet", safe_serialization=True
    )
    gc.collect()
    AutoencoderKL(**(QUICK_VAE if s.quick else SD21_VAE)).save_pretrained(
        paths.sd / "vae", safe_serialization=True
    )
    _write_scheduler(paths.sd / "scheduler", SD21_BASE_SCHEDULER)
    if s.quick:
        from threestudio_ssd.testing import make_tiny_depth_estimator

        make_tiny_depth_estimator(paths.depth, resolution=32, seed=s.seed)
        unet_overrides, lora_scheduler = {"time_embedding_dim": VSD_TIME_EMBEDDING_DIM}, None
    else:
        from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

        DPTForDepthEstimation(DPTConfig(**DPT_HYBRID_MIDAS)).save_pretrained(paths.depth)
        DPTImageProcessor().save_pretrained(paths.depth)
        unet_overrides, lora_scheduler = SD21_V_UNET_OVERRIDES, SD21_V_SCHEDULER
    gc.collect()
    add_pipeline_parts(paths.sd, seed=s.seed)
    derive_unet_folder(paths.sd, paths.sd_lora, unet_overrides, lora_scheduler)
    manifest.write_text(json.dumps({"mode": mode, "seed": s.seed}))
    return paths


def _write_scheduler(folder: Path, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2))


def add_pipeline_parts(folder: Path, seed: int = 0) -> None:
    """Make a ``unet/ vae/ scheduler/`` folder loadable by ``StableDiffusionPipeline.from_pretrained``
    (threestudio's guidances): a text encoder and ``model_index.json``.

    The text encoder is a one-layer CLIPTextModel of the UNet's text width with random weights:
    threestudio deletes it right after loading and the text embeddings are inputs here, so it never
    runs (SD 2.1's real one is OpenCLIP ViT-H/14's, ~340 M parameters, present only while loading).
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    width = int(unet_config["cross_attention_dim"])
    torch.manual_seed(seed)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=1,
            num_attention_heads=max(1, width // 64),
            max_position_embeddings=TEXT_LENGTH,
        )
    ).save_pretrained(folder / "text_encoder")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler.get("_class_name", "DDPMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def derive_unet_folder(
    base: Path, out: Path, unet_overrides: dict[str, Any], scheduler: dict[str, Any] | None
) -> None:
    """A pipeline folder like ``base`` whose UNet config has ``unet_overrides`` (and whose scheduler
    is ``scheduler``, default ``base``'s); ``vae/`` and ``text_encoder/`` link to ``base``'s. The
    UNet's weights are ``base``'s file when no override changes a shape, otherwise freshly drawn."""
    from diffusers import UNet2DConditionModel

    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "text_encoder"):
        link = out / name
        if not link.exists():
            link.symlink_to((base / name).resolve(), target_is_directory=True)
    config = json.loads((base / "unet" / "config.json").read_text())
    config.update(unet_overrides)
    (out / "unet").mkdir(exist_ok=True)
    if set(unet_overrides) <= SHAPE_FREE_UNET_KEYS:
        (out / "unet" / "config.json").write_text(json.dumps(config, indent=2))
        for weights in (base / "unet").glob("diffusion_pytorch_model*"):
            link = out / "unet" / weights.name
            if not link.exists():
                link.symlink_to(weights.resolve())
    else:
        fields = {k: v for k, v in config.items() if not k.startswith("_")}
        UNet2DConditionModel(**fields).save_pretrained(out / "unet", safe_serialization=True)
    if scheduler is None:
        scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    _write_scheduler(out / "scheduler", scheduler)
    index = json.loads((base / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler.get("_class_name", "DDPMScheduler")]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------
# Inputs shared by every arm


@dataclass
class Inputs:
    """One view: the render (leaf ``rgb [1, 3, R, R]`` in ``[0, 1]``), its depth/opacity/camera,
    and random text embeddings ``[1, 77, D]`` (conditional, unconditional; four view-dependent)."""

    rgb: torch.Tensor
    render: Any  # RenderOutputs
    c2w: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor
    text: torch.Tensor
    uncond: torch.Tensor
    text_vd: torch.Tensor
    uncond_vd: torch.Tensor

    @property
    def cond(self) -> torch.Tensor:
        """Our ``ScoreModel`` conditioning: ``[2B, 77, D]``, conditional rows first."""
        return torch.cat([self.text, self.uncond])


def make_inputs(resolution: int, text_dim: int, device: torch.device, seed: int) -> Inputs:
    """A red cube from the ``shapes`` renderer (elevation 15, azimuth 30, distance 2.5, fovy 40)."""
    from lcss_prior.data.shapes import camera_c2w, render_scene
    from threestudio_ssd.baselines import RenderOutputs

    elevation, azimuth, distance, fovy = 15.0, 30.0, 2.5, 40.0
    c2w = camera_c2w(elevation, azimuth, distance)
    scene = render_scene("cube", "red", c2w, fovy, resolution)
    g = torch.Generator().manual_seed(seed)

    def emb(n: int) -> torch.Tensor:
        return torch.randn(n, TEXT_LENGTH, text_dim, generator=g).to(device)

    render = RenderOutputs(
        depth=scene["depth"][None].to(device),
        opacity=scene["mask"][None].float().to(device),
        c2w=c2w[None].float().to(device),
        fovy_deg=torch.tensor([fovy], device=device),
    )
    return Inputs(
        rgb=scene["rgb"].permute(2, 0, 1)[None].contiguous().to(device).requires_grad_(True),
        render=render,
        c2w=c2w[None].float().to(device),
        elevation=torch.tensor([elevation], device=device),
        azimuth=torch.tensor([azimuth], device=device),
        distance=torch.tensor([distance], device=device),
        text=emb(1),
        uncond=emb(1),
        text_vd=emb(4),
        uncond_vd=emb(4),
    )


def prompt_processor_output(inputs: Inputs) -> Any:
    """threestudio's ``PromptProcessorOutput`` around the given embeddings (its own prompt
    processors would need the real text encoder and tokenizer)."""
    from threestudio_ssd.threestudio.prompt_processor import text_embedding_prompt_output

    return text_embedding_prompt_output(inputs.text, inputs.uncond, inputs.text_vd, inputs.uncond_vd, "a red cube")


# --------------------------------------------------------------------------------------------
# Arms


@dataclass
class Arm:
    """One estimator: ``step()`` runs one full step (forward, backward to the render, optimiser
    step of the guidance's own parameters if it has any)."""

    name: str
    step: Callable[[], None]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    notes: str = ""
    distillation: Any = None  # our arms' ScoreDistillation (its phase hook splits the step)


@dataclass
class Shared:
    """The frozen modules of ours (loaded once): the SD score model and, if needed, the depth
    baseline; ``preview_fit`` records the preview decoder's fit (:func:`fit_preview_decoder`) when
    ``ssd-preview`` is built."""

    score_model: Any = None
    baseline: Any = None
    preview_fit: dict[str, Any] | None = None


def load_score_model(paths: ModelPaths, s: Settings) -> Any:
    from threestudio_ssd.score_models import StableDiffusionScoreModel

    return StableDiffusionScoreModel(paths.sd, half_precision=s.fp16, device=s.device, local_files_only=True)


def load_depth_baseline(paths: ModelPaths, s: Settings) -> Any:
    from threestudio_ssd.baselines import build_baseline
    from threestudio_ssd.depth import load_depth_estimator

    dtype = torch.float16 if s.fp16 else torch.float32
    return build_baseline("depth", estimator=load_depth_estimator(paths.depth, dtype=dtype, device=s.device))


PREVIEW_R2_NOTE = (
    "R^2 of the preview decoder's least-squares fit to THIS VAE; with random weights it says how "
    "affine a random decoder is, not how good the preview of the real SD 2.1 VAE would be (not "
    "measured here); the preview's cost does not depend on it"
)


def fit_preview_decoder(score_model: Any, s: Settings) -> dict[str, Any]:
    """Fit ``score_model``'s preview decoder once (``StableDiffusionScoreModel.fit_preview``, which
    ``decode_preview`` would otherwise run lazily inside the first timed step) and return its wall
    time, ``R^2`` and fit set."""
    from threestudio_ssd.score_models.stable_diffusion import PREVIEW_FIT_IMAGES, PREVIEW_FIT_SEED

    harness.synchronize(s.device)
    start = time.perf_counter()
    r2 = score_model.fit_preview()
    harness.synchronize(s.device)
    return {
        "fit_s": time.perf_counter() - start,
        "r2": r2,
        "n_images": PREVIEW_FIT_IMAGES,
        "seed": PREVIEW_FIT_SEED,
        "image_size": score_model.image_size,
        "note": PREVIEW_R2_NOTE,
    }


def vae_encoder(vae: torch.nn.Module) -> torch.nn.Module:
    """The part of an ``AutoencoderKL`` that ``encode`` runs (encoder and ``quant_conv``), for the
    parameter counts of arms that never decode."""
    parts = [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]
    return torch.nn.ModuleList(parts)


def build_ours(name: str, shared: Shared, inputs: Inputs, s: Settings) -> Arm:
    """``sds``, ``ssd`` or ``ssd-preview`` through ``ScoreDistillation`` (SSD: constant + depth
    baselines, optimal scalar weights, on the full VAE decode or on ``decode_preview``; guidance
    scale 7.5 in our convention). ``modules`` lists what the step runs: the VAE decoder only for
    ``ssd``."""
    from threestudio_ssd.distillation import ScoreDistillation

    sm = shared.score_model
    ssd = name in SSD_ARMS
    if ssd:
        dist = ScoreDistillation(
            sm, [shared.baseline], estimator="ssd", guidance_scale=7.5, baseline_decoder=SSD_ARMS[name]
        )
    else:
        dist = ScoreDistillation(sm, estimator="sds", guidance_scale=7.5)
    dist.to(s.device)
    generator = torch.Generator(device=s.device).manual_seed(s.seed)
    cond, render = inputs.cond, inputs.render

    def step() -> None:
        inputs.rgb.grad = None
        out = dist(inputs.rgb, cond, render=render if ssd else None, generator=generator)
        out.loss.backward()

    modules: dict[str, torch.nn.Module] = {"sd_unet": sm.unet}
    if name == "ssd":
        modules["sd_vae"] = sm.vae  # encoder (render -> latents) and decoder (the baselines' image)
    else:
        modules["sd_vae_encoder"] = vae_encoder(sm.vae)
    notes = ""
    if ssd:
        modules["depth"] = shared.baseline.estimator
    if name == "ssd-preview":
        fit = shared.preview_fit or {}
        notes = (
            f"baselines on decode_preview (affine latent -> RGB map at latent resolution; fitted once "
            f"before timing in {fit.get('fit_s', math.nan):.2f} s, R^2 {fit.get('r2', math.nan):.3f}); "
            "no VAE decoder in the step"
        )
    return Arm(name, step, modules, notes, distillation=dist)


def setup_threestudio(src: str | None) -> Any:
    """Import threestudio (from ``src`` if given) with the CPU set-up of
    ``threestudio_ssd.threestudio.cpu``; raises ImportError with the reason when unavailable."""
    if src:
        if not (Path(src) / "threestudio" / "__init__.py").is_file():
            raise ImportError(f"threestudio checkout {src!r} has no threestudio/__init__.py")
        if src not in sys.path:
            sys.path.insert(0, src)
    from threestudio_ssd.threestudio import cpu

    return cpu.setup_cpu()


def _check_threestudio_device(s: Settings) -> None:
    from threestudio.utils.misc import get_device

    if get_device().type != torch.device(s.device).type:
        raise RuntimeError(
            f"threestudio places its guidances on {get_device()} but --device is {s.device}; "
            f"run with --device {get_device().type}"
        )


def build_threestudio(
    name: str, paths: ModelPaths, inputs: Inputs, s: Settings, shared: Shared | None
) -> Arm:
    """threestudio's ``stable-diffusion-vsd-guidance`` (``vsd``) or ``stable-diffusion-guidance``
    (``sds-threestudio``) on the model folders; with ``shared``, their frozen SD 2.1-base UNet and
    VAE are replaced by ours (same architecture and dtype) to save memory."""
    import threestudio

    _check_threestudio_device(s)
    prompt_utils = prompt_processor_output(inputs)
    camera = dict(
        elevation=inputs.elevation,
        azimuth=inputs.azimuth,
        camera_distances=inputs.distance,
        mvp_mtx=inputs.c2w,
        c2w=inputs.c2w,
    )
    if name == "vsd":
        guidance = threestudio.find("stable-diffusion-vsd-guidance")(
            dict(
                pretrained_model_name_or_path=str(paths.sd),
                pretrained_model_name_or_path_lora=str(paths.sd_lora),
                guidance_scale=7.5,
                half_precision_weights=s.fp16,
                min_step_percent=0.02,
                max_step_percent=0.98,
            )
        )
        if shared is not None:
            pipe = guidance.submodules.pipe
            pipe.unet, pipe.vae = shared.score_model.unet, shared.score_model.vae
            guidance.submodules.pipe_lora.vae = shared.score_model.vae
            gc.collect()
        optimizer = torch.optim.Adam(guidance.parameters(), lr=1e-4)
        trainable = sum(p.numel() for p in guidance.parameters() if p.requires_grad)
        modules = {"sd_unet": guidance.unet, "sd_vae": guidance.vae, "sd_unet_lora": guidance.unet_lora}

        def step() -> None:
            inputs.rgb.grad = None
            out = guidance(inputs.rgb.permute(0, 2, 3, 1), prompt_utils, rgb_as_latents=False, **camera)
            (out["loss_vsd"] + out["loss_lora"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        notes = f"{trainable / 1e6:.2f} M trainable LoRA + camera-embedding parameters (Adam, lr 1e-4)"
        return Arm(name, step, modules, notes)

    guidance = threestudio.find("stable-diffusion-guidance")(
        dict(
            pretrained_model_name_or_path=str(paths.sd),
            guidance_scale=100.0,
            weighting_strategy="sds",
            half_precision_weights=s.fp16,
            min_step_percent=0.02,
            max_step_percent=0.98,
        )
    )
    if shared is not None:
        guidance.pipe.unet = guidance.unet = shared.score_model.unet
        guidance.pipe.vae = guidance.vae = shared.score_model.vae
        gc.collect()

    def step() -> None:
        inputs.rgb.grad = None
        out = guidance(inputs.rgb.permute(0, 2, 3, 1), prompt_utils, rgb_as_latents=False, **camera)
        out["loss_sds"].backward()

    return Arm(name, step, {"sd_unet": guidance.unet, "sd_vae": guidance.vae})


# --------------------------------------------------------------------------------------------
# Measurements


def time_interleaved(arms: list[Arm], s: Settings) -> dict[str, list[float]]:
    """Seconds per step of every arm over ``s.rounds`` rounds after ``s.warmup`` untimed ones; in
    each round every arm runs one step, in an order shuffled per round (seeded;
    ``benchmarks.harness.interleaved_rounds``)."""
    per_round = harness.interleaved_rounds(
        {a.name: harness.timed(a.step, s.device) for a in arms},
        rounds=s.rounds,
        steps_per_round=1,
        seed=s.seed,
        progress=s.progress,
        desc="steps",
        warmup=s.warmup,
    )
    return {name: [r["step"] for r in rounds] for name, rounds in per_round.items()}


def breakdown_ssd(arm: Arm, inputs: Inputs, s: Settings) -> dict[str, float]:
    """One step of an SSD arm's own ``ScoreDistillation`` split into its parts (seconds) by its
    phase hook (``benchmarks.harness.PhaseTimer``), so the split is of the step that is timed:
    ``encode``, ``score_model`` (noising + guided UNet), ``baselines`` (= ``ssd_extra``, what SSD
    adds to SDS aside from ``mu``'s update: ``decode`` (VAE or preview decoder), ``phi`` (depth
    network + baseline) and ``phi_backward``, the exact gradient back through both), and
    ``encode_backward`` (the loss's backward to the render)."""
    dist = arm.distillation
    timer = harness.PhaseTimer(s.device)
    dist.phase = timer.phase
    try:
        rgb = inputs.rgb.detach().clone().requires_grad_(True)
        generator = torch.Generator(device=s.device).manual_seed(s.seed + 1)
        out = dist(rgb, inputs.cond, render=inputs.render, generator=generator)
        with timer.phase("encode_backward"):
            out.loss.backward()
    finally:
        del dist.phase  # back to the class's no-op
    parts = dict(timer.seconds)
    parts["phi_backward"] = parts["baselines"] - parts["decode"] - parts["phi"]
    parts["ssd_extra"] = parts["baselines"]
    return parts


MEMORY_METHOD_CPU = (
    "each arm in a fresh subprocess loading only its own models (no sharing) and running the given "
    "number of steps; VmRSS after loading (safetensors weights are memory-mapped: resident once "
    "used), VmRSS after the steps, and the peak resident set over the steps (VmHWM, reset through "
    "/proc/self/clear_refs after loading; hwm_reset false means it includes loading). Not "
    "ru_maxrss: Linux hands a child the parent's peak at exec. ssd-preview's one-off preview fit "
    "runs while loading (its decoder weights are then resident), before the reset"
)
MEMORY_METHOD_CUDA = (
    "each arm in a fresh subprocess loading only its own models (no sharing) and running the given "
    "number of steps; torch.cuda.memory_allocated after loading and after the steps, "
    "torch.cuda.max_memory_allocated (and _reserved) over the steps, the peak reset after loading "
    "(ssd-preview's one-off preview fit runs while loading, before the reset)"
)


def probe_memory(name: str, s: Settings) -> dict[str, Any]:
    """Load only ``name``'s models in this (fresh) process, run ``s.memory_steps`` steps and return
    the memory numbers in GiB (see the module docstring). CPU: ``rss_after_load`` (safetensors
    weights are memory-mapped and become resident when first used), ``rss_after_steps`` (weights
    touched + persistent state such as Adam's), ``peak_rss_steps`` (``VmHWM`` since the reset after
    loading). CUDA: the same with allocated memory."""
    paths = prepare_models(s, Path(s.model_dir))
    if name in THREESTUDIO_ARMS:
        setup_threestudio(s.threestudio_src)
    cuda = s.device.startswith("cuda")
    arm = build_all([name], paths, s, share=False)[0][0]
    gc.collect()
    result: dict[str, Any] = {"arm": name, "steps": s.memory_steps}
    if cuda:
        harness.synchronize(s.device)
        result["allocated_after_load_gib"] = torch.cuda.memory_allocated(s.device) / harness.GIB
        torch.cuda.reset_peak_memory_stats(s.device)
    else:
        result["rss_after_load_gib"] = harness.proc_status_kib()["VmRSS"] * 1024 / harness.GIB
        result["hwm_reset"] = harness.reset_peak_rss()
    for _ in range(s.memory_steps):
        arm.step()
    harness.synchronize(s.device)
    if cuda:
        result["allocated_after_steps_gib"] = torch.cuda.memory_allocated(s.device) / harness.GIB
        result["peak_allocated_steps_gib"] = torch.cuda.max_memory_allocated(s.device) / harness.GIB
        result["peak_reserved_steps_gib"] = torch.cuda.max_memory_reserved(s.device) / harness.GIB
    else:
        result["rss_after_steps_gib"] = harness.proc_status_kib()["VmRSS"] * 1024 / harness.GIB
        result["peak_rss_steps_gib"] = harness.proc_status_kib()["VmHWM"] * 1024 / harness.GIB
    return result


def run_memory_probes(arms: list[str], s: Settings, timeout: float) -> dict[str, Any]:
    """Each arm's :func:`probe_memory` in a fresh subprocess (its JSON is the last stdout line). A
    probe that fails (e.g. out of memory) is recorded, not fatal."""
    out: dict[str, Any] = {}
    for name in arms:
        _step(f"memory probe: {name} (fresh process)")
        cmd = [sys.executable, str(Path(__file__).resolve()), *to_argv(s), "--probe", name]
        start = time.perf_counter()
        try:
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            out[name] = harness.json_from_subprocess(cmd, timeout, env=env)
        except RuntimeError as err:
            first, _, rest = str(err).partition("\n")
            out[name] = {"arm": name, "error": first}
            print(f"memory probe of {name!r} failed:\n{rest}", file=sys.stderr)
        out[name]["wall_s"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------------------------
# The run


def build_all(
    names: list[str], paths: ModelPaths, s: Settings, share: bool
) -> tuple[list[Arm], Shared, Inputs]:
    """Load the models of ``names`` and build their arms on one set of inputs. Ours share one
    score model (and depth baseline); with ``share`` the threestudio guidances reuse its frozen
    UNet/VAE too. With ``ssd-preview``, the preview decoder is fitted here, before any step."""
    shared = Shared()
    if any(n in ("sds", *SSD_ARMS) for n in names) or share:
        shared.score_model = load_score_model(paths, s)
    if any(n in SSD_ARMS for n in names):
        shared.baseline = load_depth_baseline(paths, s)
    if "ssd-preview" in names:
        _step("fitting the preview decoder (once, before any timed step)")
        shared.preview_fit = fit_preview_decoder(shared.score_model, s)
    unet_config = json.loads((paths.sd / "unet" / "config.json").read_text())
    side = int(unet_config["sample_size"]) * 2 ** (
        len(json.loads((paths.sd / "vae" / "config.json").read_text())["block_out_channels"]) - 1
    )
    inputs = make_inputs(side, int(unet_config["cross_attention_dim"]), torch.device(s.device), s.seed)
    arms = []
    for name in names:
        torch.manual_seed(s.seed)
        random.seed(s.seed)  # threestudio's VSD drops the camera with python's RNG
        if name in THREESTUDIO_ARMS:
            arms.append(build_threestudio(name, paths, inputs, s, shared if share else None))
        else:
            arms.append(build_ours(name, shared, inputs, s))
    return arms, shared, inputs


def environment(s: Settings) -> dict[str, Any]:
    """Which machine and software produced the numbers (``benchmarks.harness.machine``)."""
    return {**harness.machine(s.device), "dtype": "float16" if s.fp16 else "float32"}


def summarise(times: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-arm statistics and the ratios to ``sds`` and between the SSD arms and ``vsd`` (of
    medians, and the median of the per-round ratios, which pair steps that ran close together in
    time)."""
    arms = {
        name: {
            "step_times_s": ts,
            "median_s": statistics.median(ts),
            "mean_s": statistics.fmean(ts),
            "min_s": min(ts),
            "max_s": max(ts),
        }
        for name, ts in times.items()
    }
    ratios: dict[str, Any] = {}
    pairs = [
        ("ssd", "sds"),
        ("vsd", "sds"),
        ("sds-threestudio", "sds"),
        ("vsd", "sds-threestudio"),
        ("ssd", "vsd"),
        ("ssd-preview", "sds"),
        ("ssd-preview", "vsd"),
        ("ssd-preview", "ssd"),
    ]
    for num, den in pairs:
        if num in times and den in times:
            ratios[f"{num}/{den}"] = arms[num]["median_s"] / arms[den]["median_s"]
            ratios[f"{num}/{den}_paired_median"] = statistics.median(
                a / b for a, b in zip(times[num], times[den], strict=True)
            )
    return arms, ratios


def targets(ratios: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, reported (not asserted) for each SSD arm timed: at most 1.3x SDS, and
    below VSD (ratios of medians)."""
    out: dict[str, Any] = {}
    for name in SSD_ARMS:
        if f"{name}/sds" in ratios:
            out[f"{name}_at_most_1.3x_sds"] = ratios[f"{name}/sds"] <= 1.3
        if f"{name}/vsd" in ratios:
            out[f"{name}_below_vsd"] = ratios[f"{name}/vsd"] < 1.0
    return out


def parameter_counts(arms: list[Arm]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for arm in arms:
        for key, module in arm.modules.items():
            counts[key] = sum(p.numel() for p in module.parameters()) / 1e6
    return counts


def run(s: Settings) -> dict[str, Any]:
    if s.threads:
        torch.set_num_threads(s.threads)
    tag = s.tag or ("quick" if s.quick else s.device.split(":")[0] + ("-fp16" if s.fp16 else ""))
    out_dir = Path(s.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    if s.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cost_models_")
        s = dataclasses.replace(s, model_dir=tmp.name)
    try:
        return _run(s, out_dir, tag)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(s: Settings, out_dir: Path, tag: str) -> dict[str, Any]:
    wall = time.perf_counter()
    skipped: dict[str, str] = {}
    names = list(s.arms)
    if any(n in THREESTUDIO_ARMS for n in names):
        try:
            setup_threestudio(s.threestudio_src)
        except ImportError as err:
            reason = (
                f"threestudio is unavailable ({err}); set THREESTUDIO_SRC or --threestudio-src "
                "to a threestudio checkout"
            )
            for n in THREESTUDIO_ARMS:
                if n in names:
                    skipped[n] = reason
                    names.remove(n)
            print(f"SKIPPED arms {sorted(skipped)}: {reason}", file=sys.stderr)
    _step(f"model folders in {s.model_dir}")
    paths = prepare_models(s, Path(s.model_dir))
    result: dict[str, Any] = {
        "benchmark": "cost_real_scale",
        "mode": "quick" if s.quick else "full",
        "complete": False,
        "command": "python benchmarks/cost_real_scale.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("probe",)},
        "environment": environment(s),
        "skipped_arms": skipped,
        "models": _model_sources(s),
    }
    _step("loading the models for the timing run")
    arms, shared, inputs = build_all(names, paths, s, share=s.share)
    result["parameters_m"] = parameter_counts(arms)
    result["arm_notes"] = {a.name: a.notes for a in arms if a.notes}
    if shared.preview_fit is not None:
        result["preview_fit"] = shared.preview_fit
    result["shared_frozen_modules"] = s.share
    _step(f"timing {[a.name for a in arms]}: {s.warmup} warm-up + {s.rounds} interleaved rounds")
    times = time_interleaved(arms, s)
    result["arms"], result["ratios"] = summarise(times)
    result["targets"] = targets(result["ratios"])
    for arm in arms:
        if not (s.breakdown and arm.name in SSD_ARMS):
            continue
        _step(f"{arm.name} step split into parts")
        key = BREAKDOWN_KEYS[arm.name]
        result[key] = breakdown_ssd(arm, inputs, s)
        if "sds" in result["arms"]:
            result[key]["ssd_minus_sds_median"] = (
                result["arms"][arm.name]["median_s"] - result["arms"]["sds"]["median_s"]
            )
    if not s.device.startswith("cuda"):
        result["timing_process_peak_rss_gib"] = harness.proc_status_kib()["VmHWM"] * 1024 / harness.GIB
    write_outputs(result, out_dir, tag)  # the timings are safe before the (long) memory probes
    del arms, shared, inputs
    gc.collect()
    if s.memory:
        result["memory"] = {
            "method": MEMORY_METHOD_CUDA if s.device.startswith("cuda") else MEMORY_METHOD_CPU,
            "arms": run_memory_probes(names, s, 600.0 if s.quick else 3600.0),
        }
    result["environment"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - wall
    result["complete"] = True
    write_outputs(result, out_dir, tag)
    print(report_markdown(result))
    return result


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str) -> None:
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{tag}.md").write_text(report_markdown(result))


def _model_sources(s: Settings) -> dict[str, str]:
    if s.quick:
        return {
            "sd": "QUICK_UNET / QUICK_VAE: tiny random UNet (64x64 latents) and 4-level VAE (512 px)",
            "sd_lora": "the tiny UNet config with time_embedding_dim=1280 (VSD's camera embedding), random",
            "depth": "threestudio_ssd.testing.make_tiny_depth_estimator (random DPT, 32 px input)",
        }
    return {
        "sd": "stabilityai/stable-diffusion-2-1-base unet/vae/scheduler configs, random weights",
        "sd_lora": "stabilityai/stable-diffusion-2-1 (768-v) unet/scheduler configs, random weights",
        "depth": "Intel/dpt-hybrid-midas config (DPT-Hybrid, MiDaS v3.0), random weights",
        "text_encoder": "one-layer random CLIPTextModel (loaded and deleted by threestudio; never run)",
    }


def report_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"Device: {env['device_name']} ({env['device']}, {env['dtype']}), torch {env['torch']}, "
        f"{env['torch_threads']} threads; {result['settings']['rounds']} interleaved rounds after "
        f"{result['settings']['warmup']} warm-up.",
        "",
    ]
    memory = result.get("memory", {}).get("arms", {})
    rows = []
    for name, arm in result["arms"].items():
        ratio = result["ratios"].get(f"{name}/sds", 1.0 if name == "sds" else math.nan)
        paired = result["ratios"].get(f"{name}/sds_paired_median", 1.0 if name == "sds" else math.nan)
        mem = memory.get(name, {})
        peak = mem.get("peak_rss_steps_gib", mem.get("peak_allocated_steps_gib"))
        resident = mem.get("rss_after_steps_gib", mem.get("allocated_after_steps_gib"))
        mem_text = f"{peak:.2f} ({resident:.2f})" if peak is not None else mem.get("error", "-")
        times = (f"{arm[k]:.3f}" for k in ("median_s", "min_s", "max_s"))
        rows.append([name, *times, f"{ratio:.2f}", f"{paired:.2f}", mem_text])
    header = ["arm", "median s/step", "min", "max", "x sds (medians)", "x sds (paired)"]
    lines += harness.markdown_table([*header, "peak memory GiB (resident after the step)"], rows)
    cross = [
        f"{k} {v:.2f} (paired {result['ratios'][k + '_paired_median']:.2f})"
        for k, v in result["ratios"].items()
        if not k.endswith("_paired_median") and not k.endswith("/sds")
    ]
    if cross:
        lines += ["", "Other ratios of medians: " + "; ".join(cross) + "."]
    if result.get("targets"):
        lines += [
            "",
            "Targets (reported, not asserted): "
            + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
            + ".",
        ]
    for name, key in BREAKDOWN_KEYS.items():
        if key in result:
            split = ", ".join(f"{k} {v:.3f}" for k, v in result[key].items())
            lines += ["", f"{name} step split (s): {split}"]
    if "preview_fit" in result:
        fit = result["preview_fit"]
        lines += [
            "",
            f"Preview decoder (ssd-preview): fitted once before timing on {fit['n_images']} synthetic "
            f"{fit['image_size']} px images in {fit['fit_s']:.2f} s, R^2 = {fit['r2']:.4f}. {fit['note']}.",
        ]
    for name, reason in result["skipped_arms"].items():
        lines.append(f"\nSKIPPED {name}: {reason}")
    return "\n".join(lines) + "\n"


def _step(message: str) -> None:
    print(f"[cost_real_scale] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse_args(argv)
    if s.probe is not None:
        if s.threads:
            torch.set_num_threads(s.threads)
        if s.model_dir is None:
            raise SystemExit("--probe needs --model-dir (it is started by the benchmark itself)")
        result = probe_memory(s.probe, s)
        print(json.dumps(result))
        return result
    return run(s)


if __name__ == "__main__":
    main()
