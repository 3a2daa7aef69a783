"""Classifier-free guidance: the one formula the whole project uses."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def classifier_free_guidance(
    eps_cond: Float[Tensor, "B ..."], eps_uncond: Float[Tensor, "B ..."], scale: float
) -> Float[Tensor, "B ..."]:
    """``eps = eps_u + s * (eps_c - eps_u)``.

    ``s = 1`` is the conditional model and ``s = 0`` the unconditional one. threestudio's own
    guidances write ``eps_c + s' * (eps_c - eps_u)``, so their ``s'`` is our ``s - 1``.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)
