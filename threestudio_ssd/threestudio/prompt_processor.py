"""``stein-prior-prompt-processor``: prompts for class-conditional LCSS priors.

An LCSS prior (``lcss_prior.export``) is conditioned on caption ids, not on text embeddings, so
there is no text encoder, no subprocess and no embedding cache: the processor reads the prior's
caption list from ``<prior_path>/prior.json`` and maps the prompt to its id. When the vocabulary
also holds view-dependent captions written like threestudio's suffixes (``"<prompt>, front
view"``, ``", side view"``, ``", back view"``, ``", overhead view"``), the output picks them by
camera direction, with threestudio's direction rules and thresholds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from threestudio.utils.base import BaseObject
from torch import Tensor

from threestudio_ssd.threestudio.registry import register

#: threestudio's direction names in its order of precedence (later wins), and their suffixes.
DIRECTIONS = ("side", "front", "back", "overhead")


def normalize_caption(text: str) -> str:
    """Captions compare case-insensitively with runs of white space collapsed."""
    return " ".join(str(text).lower().split())


def shift_azimuth_deg(azimuth: Tensor) -> Tensor:
    """Azimuth (degrees) to ``[-180, 180)``."""
    return (azimuth + 180.0) % 360.0 - 180.0


def read_prior_captions(prior_path: str) -> tuple[list[str], int | None]:
    """``(captions, null_class)`` from ``<prior_path>/prior.json``, read and validated by
    ``lcss_prior.export.read_prior_json`` (format, version, manifest checksums); raises naming the
    file."""
    from lcss_prior.export import read_prior_json

    if not os.path.isdir(prior_path):
        raise FileNotFoundError(f"prior_path={prior_path!r}: no such folder (expected an lcss_prior export)")
    meta = read_prior_json(prior_path)
    if not meta["captions"]:
        raise ValueError(
            f"{os.path.join(prior_path, 'prior.json')}: 'captions' is empty (the prior is unconditional)"
        )
    return list(meta["captions"]), meta["null_class"]


@dataclass
class PriorPromptProcessorOutput:
    """What the guidance needs to condition an LCSS prior on the prompt.

    ``label`` is the prompt's caption id; ``view_labels`` maps direction names to the ids of the
    view-dependent captions that exist (missing directions use ``label``).
    """

    prompt: str
    label: int
    null_label: int | None
    captions: list[str]
    view_labels: dict[str, int] = field(default_factory=dict)
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0

    def direction_index(
        self, elevation: Float[Tensor, " B"], azimuth: Float[Tensor, " B"]
    ) -> Int[Tensor, " B"]:
        """Index into ``DIRECTIONS`` per camera (threestudio's rules: overhead beats back/front,
        which beat side)."""
        azi = shift_azimuth_deg(azimuth)
        idx = torch.zeros_like(elevation, dtype=torch.long)
        idx[(azi > -self.front_threshold) & (azi < self.front_threshold)] = 1
        idx[(azi > 180.0 - self.back_threshold) | (azi < -180.0 + self.back_threshold)] = 2
        idx[elevation > self.overhead_threshold] = 3
        return idx

    def get_labels(
        self,
        elevation: Float[Tensor, " B"],
        azimuth: Float[Tensor, " B"],
        camera_distances: Float[Tensor, " B"] | None = None,
        view_dependent_prompting: bool = True,
    ) -> Int[Tensor, " B"]:
        """Caption ids ``[B]`` for a batch of cameras (the counterpart of threestudio's
        ``get_text_embeddings``)."""
        labels = torch.full_like(elevation, self.label, dtype=torch.long)
        if view_dependent_prompting and self.view_labels:
            table = torch.tensor(
                [self.view_labels.get(d, self.label) for d in DIRECTIONS], device=labels.device
            )
            labels = table[self.direction_index(elevation, azimuth)]
        return labels


def text_embedding_prompt_output(
    text: Tensor, uncond: Tensor, text_vd: Tensor, uncond_vd: Tensor, prompt: str
) -> object:
    """threestudio's ``PromptProcessorOutput`` around precomputed text embeddings (``[1, L, D]`` and,
    per direction of ``DIRECTIONS``, ``[4, L, D]``), for Stable Diffusion guidances without running
    threestudio's prompt processors (which need the text encoder): threestudio's four view
    directions with its default thresholds (front/back 45 degrees, overhead 60), perp-neg off."""
    from threestudio.models.prompt_processors.base import DirectionConfig, PromptProcessorOutput

    def same(s: str) -> str:
        return s

    def side(e: Tensor, a: Tensor, d: Tensor) -> Tensor:
        return torch.ones_like(e, dtype=torch.bool)

    def front(e: Tensor, a: Tensor, d: Tensor) -> Tensor:
        return shift_azimuth_deg(a).abs() < 45.0

    def back(e: Tensor, a: Tensor, d: Tensor) -> Tensor:
        return shift_azimuth_deg(a).abs() > 135.0

    def overhead(e: Tensor, a: Tensor, d: Tensor) -> Tensor:
        return e > 60.0

    rules = {"side": side, "front": front, "back": back, "overhead": overhead}
    return PromptProcessorOutput(
        text_embeddings=text,
        uncond_text_embeddings=uncond,
        text_embeddings_vd=text_vd,
        uncond_text_embeddings_vd=uncond_vd,
        directions=[DirectionConfig(n, same, same, rules[n]) for n in DIRECTIONS],
        direction2idx={n: i for i, n in enumerate(DIRECTIONS)},
        use_perp_neg=False,
        perp_neg_f_sb=(1, 0.5, -0.606),
        perp_neg_f_fsb=(1, 0.5, 0.967),
        perp_neg_f_fs=(4, 0.5, -2.426),
        perp_neg_f_sf=(4, 0.5, -2.426),
        prompt=prompt,
        prompts_vd=[f"{prompt}, {n} view" for n in DIRECTIONS],
    )


@register("stein-prior-prompt-processor")
class PriorPromptProcessor(BaseObject):
    """Maps ``prompt`` to the caption vocabulary of an exported LCSS prior."""

    @dataclass
    class Config(BaseObject.Config):
        prior_path: str = ""
        prompt: str = ""
        front_threshold: float = 45.0
        back_threshold: float = 45.0
        overhead_threshold: float = 60.0

    cfg: Config

    def configure(self) -> None:
        if not self.cfg.prior_path:
            raise ValueError("prompt_processor.prior_path is required (an lcss_prior export folder)")
        captions, null_class = read_prior_captions(self.cfg.prior_path)
        index = {normalize_caption(c): i for i, c in enumerate(captions)}
        key = normalize_caption(self.cfg.prompt)
        if key not in index:
            suffixes = tuple(f", {d} view" for d in DIRECTIONS)
            base = [c for c in captions if not normalize_caption(c).endswith(suffixes)]
            listing = "\n".join(f"  - {c}" for c in base)
            raise ValueError(
                f"prompt_processor.prompt={self.cfg.prompt!r} is not in the vocabulary of the prior "
                f"at {self.cfg.prior_path!r}; valid prompts:\n{listing}"
            )
        view_labels = {d: index[f"{key}, {d} view"] for d in DIRECTIONS if f"{key}, {d} view" in index}
        self.output = PriorPromptProcessorOutput(
            prompt=captions[index[key]],
            label=index[key],
            null_label=null_class,
            captions=captions,
            view_labels=view_labels,
            front_threshold=self.cfg.front_threshold,
            back_threshold=self.cfg.back_threshold,
            overhead_threshold=self.cfg.overhead_threshold,
        )

    def __call__(self) -> PriorPromptProcessorOutput:
        return self.output
