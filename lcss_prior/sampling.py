"""Samplers for score-based priors: reverse-time SDE and probability-flow ODE, one signature.

Every sampler integrates from ``t = T`` down to ``t = t_eps`` of an SDE that follows the score_sde
interface (``lcss_prior.sde``) and returns ``x`` at ``t_eps``; ``sample`` then optionally removes
the remaining noise with one Tweedie step. Samplers live in a small registry (``SAMPLERS``), so a
new one is one decorated function with the signature of ``Sampler``.

Reverse SDE (Anderson 1982; Song et al. 2021), integrated with ``dt < 0``::

    dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar

Probability-flow ODE (same marginals, deterministic)::

    dx/dt = f(x, t) - 0.5 g(t)^2 s(x, t)

Both drifts come from ``sde.reverse(score_fn, probability_flow)``, the one place that forms them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from jaxtyping import Float
from scipy.integrate import solve_ivp
from torch import Tensor
from tqdm.auto import tqdm

from lcss_prior.sde import ScoreFn, append_dims, randn_like


class Sampler(Protocol):
    """The one sampler signature: move ``x`` (a draw from the prior at ``T``) to ``t_eps``."""

    def __call__(
        self,
        sde: Any,
        score_fn: ScoreFn,
        x: Tensor,
        steps: int,
        generator: torch.Generator | None,
        progress: bool,
        **method_kwargs: Any,
    ) -> Tensor: ...


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    """Decorator that adds a sampler to ``SAMPLERS`` under ``name`` (names are unique)."""

    def decorate(fn: Sampler) -> Sampler:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn

    return decorate


def get_sampler(name: str) -> Sampler:
    """The registered sampler called ``name``; the error lists the registered ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise KeyError(f"unknown sampling method {name!r}; registered methods: {sorted(SAMPLERS)}") from None


# --------------------------------------------------------------------------------------------------
# helpers shared by the samplers and by lcss_prior.likelihood
# --------------------------------------------------------------------------------------------------


def _time(t: float, x: Tensor) -> Float[Tensor, " B"]:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def time_grid(sde: Any, steps: int) -> list[float]:
    """``steps + 1`` equally spaced times from ``sde.T`` down to ``sde.t_eps`` (both included)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return np.linspace(float(sde.T), float(sde.t_eps), int(steps) + 1).tolist()


def probability_flow_drift(sde: Any, score_fn: ScoreFn) -> Callable[[Tensor, Tensor], Tensor]:
    """``v(x, t) = f(x, t) - 0.5 g(t)^2 s(x, t)``, the velocity of the probability-flow ODE."""
    rsde = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: rsde.sde(x, t)[0]


def solve_ode(
    fun: Callable[[float, Tensor], Tensor],
    y0: Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    progress: bool = False,
    desc: str = "ODE",
) -> tuple[Tensor, int]:
    """Adaptive solution of ``dy/dt = fun(t, y)`` from ``t0`` to ``t1`` with scipy ``solve_ivp``.

    ``y`` keeps its torch shape, dtype and device inside ``fun``; the solver state is a flat float64
    vector. ``fun`` decides about autograd (the likelihood needs it for the divergence). Returns ``(y(t1), number of function evaluations)``.
    """
    shape, dtype, device = y0.shape, y0.dtype, y0.device
    bar = tqdm(desc=desc, unit="eval", disable=not progress, leave=False)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        bar.update(1)
        y_t = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        dy = fun(float(t), y_t)
        return dy.detach().reshape(-1).to(torch.float64).cpu().numpy()

    try:
        solution = solve_ivp(
            rhs,
            (float(t0), float(t1)),
            y0.detach().reshape(-1).to(torch.float64).cpu().numpy(),
            method=method,
            rtol=rtol,
            atol=atol,
        )
    finally:
        bar.close()
    if not solution.success:
        raise RuntimeError(f"solve_ivp ({method}) failed between t={t0} and t={t1}: {solution.message}")
    y1 = torch.from_numpy(solution.y[:, -1]).to(device=device, dtype=dtype).reshape(shape)
    return y1, int(solution.nfev)


def tweedie_denoise(
    sde: Any, score_fn: ScoreFn, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]
) -> Float[Tensor, "B ..."]:
    """Tweedie's formula for ``x_t = alpha(t) x0 + std(t) eps``:
    ``E[x0 | x_t] = (x_t + std(t)^2 s(x_t, t)) / alpha(t)``."""
    std = append_dims(sde.std(t), x.ndim)
    alpha = append_dims(sde.alpha(t), x.ndim)
    return (x + std**2 * score_fn(x, t)) / alpha


# --------------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------------


def _euler_maruyama_step(
    rsde: Any, x: Tensor, t: float, dt: float, generator: torch.Generator | None
) -> Tensor:
    """``x <- x + [f - g^2 s] dt + g sqrt(|dt|) z`` with ``dt < 0``."""
    drift, diffusion = rsde.sde(x, _time(t, x))
    return x + drift * dt + append_dims(diffusion, x.ndim) * math.sqrt(-dt) * randn_like(x, generator)


def _langevin_step(
    score_fn: ScoreFn, x: Tensor, t: float, snr: float, generator: torch.Generator | None
) -> Tensor:
    """One Langevin MCMC step at fixed ``t`` with score_sde's signal-to-noise step rule
    ``eps = 2 (snr * mean_i ||z_i|| / mean_i ||s(x_i)||)^2`` (norms averaged over the batch, which
    keeps the step stable in low dimension), ``x <- x + eps s(x) + sqrt(2 eps) z``."""
    grad = score_fn(x, _time(t, x))
    z = randn_like(x, generator)
    grad_norm = grad.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    noise_norm = z.flatten(1).norm(dim=1).mean()
    step = 2.0 * (snr * noise_norm / grad_norm) ** 2
    return x + step * grad + torch.sqrt(2.0 * step) * z


@register_sampler("euler_maruyama")
def euler_maruyama_sampler(
    sde: Any,
    score_fn: ScoreFn,
    x: Tensor,
    steps: int,
    generator: torch.Generator | None,
    progress: bool,
) -> Tensor:
    """Euler-Maruyama integration of the reverse-time SDE on ``time_grid(sde, steps)``."""
    return pc_sampler(sde, score_fn, x, steps, generator, progress, n_corrector=0)


@register_sampler("pc")
def pc_sampler(
    sde: Any,
    score_fn: ScoreFn,
    x: Tensor,
    steps: int,
    generator: torch.Generator | None,
    progress: bool,
    snr: float = 0.16,
    n_corrector: int = 1,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3): at each grid time ``n_corrector``
    Langevin steps with signal-to-noise ratio ``snr``, then one Euler-Maruyama step of the reverse
    SDE to the next grid time."""
    if n_corrector < 0 or snr < 0:
        raise ValueError(f"n_corrector and snr must be >= 0, got n_corrector={n_corrector}, snr={snr}")
    rsde = sde.reverse(score_fn, probability_flow=False)
    grid = time_grid(sde, steps)
    with torch.no_grad():
        for t, t_next in tqdm(
            zip(grid[:-1], grid[1:]), total=steps, desc="sampling", disable=not progress, leave=False
        ):
            for _ in range(n_corrector):
                x = _langevin_step(score_fn, x, t, snr, generator)
            x = _euler_maruyama_step(rsde, x, t, t_next - t, generator)
    return x


def _euler_step(v: Callable, x: Tensor, t: float, h: float) -> Tensor:
    return x + h * v(x, _time(t, x))


def _heun_step(v: Callable, x: Tensor, t: float, h: float) -> Tensor:
    k1 = v(x, _time(t, x))
    k2 = v(x + h * k1, _time(t + h, x))
    return x + 0.5 * h * (k1 + k2)


def _rk4_step(v: Callable, x: Tensor, t: float, h: float) -> Tensor:
    k1 = v(x, _time(t, x))
    k2 = v(x + 0.5 * h * k1, _time(t + 0.5 * h, x))
    k3 = v(x + 0.5 * h * k2, _time(t + 0.5 * h, x))
    k4 = v(x + h * k3, _time(t + h, x))
    return x + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


ODE_STEPS: dict[str, Callable[[Callable, Tensor, float, float], Tensor]] = {
    "euler": _euler_step,
    "heun": _heun_step,
    "rk4": _rk4_step,
}
"""Fixed-step ODE solvers; ``"rk45"`` (adaptive, scipy) is handled by ``solve_ode``."""


@register_sampler("ode")
def ode_sampler(
    sde: Any,
    score_fn: ScoreFn,
    x: Tensor,
    steps: int,
    generator: torch.Generator | None,
    progress: bool,
    solver: str = "heun",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """Probability-flow ODE from ``T`` to ``t_eps``: fixed-step ``euler`` / ``heun`` / ``rk4`` on
    ``time_grid(sde, steps)``, or ``solver="rk45"`` (adaptive scipy RK45 with ``rtol`` / ``atol``;
    ``steps`` is then unused). Deterministic given the prior draw, so ``generator`` is unused."""
    v = probability_flow_drift(sde, score_fn)
    if solver == "rk45":
        with torch.no_grad():
            x_end, _ = solve_ode(
                lambda t, y: v(y, _time(t, y)),
                x,
                float(sde.T),
                float(sde.t_eps),
                rtol=rtol,
                atol=atol,
                progress=progress,
                desc="ODE sampling",
            )
        return x_end
    if solver not in ODE_STEPS:
        raise KeyError(f"unknown ODE solver {solver!r}; choose from {sorted(ODE_STEPS) + ['rk45']}")
    step = ODE_STEPS[solver]
    grid = time_grid(sde, steps)
    with torch.no_grad():
        for t, t_next in tqdm(
            zip(grid[:-1], grid[1:]), total=steps, desc="ODE sampling", disable=not progress, leave=False
        ):
            x = step(v, x, t, t_next - t)
    return x


def sample(
    sde: Any,
    score_fn: ScoreFn,
    shape: Sequence[int],
    method: str = "pc",
    steps: int = 500,
    generator: torch.Generator | None = None,
    progress: bool = True,
    denoise: bool = True,
    device: torch.device | str | None = None,
    **method_kwargs: Any,
) -> Tensor:
    """Draw ``x_T ~ sde.prior_sampling(shape)``, integrate it to ``t_eps`` with the registered
    sampler ``method`` and, if ``denoise``, return Tweedie's ``E[x0 | x_{t_eps}]``
    (``tweedie_denoise``) instead of the noisy ``x_{t_eps}``.

    ``method_kwargs`` go to the sampler: ``pc`` takes ``snr`` and ``n_corrector``; ``ode`` takes
    ``solver`` (``euler``/``heun``/``rk4``/``rk45``), ``rtol`` and ``atol``.
    """
    sampler = get_sampler(method)
    time_grid(sde, steps)  # validates steps for every method
    x = sde.prior_sampling(tuple(shape), generator=generator)
    if device is not None:
        x = x.to(device)
    x = sampler(sde, score_fn, x, steps, generator, progress, **method_kwargs)
    if denoise:
        with torch.no_grad():
            x = tweedie_denoise(sde, score_fn, x, _time(float(sde.t_eps), x))
    return x


# --------------------------------------------------------------------------------------------------
# priors: guidance, labels, images
# --------------------------------------------------------------------------------------------------


def guided_score_fn(
    prior_or_model: Any,
    class_labels: Tensor | None,
    guidance_scale: float = 1.0,
    sde: Any | None = None,
) -> ScoreFn:
    """Score ``s(x, t) = sde.score_from_eps(eps_hat, t)`` (``-eps_hat / std(t)``, built by
    ``lcss_prior.model.get_score_fn``) of the classifier-free guided noise prediction
    ``eps_hat = eps_u + s (eps_c - eps_u)``.

    ``prior_or_model`` is an exported ``Prior`` (whose ``eps(x, t, labels, s)`` applies the guidance
    itself) or a raw ``model_fn(x, t, labels) -> eps`` such as ``EpsNetwork`` (guided here with
    ``lcss_prior.guidance.classifier_free_guidance``; ``labels=None`` is its NULL class).
    ``class_labels=None`` means unconditional, and is the only choice for an unconditional prior
    or network (``null_class is None``): labels given to one raise a ``ValueError`` rather than
    being ignored. ``sde`` defaults to ``prior_or_model.sde``.
    """
    from lcss_prior.guidance import classifier_free_guidance
    from lcss_prior.model import get_score_fn

    sde = getattr(prior_or_model, "sde", None) if sde is None else sde
    if sde is None:
        raise ValueError("guided_score_fn needs an sde: the model has none attached")
    if class_labels is not None and _is_unconditional(prior_or_model):
        raise ValueError(
            "class_labels given for an unconditional prior (null_class is None); pass class_labels=None"
        )
    if hasattr(prior_or_model, "eps"):

        def eps_fn(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
            return prior_or_model.eps(x, t, labels, guidance_scale)

    else:

        def eps_fn(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
            if labels is None or guidance_scale == 1.0:
                return prior_or_model(x, t, labels)
            return classifier_free_guidance(
                prior_or_model(x, t, labels), prior_or_model(x, t, None), guidance_scale
            )

    model_score = get_score_fn(sde, eps_fn)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        if class_labels is not None and class_labels.shape[0] != x.shape[0]:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries but x has batch {x.shape[0]}")
        labels = None if class_labels is None else class_labels.to(x.device)
        return model_score(x, t, labels)

    return score_fn


def _is_unconditional(prior_or_model: Any) -> bool:
    """Whether a ``Prior`` / ``EpsNetwork`` has no class embedding (``null_class is None``); a
    plain ``model_fn`` without a ``null_class`` attribute counts as conditional."""
    return hasattr(prior_or_model, "null_class") and prior_or_model.null_class is None


def resolve_class_labels(prior: Any, captions_or_labels: Any, n: int) -> Tensor | None:
    """Turn captions (``"a red cube"``), integer labels, a single one of either (repeated), or
    ``None`` (unconditional) into ``n`` class labels ``[n]`` for ``prior``.

    A list must have ``n`` entries or one. Unknown captions (``Prior.caption_to_label``) and
    out-of-range labels raise an error that lists the prior's captions; any caption or label
    given to an unconditional prior (``null_class is None``) is an error.
    """
    if captions_or_labels is None:
        return None
    if _is_unconditional(prior):
        raise ValueError(
            f"this prior is unconditional (null_class is None): it takes no captions or labels, "
            f"got {captions_or_labels!r}"
        )
    items = captions_or_labels
    if isinstance(items, Tensor):
        items = items.tolist()
    if isinstance(items, (str, int)):
        items = [items]
    items = list(items)
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"got {len(items)} captions/labels for n={n} samples; give one or exactly n")
    n_classes = len(prior.captions)
    labels = []
    for item in items:
        if isinstance(item, str):
            labels.append(prior.caption_to_label(item))
        elif not 0 <= int(item) < n_classes:
            listing = "\n".join(f"  {i}: {c}" for i, c in enumerate(prior.captions))
            raise ValueError(f"label {item!r} out of range [0, {n_classes}); this prior knows:\n{listing}")
        else:
            labels.append(int(item))
    return torch.tensor(labels, dtype=torch.long)


def sample_prior(
    prior: Any,
    captions_or_labels: Any,
    n: int,
    guidance_scale: float = 1.0,
    method: str = "pc",
    steps: int = 500,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    denoise: bool = True,
    **method_kwargs: Any,
) -> Float[Tensor, "N C H W"]:
    """``n`` images in ``[-1, 1]`` from an exported prior (``lcss_prior.export.load_prior``),
    conditioned on captions/labels (see ``resolve_class_labels``) with guidance scale
    ``guidance_scale``; deterministic given ``seed``. ``batch_size`` bounds memory."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    labels = resolve_class_labels(prior, captions_or_labels, n)
    batch_size = n if batch_size is None else int(batch_size)
    device = next(iter(prior.parameters()), torch.empty(0)).device if hasattr(prior, "parameters") else None
    generator = torch.Generator(device=device or "cpu").manual_seed(int(seed))
    resolution = prior.resolution
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="batches", disable=not progress or n <= batch_size):
        b = min(batch_size, n - start)
        batch_labels = None if labels is None else labels[start : start + b]
        score_fn = guided_score_fn(prior, batch_labels, guidance_scale)
        x = sample(
            prior.sde,
            score_fn,
            (b, int(prior.channels), height, width),
            method=method,
            steps=steps,
            generator=generator,
            progress=progress,
            denoise=denoise,
            device=device,
            **method_kwargs,
        )
        out.append(x.clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def save_grid(images: Float[Tensor, "N C H W"], path: str | Path, nrow: int = 8) -> Path:
    """Save images in ``[-1, 1]`` as one PNG grid with ``nrow`` images per row."""
    from torchvision.utils import save_image

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0), path, nrow=nrow, padding=2)
    return path


# --------------------------------------------------------------------------------------------------
# CLI: lcss-prior sample
# --------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``lcss-prior sample``."""
    parser.add_argument("--prior", required=True, help="exported prior folder (lcss_prior.export)")
    parser.add_argument(
        "--caption", action="append", default=None, help="caption to condition on; repeat for several"
    )
    parser.add_argument("--label", type=int, action="append", default=None, help="class label (alternative)")
    parser.add_argument("--n", type=int, default=16, help="number of samples")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="s in eps_u + s (eps_c - eps_u)")
    parser.add_argument("--method", default="pc", help=f"sampler: one of {sorted(SAMPLERS)}")
    parser.add_argument("--steps", type=int, default=500, help="number of time steps")
    parser.add_argument("--solver", default=None, help="ODE solver for --method ode: euler|heun|rk4|rk45")
    parser.add_argument("--snr", type=float, default=None, help="Langevin signal-to-noise ratio (pc)")
    parser.add_argument("--no-denoise", action="store_true", help="skip the final Tweedie denoising step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default sqrt(n))")
    parser.add_argument("--out", default="grid.png", help="output PNG grid")
    parser.add_argument("--device", default="cpu")
    return parser


def cli_error(command: str, error: Exception) -> NoReturn:
    """Print ``lcss-prior <command>: error: <message>`` to stderr and exit with status 2 (the
    convention of ``lcss_prior.cli``), for user errors (bad caption, path, method, ...)."""
    message = error.args[0] if len(error.args) == 1 else str(error)
    print(f"lcss-prior {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from error


def cli_main(args: argparse.Namespace) -> Path:
    """Run ``lcss-prior sample``: load the prior, sample, write the PNG grid. User errors (unknown
    caption or method, missing prior, ...) exit with status 2 and a message (``cli_error``)."""
    try:
        return _sample_command(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        cli_error("sample", e)


def _sample_command(args: argparse.Namespace) -> Path:
    from lcss_prior.export import load_prior

    get_sampler(args.method)
    if args.caption and args.label:
        raise ValueError("give --caption or --label, not both")
    conditions = args.caption or args.label
    if conditions is not None and len(conditions) > 1 and len(conditions) != args.n:
        # several captions: spread them evenly over the n samples
        conditions = [conditions[i % len(conditions)] for i in range(args.n)]
    method_kwargs = {}
    if args.solver is not None:
        method_kwargs["solver"] = args.solver
    if args.snr is not None:
        method_kwargs["snr"] = args.snr
    prior = load_prior(args.prior, device=args.device)
    images = sample_prior(
        prior,
        conditions,
        args.n,
        guidance_scale=args.guidance_scale,
        method=args.method,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        denoise=not args.no_denoise,
        **method_kwargs,
    )
    nrow = args.nrow or max(1, int(math.ceil(math.sqrt(args.n))))
    path = save_grid(images, args.out, nrow=nrow)
    print(f"wrote {len(images)} samples to {path}")
    return path
