"""Monocular depth estimators behind one small, differentiable module.

``load_depth_estimator(path_or_id)`` loads any transformers ``AutoModelForDepthEstimation``
checkpoint (DPT-Large, DPT-Hybrid = MiDaS v3, Depth Anything (V2), ZoeDepth, GLPN) and wraps it in
a :class:`DepthEstimator`, whose forward pass is differentiable with respect to the input image.
This file is the only place that touches the transformers depth API, so a version change of
transformers touches this file only.

Preprocessing is done in torch (never PIL/numpy), so gradients reach the image:

1. resize ``rgb`` (``[0, 1]``) to the model's input size (``size``/``keep_aspect_ratio``/
   ``ensure_multiple_of``/``size_divisor`` from the checkpoint's ``preprocessor_config.json``, else
   the model type's defaults in :data:`MODEL_TYPE_DEFAULTS`), rounded to the multiple the backbone
   needs (its patch size); bicubic or bilinear as the config's ``resample`` says, antialiased when
   shrinking;
2. normalise ``(x - mean) / std`` (config ``image_mean``/``image_std``, or the type's defaults;
   ``do_normalize: false`` means mean 0, std 1). Image processors rescale uint8 by 1/255 first;
   our input is already in ``[0, 1]``, which is the same thing;
3. run the network and resize its prediction back to the input resolution (bilinear).

What the output means (``DepthEstimator.output_kind``), decided from the config:

* ``"relative_inverse_depth"``: DPT / MiDaS and relative Depth Anything checkpoints predict
  relative inverse depth (disparity up to an unknown scale and shift; larger = nearer);
* ``"metric_depth"``: ZoeDepth, GLPN and Depth Anything with
  ``depth_estimation_type: "metric"`` predict depth in metres (larger = farther).

DPT checkpoints fine-tuned for metric depth (e.g. the original DPT KITTI/NYU heads) cannot be told
apart from the config; pass ``output_kind="metric_depth"`` for them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

OUTPUT_KINDS = ("relative_inverse_depth", "metric_depth")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """How an image in ``[0, 1]`` becomes the network input.

    ``size`` is the target ``(height, width)``, or ``None`` to keep the input size (GLPN);
    ``multiple`` is what both sides are rounded to; ``keep_aspect_ratio`` scales both sides by the
    factor closest to 1 (the DPT/ZoeDepth rule); ``resample`` is ``"bicubic"`` or ``"bilinear"``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int] | None
    keep_aspect_ratio: bool
    multiple: int
    resample: str

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The network input size for an image of ``height x width``."""
        if self.size is None:
            return (
                max(self.multiple, (height // self.multiple) * self.multiple),
                max(self.multiple, (width // self.multiple) * self.multiple),
            )
        scale_h, scale_w = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:
            # Scale as little as possible: use the factor closer to 1 for both sides.
            scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        return _round_to_multiple(scale_h * height, self.multiple), _round_to_multiple(
            scale_w * width, self.multiple
        )


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


# Defaults per transformers ``model_type``, used where a checkpoint has no
# ``preprocessor_config.json`` (or leaves a key out). They are the defaults of the matching
# transformers image processors (DPTImageProcessor: mean/std 0.5, 384x384; Depth Anything:
# ImageNet mean/std, 518 with aspect ratio kept, multiple of 14; ZoeDepth: mean/std 0.5, 384x512,
# aspect kept, multiple of 32; GLPN: no normalisation, input size floored to a multiple of 32).
# A DPT checkpoint without a processor config is run at its config's ``image_size``.
MODEL_TYPE_DEFAULTS: dict[str, dict] = {
    "dpt": dict(
        mean=HALF_MEAN_STD,
        std=HALF_MEAN_STD,
        size=(384, 384),
        keep_aspect_ratio=False,
        multiple=1,
        resample="bicubic",
        output_kind="relative_inverse_depth",
    ),
    "depth_anything": dict(
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        size=(518, 518),
        keep_aspect_ratio=True,
        multiple=14,
        resample="bicubic",
        output_kind="relative_inverse_depth",
    ),
    "zoedepth": dict(
        mean=HALF_MEAN_STD,
        std=HALF_MEAN_STD,
        size=(384, 512),
        keep_aspect_ratio=True,
        multiple=32,
        resample="bilinear",
        output_kind="metric_depth",
    ),
    "glpn": dict(
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        size=None,
        keep_aspect_ratio=False,
        multiple=32,
        resample="bilinear",
        output_kind="metric_depth",
    ),
}

_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DepthEstimator(nn.Module):
    """A frozen monocular depth network with differentiable torch preprocessing.

    ``forward(rgb [B,3,H,W] in [0,1]) -> [B,H,W]`` at the input resolution; what the values mean is
    ``output_kind`` (see the module docstring). Always in eval mode; weights never require grad.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, output_kind: str, name: str = ""):
        super().__init__()
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        self.model = model
        self.preprocessing = preprocessing
        self.output_kind = output_kind
        self.name = name
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> DepthEstimator:  # frozen: always eval
        return super().train(False)

    def preprocess(self, rgb: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 h w"]:
        """Resize to the network input size and normalise: ``(resize(rgb) - mean) / std``."""
        height, width = rgb.shape[-2:]
        size = self.preprocessing.output_size(height, width)
        x = rgb
        if size != (height, width):
            shrinking = size[0] < height or size[1] < width
            x = F.interpolate(
                x, size=size, mode=self.preprocessing.resample, align_corners=False, antialias=shrinking
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, rgb: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B H W"]:
        """Depth or inverse depth (``output_kind``) of ``rgb`` in ``[0, 1]``, at ``rgb``'s resolution,
        differentiable with respect to ``rgb``."""
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"DepthEstimator expects rgb of shape [B, 3, H, W], got {tuple(rgb.shape)}")
        height, width = rgb.shape[-2:]
        # Preprocess in the input's precision (antialiased resampling has no CPU half kernels),
        # then cast to the weights' dtype.
        x = self.preprocess(rgb).to(self.dtype)
        pred = self.model(pixel_values=x).predicted_depth  # [B, h, w]
        pred = F.interpolate(pred[:, None], size=(height, width), mode="bilinear", align_corners=False)
        return pred[:, 0].to(rgb.dtype)


def _offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_error(path_or_id: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Depth model {path_or_id!r} is not a local folder and {reason}. Download it once on a machine "
        f"with network access (`huggingface-cli download {path_or_id} --local-dir <folder>`), copy the "
        "folder here and pass its path to load_depth_estimator."
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def _resolve_folder(path_or_id: str) -> tuple[Path, bool]:
    """Return ``(folder, is_local)``; hub ids are resolved to their local snapshot (downloaded only
    when online)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path, True
    if path.exists():
        raise ValueError(f"Depth model path {str(path)!r} is a file; pass the checkpoint folder.")
    if path_or_id.startswith((".", "/", "~")) or not _HUB_ID.match(path_or_id):
        raise FileNotFoundError(
            f"Depth model folder {path_or_id!r} does not exist (expected a transformers checkpoint folder "
            "with config.json, e.g. one written by save_pretrained, or a Hugging Face Hub id)."
        )
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = snapshot_download(
            path_or_id,
            allow_patterns=["*.json", "*.safetensors", "*.bin"],
            local_files_only=offline,
        )
    except Exception as e:  # noqa: BLE001  (network, auth and cache errors all mean "not available")
        reason = (
            "the Hugging Face Hub is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is not in the "
            "local cache"
            if offline
            else f"the Hugging Face Hub could not provide it ({type(e).__name__}: {e})"
        )
        raise _hub_error(path_or_id, reason) from e
    return Path(folder), False


def _preprocessing_from_config(folder: Path, model_type: str, config: dict, input_size) -> Preprocessing:
    defaults = MODEL_TYPE_DEFAULTS[model_type]
    proc_file = folder / "preprocessor_config.json"
    proc = _read_json(proc_file, "Image-processor config") if proc_file.is_file() else {}

    if proc.get("do_normalize", True):
        mean = tuple(float(v) for v in _as_triple(proc.get("image_mean", defaults["mean"])))
        std = tuple(float(v) for v in _as_triple(proc.get("image_std", defaults["std"])))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    size = defaults["size"]
    if model_type == "dpt" and "image_size" in config:  # DPT configs record their training size
        size = (int(config["image_size"]),) * 2
    if "size" in proc and proc.get("do_resize", True):
        s = proc["size"]
        if isinstance(s, int):
            size = (s, s)
        elif isinstance(s, dict) and "height" in s and "width" in s:
            size = (int(s["height"]), int(s["width"]))
        elif isinstance(s, dict) and "shortest_edge" in s:
            size = (int(s["shortest_edge"]), int(s["shortest_edge"]))
        else:
            raise ValueError(f"Unsupported 'size' {s!r} in {proc_file}")
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)

    multiple = int(proc.get("ensure_multiple_of", defaults["multiple"]) or 1)
    if proc.get("size_divisor"):
        multiple = math.lcm(multiple, int(proc["size_divisor"]))
    patch = _patch_size(config)
    if patch:
        multiple = math.lcm(multiple, patch)

    resample = _PIL_RESAMPLE.get(proc.get("resample"), defaults["resample"])
    return Preprocessing(
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        size=size,
        keep_aspect_ratio=bool(proc.get("keep_aspect_ratio", defaults["keep_aspect_ratio"])),
        multiple=multiple,
        resample=resample,
    )


def _as_triple(v) -> list[float]:
    return [v] * 3 if isinstance(v, (int, float)) else list(v)


def _patch_size(config: dict) -> int | None:
    """The input multiple the backbone needs: its patch size (ViT/DINOv2/BEiT)."""
    if config.get("model_type") == "dpt" and not config.get("is_hybrid", False):
        return int(config.get("patch_size", 16))
    backbone = config.get("backbone_config") or {}
    return int(backbone["patch_size"]) if "patch_size" in backbone else None


def _output_kind(model_type: str, config: dict) -> str:
    if model_type == "depth_anything":
        kind = config.get("depth_estimation_type", "relative")
        return "metric_depth" if kind == "metric" else "relative_inverse_depth"
    return MODEL_TYPE_DEFAULTS[model_type]["output_kind"]


def load_depth_estimator(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    input_size: int | tuple[int, int] | None = None,
    output_kind: str | None = None,
) -> DepthEstimator:
    """Load a transformers depth checkpoint (folder first, then a Hub id) as a frozen
    :class:`DepthEstimator`.

    Args:
        path_or_id: a folder with ``config.json`` (+ weights, + optional ``preprocessor_config.json``)
            as written by ``save_pretrained``, or a Hub id such as ``"Intel/dpt-hybrid-midas"``.
            Hub ids are read from the local cache when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
            is set; otherwise downloaded.
        dtype: weight dtype (``torch.float16`` halves memory on GPU; inputs are cast to it and the
            output is cast back to the input's dtype).
        input_size: override the network input size (int or ``(h, w)``), e.g. to run DPT-Large at
            256 px instead of 384 px for speed; still rounded to the backbone's multiple.
        output_kind: override what the network predicts (see the module docstring).

    Raises:
        FileNotFoundError: the folder does not exist, or a Hub id cannot be obtained (offline).
        ValueError: the folder is not a transformers depth-estimation checkpoint.
        lcss_prior.manifest.ManifestError (a ValueError): a file listed in the folder's
            ``MANIFEST.json`` is missing or corrupted.
    """
    from transformers import AutoModelForDepthEstimation

    from lcss_prior.manifest import verify_manifest

    path_or_id = str(path_or_id)
    folder, _ = _resolve_folder(path_or_id)
    verify_manifest(folder)  # a shipped model: every file as trained (ManifestError names the bad one)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{str(folder)!r} is not a transformers depth-estimation checkpoint: it has no config.json."
        )
    config = _read_json(config_file, "Model config")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPE_DEFAULTS:
        found = (
            f"model_type {model_type!r}"
            if model_type
            else f"a config without model_type (class {config.get('_class_name', 'unknown')!r}, "
            "e.g. a diffusers folder)"
        )
        raise ValueError(
            f"{str(folder)!r} is not a transformers depth-estimation checkpoint: config.json has {found}; "
            f"supported model types: {sorted(MODEL_TYPE_DEFAULTS)}."
        )
    if output_kind is not None and output_kind not in OUTPUT_KINDS:
        raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
    from transformers import CONFIG_MAPPING
    from transformers import __version__ as transformers_version

    if model_type not in CONFIG_MAPPING:  # e.g. depth_anything before transformers 4.38
        raise ValueError(
            f"{str(folder)!r} is a {model_type!r} checkpoint, which this transformers "
            f"{transformers_version} does not know; upgrade transformers (depth_anything needs >= 4.38)"
        )
    preprocessing = _preprocessing_from_config(folder, model_type, config, input_size)
    model = AutoModelForDepthEstimation.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    estimator = DepthEstimator(
        model, preprocessing, output_kind or _output_kind(model_type, config), name=path_or_id
    )
    return estimator.to(device)
