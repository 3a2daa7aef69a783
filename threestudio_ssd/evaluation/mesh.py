"""Checks of exported meshes, and the Chamfer distance to a reference mesh.

threestudio exports meshes to ``<trial>/save/it{step}-export/`` (``model.obj`` with its ``.mtl``
and texture, or ``.ply``). ``mesh_stats`` reports vertex/face counts, watertightness, the number of
connected components, the bounding box, surface area and (for watertight meshes) volume. OBJ files
split vertices along texture seams; before the topological checks vertices are merged by position
(``merge_vertices(merge_tex=True, merge_norm=True)``), otherwise every seam would read as a hole.

Chamfer distance, the convention of pytorch3d's ``chamfer_distance`` (squared Euclidean distances,
mean over the points of each set, the two directions summed)::

    CD(A, B) = (1/|A|) sum_a min_b ||a - b||^2 + (1/|B|) sum_b min_a ||a - b||^2

between ``n_points`` points sampled uniformly by area on each surface (``trimesh.sample``, seeded).
Sampling puts a floor under it: for two samples of the SAME surface of area ``A`` the nearest of
``n`` uniform points lies at squared distance ``s^2`` with ``pi s^2 n / A ~ Exp(1)`` (planar
Poisson points), so each term has mean ``A / (pi n)`` and ``CD ~ (A_mesh + A_ref) / (pi n)``,
reported as ``sampling_floor`` (measured: within 2% of the Monte-Carlo value for a cube and a
sphere); differences below a few times the floor are not resolved, so raise ``n_points``.
Concentric spheres of radii ``r1``, ``r2``: the nearest point of the other sphere is the radial
projection, so both terms are ``(r1 - r2)^2`` and ``CD = 2 (r1 - r2)^2`` plus at most about the
floor. The unsquared variant (``chamfer_l2``: mean Euclidean distance, both directions summed,
``2 |r1 - r2|`` for the spheres) is reported beside it. The pure-torch implementation (``torch.cdist`` in chunks) is always there;
``backend="pytorch3d"`` uses pytorch3d when it is installed (optional: no Linux wheel on PyPI).

A reference is a mesh file or a ``shapes`` caption (``"a red cube"``): the true primitive built
with ``trimesh.creation`` at the dimensions of ``lcss_prior.data.shapes``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "MESH_EXTENSIONS",
    "chamfer_distance",
    "find_exported_meshes",
    "load_mesh",
    "mesh_chamfer",
    "mesh_stats",
    "reference_mesh",
    "sample_surface",
]

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb")
_EXPORT_DIR = re.compile(r"^it(\d+)-export$")


def load_mesh(path: str | os.PathLike) -> Any:
    """A ``trimesh.Trimesh`` from a mesh file (a multi-mesh scene is concatenated); errors name the
    file."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file {path} does not exist")
    if path.suffix.lower() not in MESH_EXTENSIONS:
        raise ValueError(f"{path}: unsupported mesh format {path.suffix!r}; use one of {MESH_EXTENSIONS}")
    try:
        mesh = trimesh.load(path, force="mesh", process=True)
    except Exception as err:  # noqa: BLE001 - any parser error gets the path
        raise ValueError(f"cannot read mesh {path}: {err}") from err
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{path} holds no triangle mesh (no faces)")
    return mesh


def mesh_stats(mesh: Any) -> dict[str, Any]:
    """Vertex/face counts (as stored), and after merging vertices by position: watertightness,
    connected components (by shared edges), Euler number, bounding box, area, volume (watertight
    meshes only, else ``None``)."""
    n_vertices, n_faces = len(mesh.vertices), len(mesh.faces)
    merged = mesh.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    watertight = bool(merged.is_watertight)
    components = merged.split(only_watertight=False)
    lo, hi = merged.bounds
    return {
        "n_vertices": int(n_vertices),
        "n_faces": int(n_faces),
        "n_vertices_merged": int(len(merged.vertices)),
        "watertight": watertight,
        "n_components": int(len(components)),
        "euler_number": int(merged.euler_number),
        "bbox_min": [float(v) for v in lo],
        "bbox_max": [float(v) for v in hi],
        "bbox_extent": [float(v) for v in hi - lo],
        "area": float(merged.area),
        "volume": float(merged.volume) if watertight else None,
    }


def reference_mesh(reference: str | os.PathLike, sections: int = 64) -> Any:
    """The reference mesh: a mesh file, or a ``shapes`` caption's true primitive (centred at the
    origin, axis ``+z``, sized by ``lcss_prior.data.shapes.SHAPE_DIMENSIONS``; round shapes with
    ``sections`` segments, the sphere an icosphere of 5 subdivisions)."""
    import trimesh

    from lcss_prior.data import shapes as S

    if Path(reference).suffix.lower() in MESH_EXTENSIONS or Path(reference).exists():
        return load_mesh(reference)
    try:
        shape, _ = S.parse_caption(str(reference))
    except ValueError as err:
        raise ValueError(
            f"reference {reference!r} is neither a mesh file nor a shapes caption: {err}"
        ) from err
    dims = S.SHAPE_DIMENSIONS[shape]
    create = trimesh.creation
    if shape == "sphere":
        return create.icosphere(subdivisions=5, radius=dims["radius"])
    if shape == "cube":
        return create.box(extents=[2 * dims["half_size"]] * 3)
    if shape == "cylinder":
        return create.cylinder(radius=dims["radius"], height=2 * dims["half_height"], sections=sections)
    if shape == "cone":
        cone = create.cone(
            radius=dims["base_radius"], height=dims["apex_z"] - dims["base_z"], sections=sections
        )
        cone.apply_translation([0.0, 0.0, dims["base_z"]])
        return cone
    if shape == "torus":
        return create.torus(
            major_radius=dims["major_radius"],
            minor_radius=dims["minor_radius"],
            major_sections=sections,
            minor_sections=sections,
        )
    raise ValueError(f"no reference mesh for shape {shape!r}")  # a new shape in shapes.py


def sample_surface(mesh: Any, n_points: int, seed: int = 0) -> Float[Tensor, "N 3"]:
    """``n_points`` points uniform by area on the surface (``trimesh.sample.sample_surface``)."""
    import trimesh

    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    points, _ = trimesh.sample.sample_surface(mesh, int(n_points), seed=int(seed))
    return torch.from_numpy(np.asarray(points, dtype=np.float64))


def _nearest_sq(a: Tensor, b: Tensor, chunk: int) -> Tensor:
    return torch.cat([torch.cdist(part, b).amin(dim=1) for part in a.split(chunk)]).square()


def chamfer_distance(
    a: Float[Tensor, "N 3"],
    b: Float[Tensor, "M 3"],
    backend: str = "torch",
    chunk: int = 2048,
) -> dict[str, float]:
    """Chamfer distance between two point sets: ``a_to_b = mean_a min_b ||a - b||^2``, ``b_to_a``
    likewise, ``chamfer = a_to_b + b_to_a`` (pytorch3d's convention) and ``chamfer_l2``, the same
    with unsquared distances. ``backend``: ``"torch"`` (``torch.cdist`` over chunks of ``chunk``
    rows, float64) or ``"pytorch3d"`` (``pytorch3d.loss.chamfer_distance``; ``chamfer`` only)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != 3 or b.shape[1] != 3 or not len(a) or not len(b):
        raise ValueError(
            f"point sets must be non-empty [N, 3] and [M, 3], got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if backend == "pytorch3d":
        try:
            from pytorch3d.loss import chamfer_distance as p3d_chamfer
        except ImportError as err:
            raise ImportError(
                "backend='pytorch3d' needs pytorch3d, which is not installed (it has no Linux wheel on "
                "PyPI; build it from source) - use backend='torch'"
            ) from err
        value, _ = p3d_chamfer(a[None].float(), b[None].float())
        return {"chamfer": float(value), "backend": "pytorch3d"}
    if backend != "torch":
        raise ValueError(f"unknown Chamfer backend {backend!r}; use 'torch' or 'pytorch3d'")
    a, b = a.double(), b.double()
    d_ab, d_ba = _nearest_sq(a, b, chunk), _nearest_sq(b, a, chunk)
    return {
        "chamfer": float(d_ab.mean() + d_ba.mean()),
        "a_to_b": float(d_ab.mean()),
        "b_to_a": float(d_ba.mean()),
        "chamfer_l2": float(d_ab.sqrt().mean() + d_ba.sqrt().mean()),
        "backend": "torch",
    }


def mesh_chamfer(
    mesh: Any, reference: Any, n_points: int = 10000, seed: int = 0, backend: str = "auto"
) -> dict[str, Any]:
    """``chamfer_distance`` between ``n_points`` surface samples of ``mesh`` and of ``reference``
    (seeds ``seed`` and ``seed + 1``), with ``sampling_floor = (A_mesh + A_ref) / (pi n_points)``,
    its expected value for two identical surfaces. ``backend="auto"`` is pytorch3d when installed,
    else torch."""
    if backend == "auto":
        try:
            import pytorch3d  # noqa: F401

            backend = "pytorch3d"
        except ImportError:
            backend = "torch"
    a, b = sample_surface(mesh, n_points, seed), sample_surface(reference, n_points, seed + 1)
    floor = (float(mesh.area) + float(reference.area)) / (math.pi * n_points)
    return {**chamfer_distance(a, b, backend=backend), "n_points": int(n_points), "sampling_floor": floor}


def find_exported_meshes(trial: str | os.PathLike, step: int | None = None) -> list[Path]:
    """Mesh files in the latest (or ``step``'s) ``save/it{step}-export/`` folder of a trial (empty
    when the run exported none)."""
    save = Path(trial) / "save"
    if not save.is_dir():
        return []
    steps = {int(m.group(1)): d for d in save.iterdir() if d.is_dir() and (m := _EXPORT_DIR.match(d.name))}
    if not steps:
        return []
    if step is None:
        step = max(steps)
    if step not in steps:
        raise FileNotFoundError(f"{save} has no it{step}-export folder; exported steps: {sorted(steps)}")
    return sorted(p for p in steps[step].rglob("*") if p.is_file() and p.suffix.lower() in MESH_EXTENSIONS)
