"""Procedural ``shapes``: coloured primitives rendered by sphere tracing analytic SDFs.

The data set trains the CPU prior and the CPU depth model, and it is the 3-D ground truth of the
benchmarks: the object is known exactly, so depth, mask and normals are exact, not estimated.

Cameras follow threestudio's ``random-camera-datamodule`` (``threestudio/data/uncond.py``) without
its random perturbations: elevation and azimuth in degrees, camera position
``d * (cos(el) cos(az), cos(el) sin(az), sin(el))``, looking at the origin, world up ``+z``, an
OpenGL camera (looks along ``-z`` of its frame, ``+y`` up), ``c2w`` columns right, up, back,
position. Ray directions go through pixel centres with focal length ``0.5 * H / tan(fovy / 2)``
for both axes and camera-frame direction ``((u + 0.5 - W/2) / f, -(v + 0.5 - H/2) / f, -1)``, normalised
(threestudio's ``get_ray_directions`` + ``get_rays(normalize=True)``), so a threestudio render and
ours of the same camera align pixel for pixel. ``depth`` is the distance along the unit ray.

Every object is centred at the origin and lies inside a sphere of radius ``BOUNDING_RADIUS``
(0.45, well inside threestudio's default bounding box of radius 1). A camera at distance ``d``
sees that sphere under the half-angle ``asin(R / d)``; the whole object is in the picture when
``asin(R / d) < fovy / 2``. The default ranges (distance >= 1.5, fovy >= 40) give at most
17.5 degrees against 20: the object never touches the image border.

Shading is Lambertian plus ambient under one light fixed in the world, so the colour of a surface
point does not depend on the camera: the scene is a view-independent radiance field, exactly what
a NeRF can represent.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "AMBIENT",
    "BOUNDING_RADIUS",
    "CAPTIONS",
    "COLORS",
    "LIGHT_DIRECTION",
    "SHAPES",
    "SHAPE_DIMENSIONS",
    "ShapesDataset",
    "camera_c2w",
    "camera_rays",
    "make_captions",
    "parse_caption",
    "render_scene",
    "shape_sdf",
]

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

#: Albedo of each colour word (linear RGB in [0, 1]).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.13, 0.65, 0.18),
    "blue": (0.12, 0.28, 0.85),
    "yellow": (0.92, 0.80, 0.12),
}

#: Radius of a sphere centred at the origin that contains every shape.
BOUNDING_RADIUS: float = 0.45

#: Dimensions of each shape in scene units (read-only; the SDFs below use exactly these). Every
#: shape is centred at the origin with its axis along ``+z``; each shape's bounding radius is given
#: beside it, all <= BOUNDING_RADIUS. The cone's base disc lies at ``z = base_z``, its apex at
#: ``z = apex_z``.
SHAPE_DIMENSIONS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "sphere": MappingProxyType({"radius": 0.40}),  # 0.40
        "cube": MappingProxyType({"half_size": 0.25}),  # 0.25 * sqrt(3) = 0.433
        "cylinder": MappingProxyType({"radius": 0.30, "half_height": 0.30}),  # 0.424
        "cone": MappingProxyType({"base_radius": 0.35, "base_z": -0.25, "apex_z": 0.40}),  # max(0.430, 0.40)
        "torus": MappingProxyType({"major_radius": 0.30, "minor_radius": 0.14}),  # 0.44
    }
)
_SPHERE_RADIUS = SHAPE_DIMENSIONS["sphere"]["radius"]
_CUBE_HALF = SHAPE_DIMENSIONS["cube"]["half_size"]
_CYLINDER_RADIUS, _CYLINDER_HALF_HEIGHT = (SHAPE_DIMENSIONS["cylinder"][k] for k in ("radius", "half_height"))
_CONE_BASE_RADIUS, _CONE_BASE_Z, _CONE_APEX_Z = (
    SHAPE_DIMENSIONS["cone"][k] for k in ("base_radius", "base_z", "apex_z")
)
_TORUS_MAJOR, _TORUS_MINOR = (SHAPE_DIMENSIONS["torus"][k] for k in ("major_radius", "minor_radius"))


def make_captions(shapes: Sequence[str], colors: Sequence[str]) -> list[str]:
    """Captions ``"a <color> <shape>"`` in a fixed order: shapes outer, colours inner."""
    return [f"a {color} {shape}" for shape in shapes for color in colors]


#: Light direction (unit, world space, pointing from the surface towards the light).
LIGHT_DIRECTION: tuple[float, float, float] = tuple(
    (torch.tensor([0.4, 0.3, 1.0]) / torch.tensor([0.4, 0.3, 1.0]).norm()).tolist()
)
#: Ambient share of the shading: ``rgb = albedo * (AMBIENT + (1 - AMBIENT) * max(n . l, 0))``.
AMBIENT: float = 0.35


# --------------------------------------------------------------------------------------------
# Signed distance functions (exact Euclidean distances, so sphere tracing never overshoots)
# --------------------------------------------------------------------------------------------


def _sdf_sphere(p: Float[Tensor, "N 3"]) -> Float[Tensor, " N"]:
    return p.norm(dim=-1) - _SPHERE_RADIUS


def _sdf_cube(p: Float[Tensor, "N 3"]) -> Float[Tensor, " N"]:
    # q_i = |p_i| - b: outside distance |max(q, 0)|, inside distance max_i q_i (negative).
    q = p.abs() - _CUBE_HALF
    return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)


def _sdf_cylinder(p: Float[Tensor, "N 3"]) -> Float[Tensor, " N"]:
    # In the (rho, z) half-plane the cylinder is the rectangle |rho| <= r, |z| <= h: the 2-D box
    # distance of (rho - r, |z| - h), as for the cube.
    d = torch.stack([p[:, :2].norm(dim=-1) - _CYLINDER_RADIUS, p[:, 2].abs() - _CYLINDER_HALF_HEIGHT], dim=-1)
    return d.clamp(min=0).norm(dim=-1) + d.amax(dim=-1).clamp(max=0)


def _sdf_cone(p: Float[Tensor, "N 3"]) -> Float[Tensor, " N"]:
    # In the (rho, z) half-plane (z measured from the base) the cone is the triangle
    # A = (0, 0), B = (R, 0), C = (0, H). The surface is the base edge AB and the slant edge BC
    # (the axis AC is inside the solid): |f| is the distance to the nearer edge; the point is
    # inside when it lies left of both edges (counter-clockwise order).
    radius, height = _CONE_BASE_RADIUS, _CONE_APEX_Z - _CONE_BASE_Z
    rho, z = p[:, :2].norm(dim=-1), p[:, 2] - _CONE_BASE_Z
    d_base2 = (rho - rho.clamp(max=radius)).square() + z.square()
    ex, ey = -radius, height  # edge B -> C
    wx, wy = rho - radius, z  # point relative to B
    s = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    d_slant2 = (wx - s * ex).square() + (wy - s * ey).square()
    d = torch.minimum(d_base2, d_slant2).sqrt()
    inside = (z >= 0) & (ex * wy - ey * wx >= 0)
    return torch.where(inside, -d, d)


def _sdf_torus(p: Float[Tensor, "N 3"]) -> Float[Tensor, " N"]:
    ring = torch.stack([p[:, :2].norm(dim=-1) - _TORUS_MAJOR, p[:, 2]], dim=-1)
    return ring.norm(dim=-1) - _TORUS_MINOR


_SDFS: dict[str, Callable[[Tensor], Tensor]] = {
    "sphere": _sdf_sphere,
    "cube": _sdf_cube,
    "cylinder": _sdf_cylinder,
    "cone": _sdf_cone,
    "torus": _sdf_torus,
}

#: Shape words, in caption order.
SHAPES: tuple[str, ...] = tuple(_SDFS)
#: Every caption of the default vocabulary; a label is an index into this list.
CAPTIONS: list[str] = make_captions(SHAPES, tuple(COLORS))


def _check_word(kind: str, word: str, valid: Sequence[str]) -> None:
    if word not in valid:
        raise ValueError(f"unknown {kind} {word!r}; valid {kind}s: {', '.join(valid)}")


def shape_sdf(shape: str, points: Float[Tensor, "... 3"]) -> Float[Tensor, "..."]:
    """Exact signed distance ``f(p)`` of the named shape (negative inside, zero on the surface).

    The surface is ``{p : f(p) = 0}`` and ``|grad f| = 1`` almost everywhere, so ``grad f`` is
    the outward unit normal. All shapes are centred at the origin, within ``BOUNDING_RADIUS``.
    """
    _check_word("shape", shape, SHAPES)
    flat = points.reshape(-1, 3)
    return _SDFS[shape](flat).reshape(points.shape[:-1])


def parse_caption(text: str) -> tuple[str, str]:
    """``"a red cube"`` -> ``("cube", "red")`` (shape, colour); case and spaces are normalised."""
    words = text.strip().lower().split()
    if len(words) == 3 and words[0] in ("a", "an") and words[1] in COLORS and words[2] in _SDFS:
        return words[2], words[1]
    raise ValueError(f"cannot parse caption {text!r}; valid captions: {', '.join(CAPTIONS)}")


# --------------------------------------------------------------------------------------------
# Cameras (threestudio's random-camera-datamodule conventions)
# --------------------------------------------------------------------------------------------


def camera_c2w(
    elevation_deg: Float[Tensor, "..."] | float,
    azimuth_deg: Float[Tensor, "..."] | float,
    distance: Float[Tensor, "..."] | float,
) -> Float[Tensor, "... 4 4"]:
    """Camera-to-world matrix of a camera at spherical coordinates, looking at the origin.

    Position ``c = d (cos el cos az, cos el sin az, sin el)``; ``forward = -c / |c|``,
    ``right = forward x up`` normalised (world ``up = +z``), ``up' = right x forward``;
    ``c2w = [[right, up', -forward, c], [0, 0, 0, 1]]`` (columns). Equal to threestudio's
    construction without perturbations. ``right = (-sin az, cos az, 0)`` in closed form, which is
    also defined at the poles (|el| = 90), where threestudio's cross product degenerates.
    Arguments broadcast against each other; the result has their broadcast shape + ``[4, 4]``.
    """
    el, az, d = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=torch.float32) for v in (elevation_deg, azimuth_deg, distance))
    )
    el, az = torch.deg2rad(el), torch.deg2rad(az)
    position = torch.stack(
        [d * torch.cos(el) * torch.cos(az), d * torch.cos(el) * torch.sin(az), d * torch.sin(el)],
        dim=-1,
    )
    back = torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=-1)
    right = torch.stack([-torch.sin(az), torch.cos(az), torch.zeros_like(az)], dim=-1)
    up = torch.linalg.cross(back, right)  # = right x forward
    c2w = torch.zeros(*el.shape, 4, 4, device=el.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, up, back
    c2w[..., :3, 3] = position
    c2w[..., 3, 3] = 1.0
    return c2w


def camera_rays(
    c2w: Float[Tensor, "... 4 4"],
    fovy_deg: Float[Tensor, "..."] | float,
    height: int,
    width: int,
) -> tuple[Float[Tensor, "... H W 3"], Float[Tensor, "... H W 3"]]:
    """World-space ray origins and unit directions through the pixel centres.

    Pixel ``(v, u)`` (row, column) has camera-frame direction
    ``((u + 0.5 - W/2) / f, -(v + 0.5 - H/2) / f, -1)`` with ``f = 0.5 H / tan(fovy / 2)``
    (so row 0 is the top of the image, ``+y`` up), rotated by ``c2w[:3, :3]`` and normalised.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    if c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must have shape [..., 4, 4], got {tuple(c2w.shape)}")
    batch, device = c2w.shape[:-2], c2w.device
    fovy = torch.deg2rad(torch.as_tensor(fovy_deg, dtype=torch.float32, device=device)).expand(batch)
    focal = 0.5 * height / torch.tan(0.5 * fovy)  # [...]
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device) + 0.5,
        torch.arange(width, dtype=torch.float32, device=device) + 0.5,
        indexing="ij",
    )
    f = focal[..., None, None]
    dirs_cam = torch.stack(
        torch.broadcast_tensors((u - width / 2) / f, -(v - height / 2) / f, -torch.ones_like(f)),
        dim=-1,
    )  # [..., H, W, 3]
    rot = c2w[..., None, None, :3, :3]
    # elementwise product and sum (not a batched matmul): the same floats for any batch size
    rays_d = F.normalize((rot * dirs_cam[..., None, :]).sum(-1), dim=-1)
    rays_o = c2w[..., None, None, :3, 3].expand(rays_d.shape)
    return rays_o, rays_d


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_HIT_EPS = 1e-5  # a ray has hit when the SDF at its point is below this (scene units)
_MISS_EPS = 1e-3  # rays still this close after the last step are hits if they enter the surface
_MAX_STEPS = 128


def _sphere_trace(
    shape: str, rays_o: Float[Tensor, "N 3"], rays_d: Float[Tensor, "N 3"]
) -> tuple[Float[Tensor, " N"], Bool[Tensor, " N"]]:
    """Distance ``t`` to the first surface point ``o + t d`` and a hit flag, by sphere tracing.

    Starts where the ray enters the bounding sphere and steps ``t <- t + f(o + t d)``; with an
    exact SDF a step never crosses the surface. Only unfinished rays are evaluated.
    """
    sdf = _SDFS[shape]
    radius = BOUNDING_RADIUS + 1e-3
    b = (rays_o * rays_d).sum(-1)
    c = rays_o.square().sum(-1) - radius**2
    disc = b * b - c
    hit = torch.zeros_like(b, dtype=torch.bool)
    t = torch.zeros_like(b)
    active = torch.nonzero(disc > 0).squeeze(-1)
    root = disc[active].sqrt()
    t_cur = (-b[active] - root).clamp(min=0.0)
    t_far = -b[active] + root
    o, d = rays_o[active], rays_d[active]
    for _ in range(_MAX_STEPS):
        if active.numel() == 0:
            break
        dist = sdf(o + t_cur[:, None] * d)
        done = dist < _HIT_EPS
        hit[active[done]] = True
        t[active[done]] = t_cur[done]
        t_cur = t_cur + dist
        keep = ~done & (t_cur < t_far)
        active, t_cur, t_far, o, d = active[keep], t_cur[keep], t_far[keep], o[keep], d[keep]
    if active.numel() > 0:  # grazing rays that ran out of steps
        close = sdf(o + t_cur[:, None] * d) < _MISS_EPS
        hit[active[close]] = True
        t[active[close]] = t_cur[close]
    return t, hit


def _sdf_normals(shape: str, points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
    """Outward unit normals ``grad f / |grad f|`` by automatic differentiation of the SDF."""
    with torch.enable_grad():
        p = points.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_SDFS[shape](p).sum(), p)
    return F.normalize(grad, dim=-1)


def _render_rays(
    shape: str, albedo: Tensor, rays_o: Tensor, rays_d: Tensor, background: Tensor
) -> dict[str, Tensor]:
    t, hit = _sphere_trace(shape, rays_o, rays_d)
    normal = torch.zeros_like(rays_d)
    idx = torch.nonzero(hit).squeeze(-1)
    n = _sdf_normals(shape, rays_o[idx] + t[idx, None] * rays_d[idx])
    # A hit is a point near the surface where the ray enters it (n . d <= 0); a ray that only
    # grazes the surface and leaves it again (n . d > 0 at its closest approach) is a miss.
    entering = (n * rays_d[idx]).sum(-1) <= 0
    hit[idx[~entering]] = False
    normal[idx[entering]] = n[entering]
    light = torch.tensor(LIGHT_DIRECTION, device=rays_d.device)
    lambert = (normal @ light).clamp(min=0.0)
    shaded = albedo * (AMBIENT + (1.0 - AMBIENT) * lambert[:, None])
    rgb = torch.where(hit[:, None], shaded, background)
    return {"rgb": rgb, "depth": torch.where(hit, t, 0.0), "mask": hit, "normal": normal}


@torch.no_grad()
def render_scene(
    shape: str,
    color: str,
    c2w: Float[Tensor, "... 4 4"],
    fovy_deg: Float[Tensor, "..."] | float,
    resolution: int | tuple[int, int],
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    supersample: int = 1,
) -> dict[str, Tensor]:
    """Render one coloured primitive from one camera (or a batch of cameras ``[..., 4, 4]``).

    Returns ``rgb [..., H, W, 3]`` in [0, 1], ``depth [..., H, W]`` (distance along the unit ray,
    0 outside), ``mask [..., H, W]`` (bool) and ``normal [..., H, W, 3]`` (world-space unit
    normals, 0 outside). ``rgb = albedo * (AMBIENT + (1 - AMBIENT) max(n . l, 0))`` on the object,
    ``background`` elsewhere. With ``supersample = s > 1`` the colour is the mean of an ``s x s``
    grid of sub-pixel rays (anti-aliasing); depth, mask and normal always come from the pixel-centre
    ray, so they align with threestudio's rays exactly. Runs on ``c2w``'s device.
    """
    _check_word("shape", shape, SHAPES)
    _check_word("colour", color, tuple(COLORS))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    height, width = resolution
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    albedo = torch.tensor(COLORS[color], device=c2w.device)
    bg = torch.as_tensor(background, dtype=torch.float32, device=c2w.device)
    if bg.shape != (3,):
        raise ValueError(f"background must be 3 numbers (RGB), got {background!r}")
    batch = c2w.shape[:-2]

    rays_o, rays_d = camera_rays(c2w, fovy_deg, height, width)
    out = _render_rays(shape, albedo, rays_o.reshape(-1, 3), rays_d.reshape(-1, 3), bg)
    out = {
        "rgb": out["rgb"].reshape(*batch, height, width, 3),
        "depth": out["depth"].reshape(*batch, height, width),
        "mask": out["mask"].reshape(*batch, height, width),
        "normal": out["normal"].reshape(*batch, height, width, 3),
    }
    if supersample > 1:
        # An s-times larger image with the same fovy has its pixel centres exactly on the s x s
        # sub-pixel grid of each original pixel; average-pooling it is box-filtered supersampling.
        s = supersample
        so, sd = camera_rays(c2w, fovy_deg, s * height, s * width)
        fine = _render_rays(shape, albedo, so.reshape(-1, 3), sd.reshape(-1, 3), bg)["rgb"]
        fine = fine.reshape(-1, s * height, s * width, 3).permute(0, 3, 1, 2)
        rgb = F.avg_pool2d(fine, kernel_size=s).permute(0, 2, 3, 1)
        out["rgb"] = rgb.reshape(*batch, height, width, 3)
    return out


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------

_SPLITS = ("train", "test")
_GEOMETRY_KEYS = ("depth", "mask", "normal")
_CACHE_FORMAT = "lcss-shapes-cache"
_RENDERER_VERSION = 1  # bump when renders change, so that old cache files are refused


def _item_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A generator that depends only on ``(seed, split, index)`` (NumPy SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, _SPLITS.index(split), index]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _uniform(lo_hi: tuple[float, float], g: torch.Generator) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _from_levels(levels: Tensor) -> Tensor:
    """8-bit levels ``round(255 rgb)`` (uint8 or float) to the data range: ``levels / 127.5 - 1``."""
    return levels.float() / 127.5 - 1.0


class ShapesDataset(Dataset):
    """Multi-view renders of coloured primitives with captions and exact geometry.

    Item ``i`` depends only on ``(seed, split, i)``: its caption is ``captions[i % n]`` (every
    block of ``n = len(captions)`` consecutive items holds each caption once) and its camera is
    drawn from its own generator, uniformly in degrees / scene units within the given ranges.
    The image is the render quantised to 8 bits, ``image = 2 * round(255 rgb) / 255 - 1``
    (``n_levels = 256``), shape ``[3, H, W]``.

    Item keys: ``image, label, caption, c2w [4, 4], elevation, azimuth, distance, fovy`` and, with
    ``return_geometry``, ``depth [H, W]``, ``mask [H, W]`` (bool), ``normal [H, W, 3]``.

    ``cache``: ``None`` renders on every access; ``"memory"`` keeps each rendered item (per
    process: each DataLoader worker has its own copy); a file path renders all items once (tqdm),
    saves them with ``torch.save`` and reads them back on the next construction with the same
    settings (a file made with other settings is refused, naming the differing settings).
    """

    channels = 3
    n_levels = 256

    def __init__(
        self,
        size: int = 10000,
        resolution: int = 64,
        seed: int = 0,
        split: str = "train",
        elevation_range: tuple[float, float] = (-10.0, 60.0),
        azimuth_range: tuple[float, float] = (-180.0, 180.0),
        distance_range: tuple[float, float] = (1.5, 2.0),
        fovy_range: tuple[float, float] = (40.0, 70.0),
        shapes: Sequence[str] | None = None,
        colors: Sequence[str] | None = None,
        return_geometry: bool = True,
        supersample: int = 2,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        cache: str | Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(_SPLITS)}")
        for name, rng in (
            ("elevation_range", elevation_range),
            ("azimuth_range", azimuth_range),
            ("distance_range", distance_range),
            ("fovy_range", fovy_range),
        ):
            if len(rng) != 2 or rng[0] > rng[1]:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {rng!r}")
        if distance_range[0] <= BOUNDING_RADIUS:
            raise ValueError(
                f"distance_range {distance_range!r} puts the camera inside the object's bounding "
                f"sphere (radius {BOUNDING_RADIUS})"
            )
        if not (0 < fovy_range[0] and fovy_range[1] < 180):
            raise ValueError(f"fovy_range must lie in (0, 180) degrees, got {fovy_range!r}")
        half_angle = math.degrees(math.asin(BOUNDING_RADIUS / distance_range[0]))
        if half_angle >= fovy_range[0] / 2:
            warnings.warn(
                f"with distance {distance_range[0]} and fovy {fovy_range[0]} the object "
                f"(bounding radius {BOUNDING_RADIUS}, half-angle {half_angle:.1f} deg) can leave "
                "the picture",
                stacklevel=2,
            )
        shapes = tuple(SHAPES if shapes is None else shapes)
        colors = tuple(COLORS if colors is None else colors)
        if not shapes or not colors:
            raise ValueError("shapes and colors must not be empty")
        for s in shapes:
            _check_word("shape", s, SHAPES)
        for c in colors:
            _check_word("colour", c, tuple(COLORS))

        self.size = int(size)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.split = split
        self.elevation_range = tuple(map(float, elevation_range))
        self.azimuth_range = tuple(map(float, azimuth_range))
        self.distance_range = tuple(map(float, distance_range))
        self.fovy_range = tuple(map(float, fovy_range))
        self.shapes = shapes
        self.colors = colors
        self.captions = make_captions(shapes, colors)
        self.return_geometry = bool(return_geometry)
        self.supersample = int(supersample)
        self.background = tuple(map(float, background))

        self._memory: dict[int, dict] | None = None
        self._stored: dict[str, Tensor] | None = None
        if cache == "memory":
            self._memory = {}
        elif cache is not None:
            self._stored = self._load_or_render(Path(cache))

    # -- settings and caching -------------------------------------------------------------

    def settings(self) -> dict:
        """Everything that determines the items (stored in cache files and compared on load)."""
        return {
            "size": self.size,
            "resolution": self.resolution,
            "seed": self.seed,
            "split": self.split,
            "elevation_range": list(self.elevation_range),
            "azimuth_range": list(self.azimuth_range),
            "distance_range": list(self.distance_range),
            "fovy_range": list(self.fovy_range),
            "shapes": list(self.shapes),
            "colors": list(self.colors),
            "return_geometry": self.return_geometry,
            "supersample": self.supersample,
            "background": list(self.background),
            "renderer_version": _RENDERER_VERSION,
        }

    def _load_or_render(self, path: Path) -> dict[str, Tensor]:
        settings = self.settings()
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
                raise ValueError(f"shapes cache file {path} is unreadable: {err}") from err
            if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
                raise ValueError(f"{path} is not a shapes cache file (format {_CACHE_FORMAT!r})")
            stored = json.loads(blob["settings"])
            diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            if diff:
                details = "; ".join(f"{k}: file {stored.get(k)!r}, asked {settings.get(k)!r}" for k in diff)
                raise ValueError(
                    f"shapes cache file {path} was rendered with other settings ({details}); "
                    "delete it or choose another cache path"
                )
            return blob["items"]
        rendered = self._render_stacked(desc=f"rendering shapes -> {path.name}")
        stacked = {key: rendered[key] for key in self._stored_keys()}
        stacked["image"] = torch.round((stacked["image"] + 1) * 127.5).to(torch.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"format": _CACHE_FORMAT, "settings": json.dumps(settings, sort_keys=True), "items": stacked}
        # a temporary name of our own (two runs or ranks sharing a cache must not write one file),
        # then an atomic rename: readers see no file or a complete one; the renders are
        # deterministic, so when two writers race the second rename replaces identical content
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return stacked

    def _geometry_keys(self) -> tuple[str, ...]:
        return _GEOMETRY_KEYS if self.return_geometry else ()

    def _stored_keys(self) -> tuple[str, ...]:
        """The tensors a cache file holds per item (labels follow from the index)."""
        return ("image", "c2w", "elevation", "azimuth", "distance", "fovy", *self._geometry_keys())

    def _render_stacked(self, desc: str, progress: bool = True) -> dict[str, Tensor]:
        """All items rendered by ``render_items`` in chunks of 16 cameras per caption, stacked."""
        chunk = 16 * len(self.captions)  # 16 cameras per render_scene call
        items = []
        for start in tqdm(
            range(0, self.size, chunk), desc=desc, unit="chunk", leave=False, disable=not progress
        ):
            items += self.render_items(range(start, min(start + chunk, self.size)))
        stacked = {key: torch.stack([it[key] for it in items]) for key in self._stored_keys()}
        stacked["label"] = torch.tensor([it["label"] for it in items])
        return stacked

    def stacked(self, progress: bool = True) -> dict[str, Tensor]:
        """All ``size`` items as one batch, equal to ``default_collate([self[i] for i in range(size)])``
        without the caption strings: ``image [N, 3, H, W]`` in ``[-1, 1]``, ``label [N]``, ``c2w [N, 4, 4]``,
        ``elevation``, ``azimuth``, ``distance``, ``fovy [N]`` and, with ``return_geometry``, ``depth``,
        ``mask``, ``normal``. Read from the cache file when there is one; otherwise rendered in batched
        ``render_items`` calls (tqdm bar unless ``progress=False``).
        """
        if self._stored is None:
            return self._render_stacked(desc="rendering shapes", progress=progress)
        out = {key: self._stored[key] for key in self._stored_keys()}
        out["image"] = _from_levels(out["image"])
        out["label"] = self.labels
        return out

    # -- items ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.size

    @property
    def labels(self) -> torch.Tensor:
        """Every item's caption id (``index % len(captions)``), without rendering anything."""
        return torch.arange(self.size) % len(self.captions)

    def camera(self, index: int) -> dict[str, Tensor]:
        """The camera of item ``index``: ``c2w``, ``elevation``, ``azimuth``, ``distance``, ``fovy``."""
        g = _item_generator(self.seed, self.split, index)
        el = _uniform(self.elevation_range, g)
        az = _uniform(self.azimuth_range, g)
        dist = _uniform(self.distance_range, g)
        fovy = _uniform(self.fovy_range, g)
        return {
            "c2w": camera_c2w(el, az, dist),
            "elevation": torch.tensor(el, dtype=torch.float32),
            "azimuth": torch.tensor(az, dtype=torch.float32),
            "distance": torch.tensor(dist, dtype=torch.float32),
            "fovy": torch.tensor(fovy, dtype=torch.float32),
        }

    def render_items(self, indices: Sequence[int]) -> list[dict]:
        """Items ``indices``, rendered with one batched ``render_scene`` call per caption.

        Bit-identical to ``[self[i] for i in indices]`` without a cache, and several times faster
        for many items (sphere tracing's per-step overhead is shared by the cameras of a batch).
        """
        items: dict[int, dict] = {}
        by_label: dict[int, list[int]] = {}
        indices = [int(index) for index in indices]
        for index in indices:
            if not 0 <= index < self.size:
                raise IndexError(f"index {index} out of range for a ShapesDataset of size {self.size}")
            by_label.setdefault(index % len(self.captions), []).append(index)
        for label, group in by_label.items():
            shape, color = parse_caption(self.captions[label])
            cams = [self.camera(index) for index in group]
            out = render_scene(
                shape,
                color,
                torch.stack([cam["c2w"] for cam in cams]),
                torch.stack([cam["fovy"] for cam in cams]),
                self.resolution,
                background=self.background,
                supersample=self.supersample,
            )
            rgb8 = torch.round(out["rgb"].clamp(0, 1) * 255)
            for row, (index, cam) in enumerate(zip(group, cams)):
                item = {
                    "image": _from_levels(rgb8[row].permute(2, 0, 1)).contiguous(),
                    "label": label,
                    "caption": self.captions[label],
                    **cam,
                }
                for key in self._geometry_keys():
                    item[key] = out[key][row].clone()
                items[index] = item
        return [items[index] for index in indices]

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a ShapesDataset of size {self.size}")
        index = index % self.size
        if self._stored is not None:
            label = index % len(self.captions)
            item = {
                "image": _from_levels(self._stored["image"][index]),
                "label": label,
                "caption": self.captions[label],
            }
            for key in self._stored_keys():
                if key != "image":
                    item[key] = self._stored[key][index]
            return item
        if self._memory is not None:
            if index not in self._memory:
                self._memory[index] = self.render_items([index])[0]
            return dict(self._memory[index])
        return self.render_items([index])[0]
