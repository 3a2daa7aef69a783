"""Score models behind one interface (docs/ARCHITECTURE.md): Stable Diffusion (latent space) and
exported LCSS priors (pixel space), built by name with ``build_score_model``.

The concrete classes are imported lazily, so ``import threestudio_ssd.score_models`` does not
import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from threestudio_ssd.score_models.base import ScoreModel, sds_weight

SCORE_MODELS: dict[str, str] = {
    "stable-diffusion": "threestudio_ssd.score_models.stable_diffusion:StableDiffusionScoreModel",
    "lcss-prior": "threestudio_ssd.score_models.lcss:LCSSPriorScoreModel",
}
"""Registry: name -> ``module:class`` of a ``ScoreModel``."""


def score_model_class(name: str) -> type[ScoreModel]:
    """The ``ScoreModel`` class registered under ``name``."""
    if name not in SCORE_MODELS:
        raise ValueError(f"unknown score model {name!r}; registered: {sorted(SCORE_MODELS)}")
    module, cls = SCORE_MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_score_model(name: str, **kwargs: Any) -> ScoreModel:
    """Construct the score model ``name`` ("stable-diffusion" | "lcss-prior") from ``kwargs``
    (the class's constructor arguments)."""
    return score_model_class(name)(**kwargs)


def __getattr__(name: str) -> Any:
    if name == "StableDiffusionScoreModel":
        return score_model_class("stable-diffusion")
    if name == "LCSSPriorScoreModel":
        return score_model_class("lcss-prior")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SCORE_MODELS",
    "LCSSPriorScoreModel",
    "ScoreModel",
    "StableDiffusionScoreModel",
    "build_score_model",
    "score_model_class",
    "sds_weight",
]
