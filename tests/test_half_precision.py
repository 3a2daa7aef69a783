"""``grad phi`` through a reduced-precision VAE decoder is the gradient of the evaluated ``phi``.

A depth baseline over ``N`` pixels has ``d phi / d image ~ 1/N`` per entry: 1e-6 to 1e-8 at 512 px,
where float16 rounds coarsely or flushes to zero. ``phi`` here is ``PIXEL_GRAD * <w, decode(x)>``
with ``w`` in [0.5, 1.5], so ``d phi / d image`` lies in that range whatever the image size (the
tiny random VAE at 32 px stands for SD's at 512 px; what is tested is the backward's arithmetic).

* On the same ``x_t``, the half-precision decoder's ``grad phi`` matches the float32 decoder with
  the same (rounded) weights: cosine and relative error within the stated tolerances. The plain
  cast (float16 backward on the unscaled gradient, the code before ``call_in_precision``) fails
  them.
* The Stein control variate ``eps phi - sigma grad phi`` on the reduced-precision path passes the
  zero-mean test (Hotelling, false-alarm level 1e-4) and the plain float16 cast fails it.

float16 through ``half_precision=True`` (the guidance's ``half_precision_weights``), bfloat16 by
casting the VAE (CPU autocast's type; float32's range, so nothing underflows, only rounding).
With CUDA the same tests run on the GPU (``-m cuda``; the device check runs them).
"""

from __future__ import annotations

import copy

import pytest
import torch

from threestudio_ssd.precision import call_in_precision
from threestudio_ssd.score_models import build_score_model
from threestudio_ssd.stein import baseline_value_and_grad
from threestudio_ssd.testing import check_zero_mean, make_tiny_stable_diffusion

RESOLUTION = 32
PIXEL_GRAD = 1e-7
FALSE_ALARM = 1e-4
#: (cosine at least, relative error at most) of the reduced-precision grad phi against float32's:
#: float16 keeps 11 significant bits, bfloat16 8, and the backward's sums accumulate their rounding
TOLERANCE = {torch.float16: (0.9999, 0.01), torch.bfloat16: (0.999, 0.05)}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_stable_diffusion(
        tmp_path_factory.mktemp("half") / "sd",
        scheduler="ddim",
        resolution=RESOLUTION,
        unet_block_out_channels=(16, 32),
        vae_block_out_channels=(8, 16),
        norm_num_groups=8,
    )


def decoders(folder, device: str, dtype: torch.dtype):
    """The score model with its VAE in ``dtype`` (the user's loading path for float16) and a copy
    whose VAE holds the same rounded weights in float32 (the reference)."""
    low = build_score_model(
        "stable-diffusion",
        pretrained_model_name_or_path=str(folder),
        half_precision=dtype == torch.float16,
        device=device,
    )
    low.vae.to(dtype)
    ref = copy.deepcopy(low)
    ref.vae.float()
    return low, ref


def linear_phi(decode, device: str):
    """``phi(x) = PIXEL_GRAD * <w, decode(x)>`` per sample, ``w`` fixed in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(5)
    w = (0.5 + torch.rand(1, 3, RESOLUTION, RESOLUTION, generator=g)).to(device)
    return lambda x: PIXEL_GRAD * (w * decode(x)).flatten(1).sum(1)


def plain_cast_decode(sm):
    """The decode before ``call_in_precision``: cast down, decode, cast up (unscaled backward)."""
    return lambda x: (sm.vae.decode((x / sm.scaling_factor).to(sm.vae.dtype)).sample.float() + 1) / 2


def agreement(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    g, ref = g.double().flatten(), ref.double().flatten()
    cosine = float(g @ ref / (g.norm() * ref.norm()))
    return cosine, float((g - ref).norm() / ref.norm())


def latents(device: str, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 4, RESOLUTION // 2, RESOLUTION // 2, generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_grad_phi_matches_float32(sd_folder, device, dtype):
    low, ref = decoders(sd_folder, device, dtype)
    x = latents(device)
    _, g_ref = baseline_value_and_grad(linear_phi(ref.decode, device), x)
    _, g_low = baseline_value_and_grad(linear_phi(low.decode, device), x)
    min_cosine, max_error = TOLERANCE[dtype]
    cosine, error = agreement(g_low, g_ref)
    assert cosine >= min_cosine and error <= max_error, (cosine, error)
    if dtype == torch.float16:  # the unscaled backward loses the 1e-7 entries
        _, g_plain = baseline_value_and_grad(linear_phi(plain_cast_decode(low), device), x)
        cosine, error = agreement(g_plain, g_ref)  # cosine is nan where everything is flushed to 0
        assert not (cosine >= min_cosine and error <= max_error), (cosine, error)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_control_variate_is_zero_mean_on_the_reduced_precision_path(sd_folder, device, dtype):
    low, ref = decoders(sd_folder, device, dtype)
    x0 = latents(device, n=1)
    _, direction = baseline_value_and_grad(linear_phi(ref.decode, device), x0)
    p = check_zero_mean(linear_phi(low.decode, device), x0, sigma=0.5, n=192, direction=direction)
    assert p["correct"] > FALSE_ALARM, p
    assert p["stop_gradient"] < FALSE_ALARM and p["paper_sign"] < FALSE_ALARM, p
    if dtype == torch.float16:
        plain = check_zero_mean(linear_phi(plain_cast_decode(low), device), x0, 0.5, 192, direction)
        assert plain["correct"] < FALSE_ALARM, plain


def test_call_in_precision_scales_by_powers_of_two_and_keeps_float32_paths():
    x = torch.tensor([1e-3, 2.0, -3.0], requires_grad=True)
    # no dtype change: the function itself, same graph
    assert call_in_precision(lambda z: z * 2, x, torch.float32).grad_fn.name() == "MulBackward0"
    # a gradient far below float16's normal range comes back exactly (power-of-two scaling)
    y = call_in_precision(lambda z: z * 3, x, torch.float16)
    assert y.dtype == torch.float32
    (g,) = torch.autograd.grad(y, x, grad_outputs=torch.full((3,), 2.0**-30))
    assert torch.equal(g, torch.full((3,), 3 * 2.0**-30))
    (g,) = torch.autograd.grad(
        (x.to(torch.float16) * 3).float(), x, grad_outputs=torch.full((3,), 2.0**-30)
    )
    assert torch.equal(g, torch.zeros(3))  # what the plain cast gives
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        y = call_in_precision(lambda z: z * 3, x, torch.float16)
        torch.autograd.grad(y, x, grad_outputs=torch.tensor([1.0, float("nan"), 1.0]))
