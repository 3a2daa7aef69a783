"""``stein-mesh-rasterizer``: mesh stages render depth, so SSD's geometric baselines run there.

* The plain-PyTorch rasterizer is perspective-correct: the surface point it interpolates for a
  pixel projects back onto that pixel's centre, and lies on the triangle's plane.
* A DMTet sphere (``tetrahedra-sdf-grid``, ``shape_init: sphere``) rendered by threestudio's
  ``nvdiff-rasterizer`` forward with this context: coverage and depth match the exact ray-sphere
  intersection, and ``RenderOutputs.from_threestudio`` decodes depth, opacity and normals.
* ``configs/steindreamer-cpu-shapes-mesh.yaml`` trains the geometry stage through
  ``python -m threestudio_ssd.launch`` with ``baselines: [constant, depth]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

from .conftest import run_python
from .tiny_models import DPT, PRIOR, SMALL_RENDERS, launch_args

pytestmark = pytest.mark.integration

CONFIG = "custom/threestudio-ssd/configs/steindreamer-cpu-shapes-mesh.yaml"
RADIUS = 0.5


def camera_batch(ts, size: int = 48, elevation: float = 20.0, distance: float = 1.75) -> dict:
    """One validation camera of the plugin's data module (threestudio's conventions)."""
    cfg = {
        "width": size,
        "height": size,
        "eval_width": size,
        "eval_height": size,
        "eval_camera_distance": distance,
        "eval_elevation_deg": elevation,
        "eval_fovy_deg": 50.0,
        "n_val_views": 1,
    }
    dm = ts.find("stein-random-camera-datamodule")(cfg)
    dm.setup("validate")
    return dm.val_dataset.collate([dm.val_dataset[0]])


def sphere_renderer(ts, threestudio_root: Path, monkeypatch, colour: bool):
    monkeypatch.chdir(threestudio_root)  # the tetrahedral grid is load/tets/32_tets.npz
    geometry = ts.find("tetrahedra-sdf-grid")(
        {
            "radius": 1.0,
            "isosurface_resolution": 32,
            "geometry_only": not colour,
            "shape_init": "sphere",
            "shape_init_params": RADIUS,
            "pos_encoding_config": {"otype": "ProgressiveBandFrequency", "n_frequencies": 2},
            "mlp_network_config": {
                "otype": "VanillaMLP",
                "activation": "ReLU",
                "output_activation": "none",
                "n_neurons": 8,
                "n_hidden_layers": 1,
            },
        }
    )
    geometry.initialize_shape()
    material = ts.find("no-material")({"n_output_dims": 3 if colour else 0, "color_activation": "sigmoid"})
    background = ts.find("solid-color-background")({"color": [1.0, 1.0, 1.0]})
    return ts.find("stein-mesh-rasterizer")(
        {"context_type": "torch"}, geometry=geometry, material=material, background=background
    )


def test_rasterizer_interpolates_perspective_correctly(threestudio_ts):
    from threestudio_ssd.threestudio.mesh_renderer import TorchRasterizerContext

    batch = camera_batch(threestudio_ts, size=32, elevation=35.0, distance=1.3)
    ctx = TorchRasterizerContext()
    # one large triangle, oblique to the view, with a strong depth range across it
    verts = torch.tensor([[0.4, -0.6, -0.4], [-0.5, 0.6, -0.2], [0.1, 0.0, 0.6]])  # the camera is on +x
    tri = torch.tensor([[0, 1, 2]])
    clip = ctx.vertex_transform(verts, batch["mvp_mtx"])
    rast, _ = ctx.rasterize(clip, tri, (32, 32))
    hit = rast[0, ..., 3] > 0
    assert 40 < int(hit.sum()) < 32 * 32
    surface, _ = ctx.interpolate_one(verts, rast, tri)
    # projected back, each covered pixel's surface point lands on that pixel's centre
    back = ctx.vertex_transform(surface[0][hit], batch["mvp_mtx"])[0]
    ndc = back[:, :2] / back[:, 3:]
    rows, cols = torch.nonzero(hit, as_tuple=True)
    centres = torch.stack([(cols + 0.5) / 16 - 1, (rows + 0.5) / 16 - 1], dim=1)
    assert (ndc - centres).abs().max() < 1e-4
    normal = torch.linalg.cross(verts[1] - verts[0], verts[2] - verts[0])
    assert ((surface[0][hit] - verts[0]) @ normal).abs().max() < 1e-5  # on the triangle's plane


def exact_sphere_depth(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray distance to the sphere of RADIUS at the origin along threestudio's unit rays, and the hit
    mask."""
    o, d = batch["rays_o"][0], batch["rays_d"][0]
    d = d / d.norm(dim=-1, keepdim=True)
    b = (o * d).sum(-1)
    disc = b**2 - ((o * o).sum(-1) - RADIUS**2)
    hit = disc > 0
    return torch.where(hit, -b - disc.clamp_min(0).sqrt(), torch.zeros_like(b)), hit


@pytest.mark.parametrize("render_rgb", [False, True], ids=["geometry-stage", "rgb"])
def test_dmtet_sphere_depth_and_coverage_match_the_exact_sphere(
    threestudio_ts, threestudio_root, monkeypatch, render_rgb
):
    from threestudio_ssd.baselines import RenderOutputs

    renderer = sphere_renderer(threestudio_ts, threestudio_root, monkeypatch, colour=render_rgb)
    batch = camera_batch(threestudio_ts)
    out = renderer(**batch, render_rgb=render_rgb)
    assert out["depth"].shape == out["opacity"].shape == (1, 48, 48, 1)
    assert ("comp_rgb" in out) == render_rgb
    render = RenderOutputs.from_threestudio(out, batch)
    depth, hit = exact_sphere_depth(batch)
    covered = render.opacity[0] > 0.5
    iou = float((covered & hit).sum() / (covered | hit).sum())
    assert iou > 0.95, iou
    both = covered & hit
    outward = (batch["rays_o"][0] + depth[..., None] * batch["rays_d"][0]) / RADIUS
    facing = -(outward * batch["rays_d"][0]).sum(-1) > 0.5  # away from the grazing silhouette
    error = (render.depth[0] - depth).abs()
    # a 32^3 DMTet grid approximates the sphere by planar facets about a hundredth deep
    assert float(error[both].median()) < 0.01 and float(error[both & facing].max()) < 0.03, (
        error[both].median(),
        error[both & facing].max(),
    )
    cosine = (render.normal[0] * outward).sum(-1)[both]
    assert float(cosine.median()) > 0.99  # comp_normal decoded to unit world normals
    assert not out["depth"].requires_grad


def test_mesh_stage_trains_with_the_depth_baseline(threestudio_root, tmp_path):
    prior = make_tiny_prior(tmp_path / "prior", **PRIOR)
    dpt = make_tiny_depth_estimator(tmp_path / "dpt", **DPT)
    overrides = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1"]
    run_python(
        launch_args(
            CONFIG, "--train", prior, dpt, *SMALL_RENDERS, *overrides, "use_timestamp=false", "tag=mesh"
        ),
        cwd=threestudio_root,
    )
    trial = threestudio_root / "outputs" / "steindreamer-cpu-shapes-mesh" / "mesh"
    rows = (trial / "csv_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("train/loss_ssd", "train/depth_corr", "train/loss_normal_consistency"):
        assert key in header, key
        values = [r.split(",")[header.index(key)] for r in rows[1:]]
        assert any(v and math.isfinite(float(v)) for v in values), (key, values)
    assert (trial / "ckpts" / "last.ckpt").is_file()


def test_mesh_stage_continues_a_coarse_run(threestudio_root, tmp_path):
    """The documented chain: a coarse NeRF run, then the CPU mesh stage converted from its
    checkpoint (threestudio's geometry_convert_from; the sphere init is skipped)."""
    prior = make_tiny_prior(tmp_path / "prior", **PRIOR)
    dpt = make_tiny_depth_estimator(tmp_path / "dpt", **DPT)
    common = [*SMALL_RENDERS, "trainer.max_steps=2", "trainer.val_check_interval=2", "use_timestamp=false"]
    coarse = "custom/threestudio-ssd/configs/steindreamer-cpu-shapes.yaml"
    run_python(launch_args(coarse, "--train", prior, dpt, *common, "tag=chain"), cwd=threestudio_root)
    ckpt = threestudio_root / "outputs" / "steindreamer-cpu-shapes" / "chain" / "ckpts" / "last.ckpt"
    convert = f"system.geometry_convert_from={ckpt}"
    proc = run_python(
        launch_args(CONFIG, "--train", prior, dpt, *common, convert, "tag=chain"), cwd=threestudio_root
    )
    assert "Initializing geometry from a given checkpoint" in proc.stdout + proc.stderr
    assert (
        threestudio_root / "outputs" / "steindreamer-cpu-shapes-mesh" / "chain" / "ckpts" / "last.ckpt"
    ).is_file()
