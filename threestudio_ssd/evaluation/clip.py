"""CLIP similarity and CLIP R-precision, with open_clip models loaded from LOCAL weights only.

``load_clip`` is the one place that calls open_clip (a version change touches only it). It takes
either a weights file for a model name open_clip knows (``ViT-B-32`` +
``open_clip_pytorch_model.bin``) or a folder with ``open_clip_config.json`` and a weights file (the
layout of an open_clip model on the Hugging Face hub, loaded with open_clip's ``local-dir:``
schema). Nothing is downloaded.

Scores, for L2-normalised embeddings ``f(x)`` of a view and ``g(y)`` of a caption:

* CLIP similarity ``100 * f(x) . g(y)`` (cosine times 100, as usually reported), per view.
* CLIP R-precision (Dream Fields): a view is a hit when its own caption has the highest cosine
  among the caption set (the prompt plus distractors); R-precision is the share of hits, and
  ``top-k`` the share where the caption ranks among the first ``k``.

Any object with ``encode_images(rgb [N, 3, H, W] in [0, 1]) -> [N, D]`` and
``encode_texts(list[str]) -> [M, D]`` can stand in for ``ClipModel`` (``clip_scores`` only uses
these two).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

__all__ = ["ClipModel", "TextImageEncoder", "clip_scores", "clip_similarity", "load_clip", "r_precision_hits"]

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


class TextImageEncoder(Protocol):
    name: str

    def encode_images(self, rgb: Float[Tensor, "N 3 H W"]) -> Float[Tensor, "N D"]: ...

    def encode_texts(self, texts: Sequence[str]) -> Float[Tensor, "M D"]: ...


class ClipModel(nn.Module):
    """A frozen open_clip model with its tokenizer and preprocessing (resize the shorter side to
    the model's image size, bicubic with antialiasing; centre crop; normalise with its mean and
    std), taking tensors rather than PIL images. ``name`` names the backbone and weights."""

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess_cfg: dict[str, Any], name: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = preprocess_cfg.get("size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.name = name

    def preprocess(self, rgb: Float[Tensor, "N 3 H W"]) -> Float[Tensor, "N 3 S S"]:
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got {tuple(rgb.shape)}")
        th, tw = self.image_size
        h, w = rgb.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = F.interpolate(
            rgb.to(self.mean), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
        )
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, rgb: Float[Tensor, "N 3 H W"], batch_size: int = 32) -> Float[Tensor, "N D"]:
        """L2-normalised image embeddings of RGB images in ``[0, 1]``."""
        out = [self.model.encode_image(self.preprocess(b)) for b in rgb.split(batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Float[Tensor, "M D"]:
        """L2-normalised text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def load_clip(
    model_name: str, weights_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> ClipModel:
    """An open_clip model from LOCAL weights: ``weights_path`` is a weights file for the open_clip
    model ``model_name`` (``open_clip.list_models()``, or one registered with
    ``open_clip.add_model_config``), or a folder holding ``open_clip_config.json`` and a weights
    file (then ``model_name`` is only a label). Errors name the missing file."""
    import open_clip

    path = Path(weights_path).expanduser()
    if path.is_dir():
        config = path / "open_clip_config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"CLIP weights folder {path} has no open_clip_config.json; give the folder of an "
                "open_clip model (config + weights) or a weights file with --clip-model"
            )
        if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
            raise FileNotFoundError(
                f"CLIP weights folder {path} holds no weights file ({', '.join(_WEIGHT_SUFFIXES)})"
            )
        try:
            model_cfg = json.loads(config.read_text())["model_cfg"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"{config} is not an open_clip config (needs 'model_cfg'): {err}") from err
        if "hf_model_name" in model_cfg.get("text_cfg", {}):
            raise ValueError(
                f"{config}: text towers from Hugging Face transformers ('hf_model_name') are not supported "
                "offline; use a CLIP with open_clip's own text tower"
            )
        source = f"local-dir:{path}"
        model, _, _ = open_clip.create_model_and_transforms(source, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(source)
        name = f"{model_name} ({path})"
    elif path.is_file():
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r} for weights file {path}; use a name from "
                "open_clip.list_models() or give a folder with open_clip_config.json"
            )
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), device=device, require_pretrained=True
            )
        except RuntimeError as err:
            raise ValueError(f"cannot load CLIP weights {path} into {model_name}: {err}") from err
        tokenizer = open_clip.get_tokenizer(model_name)
        name = f"{model_name} ({path.name})"
    else:
        raise FileNotFoundError(
            f"CLIP weights {path} do not exist; give a local open_clip weights file or folder "
            "(--clip-weights); nothing is downloaded"
        )
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    if not {"mean", "std"} <= set(cfg):
        raise RuntimeError(
            f"this open_clip version does not expose model.visual.preprocess_cfg (needs open_clip 3.x); "
            f"cannot preprocess for {name}"
        )
    return ClipModel(model, tokenizer, cfg, name).to(device)


def clip_similarity(
    image_emb: Float[Tensor, "N D"], text_emb: Float[Tensor, " D"] | Float[Tensor, "1 D"]
) -> Float[Tensor, " N"]:
    """``100 * cos(f(x_i), g(y))`` per view."""
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float().reshape(1, -1), dim=-1)
    return 100.0 * (image_emb @ text_emb.T).squeeze(1)


def r_precision_hits(
    image_emb: Float[Tensor, "N D"], caption_emb: Float[Tensor, "M D"], true_index: int = 0, k: int = 1
) -> Bool[Tensor, " N"]:
    """Whether caption ``true_index`` is among the ``k`` captions most similar to each view
    (ties count against the view: a caption as similar as the true one ranks before it)."""
    if not 0 <= true_index < caption_emb.shape[0]:
        raise ValueError(f"true_index {true_index} outside the {caption_emb.shape[0]} captions")
    sims = F.normalize(image_emb.float(), dim=-1) @ F.normalize(caption_emb.float(), dim=-1).T
    true = sims[:, true_index : true_index + 1]
    others = torch.cat([sims[:, :true_index], sims[:, true_index + 1 :]], dim=1)
    return (others >= true).sum(1) < k


def clip_scores(
    encoder: TextImageEncoder,
    rgb: Float[Tensor, "N 3 H W"],
    prompt: str,
    distractors: Sequence[str] = (),
    k: int = 1,
) -> dict[str, Any]:
    """CLIP similarity of each view to ``prompt`` and R-precision against ``[prompt, *distractors]``
    (``None`` without distractors). Means over views plus the per-view values."""
    captions = [prompt] + [c for c in dict.fromkeys(distractors) if c != prompt]
    image_emb = encoder.encode_images(rgb)
    text_emb = encoder.encode_texts(captions)
    similarity = clip_similarity(image_emb, text_emb[0])
    out: dict[str, Any] = {
        "backbone": encoder.name,
        "prompt": prompt,
        "clip_similarity": float(similarity.mean()),
        "clip_similarity_per_view": similarity.tolist(),
        "n_captions": len(captions),
    }
    if len(captions) > 1:
        hits = r_precision_hits(image_emb, text_emb, 0, 1)
        out["r_precision"] = float(hits.float().mean())
        if k > 1:
            out[f"r_precision_top{k}"] = float(r_precision_hits(image_emb, text_emb, 0, k).float().mean())
        out["r_precision_per_view"] = hits.tolist()
    else:
        out["r_precision"] = None
        out["r_precision_note"] = "no distractor captions given (--captions), so no R-precision"
    return out
