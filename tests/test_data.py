"""Tests of ``lcss_prior.data``: shapes renderer and cameras, digits, image folders, build_dataset.

The geometry checks are written as functions that return the error of a render against an
independent analytic answer; each is also run on a deliberately wrong variant (flipped image axis,
depth along the optical axis, a mis-scaled SDF, too close a camera) to show that it can fail.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lcss_prior.data import (
    CAPTIONS,
    DigitsDataset,
    ImageFolderDataset,
    ShapesDataset,
    build_dataset,
    camera_c2w,
    camera_rays,
    parse_caption,
    render_scene,
)
from lcss_prior.data.digits import N_DIGITS, TEST_SIZE
from lcss_prior.data.shapes import BOUNDING_RADIUS, COLORS, SHAPE_DIMENSIONS, SHAPES, shape_sdf

SPHERE_RADIUS = 0.40  # the sphere primitive's radius (documented in docs/data.md)


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def test_vocabulary_order_and_parsing():
    assert {"sphere", "cube", "cylinder", "cone", "torus"} <= set(SHAPES)
    assert {"red", "green", "blue", "yellow"} <= set(COLORS)
    assert CAPTIONS == [f"a {c} {s}" for s in SHAPES for c in COLORS]
    assert len(set(CAPTIONS)) == len(SHAPES) * len(COLORS)
    for caption in CAPTIONS:
        shape, color = parse_caption(caption)
        assert f"a {color} {shape}" == caption
    assert parse_caption("  A Red  CUBE ") == ("cube", "red")
    with pytest.raises(ValueError, match="a red sphere") as err:
        parse_caption("a purple cube")
    assert "a purple cube" in str(err.value)


def test_vocabulary_is_selectable():
    ds = ShapesDataset(size=4, resolution=16, shapes=["cube", "torus"], colors=["blue"], supersample=1)
    assert ds.captions == ["a blue cube", "a blue torus"]
    assert [ds[i]["caption"] for i in range(4)] == ["a blue cube", "a blue torus"] * 2
    with pytest.raises(ValueError, match="'pyramid'.*sphere"):
        ShapesDataset(size=1, shapes=["pyramid"])
    with pytest.raises(ValueError, match="'purple'"):
        ShapesDataset(size=1, colors=["purple"])


# ---------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------


def _lookat_c2w(position: torch.Tensor) -> torch.Tensor:
    """threestudio's construction re-derived: forward to the origin, right = forward x z, ..."""
    forward = F.normalize(-position, dim=-1)
    right = F.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]).expand_as(forward)), dim=-1)
    up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(*position.shape[:-1], 4, 4)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = right, up, -forward, position
    c2w[..., 3, 3] = 1
    return c2w


def test_camera_c2w_matches_spherical_lookat():
    g = torch.Generator().manual_seed(1)
    el = torch.rand(50, generator=g) * 170 - 85
    az = torch.rand(50, generator=g) * 360 - 180
    dist = 1 + torch.rand(50, generator=g)
    c2w = camera_c2w(el, az, dist)
    assert c2w.shape == (50, 4, 4)
    e, a = torch.deg2rad(el), torch.deg2rad(az)
    pos = torch.stack([dist * e.cos() * a.cos(), dist * e.cos() * a.sin(), dist * e.sin()], -1)
    torch.testing.assert_close(c2w[:, :3, 3], pos, atol=1e-5, rtol=0)
    torch.testing.assert_close(c2w, _lookat_c2w(pos), atol=1e-5, rtol=0)
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(50, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(50), atol=1e-5, rtol=0)
    # broadcasting and the poles (threestudio's cross product degenerates there; ours does not)
    assert camera_c2w(torch.zeros(2, 3), 0.0, 2.0).shape == (2, 3, 4, 4)
    pole = camera_c2w(90.0, 30.0, 2.0)
    assert torch.isfinite(pole).all()
    torch.testing.assert_close(pole[:3, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)


def _ray_origin_distance(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Distance from the world origin to the line o + t d (d unit)."""
    return torch.linalg.cross(-o, d).norm(dim=-1)


def _convention_errors(rays_o, rays_d, c2w, fovy, height) -> dict[str, float]:
    """Errors of a ray grid against the conventions (odd square image, elevation 0, azimuth 0)."""
    c = height // 2
    f = 0.5 * height / math.tan(math.radians(fovy) / 2)
    top_expected = math.atan((height / 2 - 0.5) / f)  # angle of the top-row-centre ray above the axis
    return {
        "centre_through_origin": _ray_origin_distance(rays_o[c, c], rays_d[c, c]).item(),
        # camera at +x looking at -x: +z (world up) must be the top of the image, +y its right
        "top_row_elevation": abs(math.asin(rays_d[0, c, 2].item()) - top_expected),
        "right_column_towards_plus_y": max(0.0, -(rays_d[c, -1, 1] - rays_d[c, 0, 1]).item()),
        "unit_norm": (rays_d.norm(dim=-1) - 1).abs().max().item(),
    }


def test_camera_rays_follow_threestudio_convention():
    h, fovy = 33, 50.0
    c2w = camera_c2w(0.0, 0.0, 2.0)
    rays_o, rays_d = camera_rays(c2w, fovy, h, h)
    assert rays_o.shape == rays_d.shape == (h, h, 3)
    errors = _convention_errors(rays_o, rays_d, c2w, fovy, h)
    assert max(errors.values()) < 1e-5, errors
    # a wrong convention (image rows not flipped, i.e. +y down) is flagged
    flipped = _convention_errors(rays_o, rays_d.flip(0), c2w, fovy, h)
    assert flipped["top_row_elevation"] > 0.1
    # the centre pixel looks at the origin from every camera (odd size: a pixel sits on the axis)
    cams = camera_c2w(torch.tensor([-10.0, 20.0, 60.0]), torch.tensor([-170.0, 5.0, 99.0]), 1.7)
    o, d = camera_rays(cams, torch.tensor([40.0, 55.0, 70.0]), h, h)
    assert o.shape == (3, h, h, 3)
    assert _ray_origin_distance(o[:, h // 2, h // 2], d[:, h // 2, h // 2]).max() < 1e-5
    # non-square images: one focal length from the height, as in threestudio
    o, d = camera_rays(c2w, fovy, 9, 15)
    assert d.shape == (9, 15, 3)
    f = 0.5 * 9 / math.tan(math.radians(fovy) / 2)
    assert abs(math.atan2(d[4, -1, 1].item(), -d[4, -1, 0].item()) - math.atan(7 / f)) < 1e-5


def test_image_up_is_world_up_in_a_render():
    """A cone (apex up, +z) seen from the side: the apex is in the upper rows of the image."""
    out = render_scene("cone", "red", camera_c2w(0.0, 30.0, 1.8), 45.0, 33, supersample=1)
    rows = torch.nonzero(out["mask"].any(dim=1)).squeeze(-1)
    widths = out["mask"].sum(dim=1)
    assert widths[rows[0]] < widths[rows[-1]]  # narrow apex at the top, wide base at the bottom


# ---------------------------------------------------------------------------------------------
# Geometry: SDFs, depth, normals
# ---------------------------------------------------------------------------------------------


def _sdf_projection_error(sdf, points: torch.Tensor) -> float:
    """For an exact SDF f, stepping p - f(p) grad f(p) lands on the surface: f(.) = 0."""
    p = points.clone().requires_grad_(True)
    value = sdf(p)
    (grad,) = torch.autograd.grad(value.sum(), p)
    projected = (p - value[:, None] * F.normalize(grad, dim=-1)).detach()
    return sdf(projected).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_sdfs_are_exact_and_bounded(shape):
    g = torch.Generator().manual_seed(2)
    points = (torch.rand(4000, 3, generator=g) * 2 - 1) * 0.8

    def sdf(p):
        return shape_sdf(shape, p)

    assert _sdf_projection_error(sdf, points) < 1e-4
    # a mis-scaled SDF (not a distance) fails the same check
    assert _sdf_projection_error(lambda p: 2 * sdf(p), points) > 1e-2
    # the object lies inside the bounding sphere: f > 0 on and outside it
    directions = F.normalize(torch.randn(4000, 3, generator=g), dim=-1)
    assert (sdf(directions * BOUNDING_RADIUS) > 0).all()
    # and fills a good part of it (not a speck): interior points reach past 0.7 R
    inside = points[sdf(points) < 0]
    assert inside.norm(dim=-1).max() > 0.7 * BOUNDING_RADIUS


def _surface_points(dims: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """Points that lie on each shape's surface according to ``dims`` (extreme points along the axes
    and, for the cone, a point half way up the slant)."""
    s, c, y, k, t = (dims[name] for name in SHAPES)
    mid_z = 0.5 * (k["base_z"] + k["apex_z"])
    return {
        "sphere": torch.tensor([[s["radius"], 0, 0], [0, 0, -s["radius"]]]),
        "cube": torch.tensor([[c["half_size"], 0.1, 0.1], [0, 0, c["half_size"]]]),
        "cylinder": torch.tensor([[0, y["radius"], 0.1], [0.1, 0, y["half_height"]]]),
        "cone": torch.tensor(
            [[0, 0, k["apex_z"]], [0.1, 0, k["base_z"]], [0.5 * k["base_radius"], 0, mid_z]]
        ),
        "torus": torch.tensor(
            [[t["major_radius"] + t["minor_radius"], 0, 0], [0, t["major_radius"], t["minor_radius"]]]
        ),
    }


def test_shape_dimensions_are_the_rendered_ones():
    assert tuple(SHAPE_DIMENSIONS) == SHAPES
    for shape, points in _surface_points(SHAPE_DIMENSIONS).items():
        assert shape_sdf(shape, points.float()).abs().max() < 1e-6, shape
    # a dimension that differs from the renderer's by 0.01 is flagged, for every shape
    for shape in SHAPES:
        for key in SHAPE_DIMENSIONS[shape]:
            wrong = {n: dict(d) for n, d in SHAPE_DIMENSIONS.items()}
            wrong[shape][key] += 0.01
            points = _surface_points(wrong)[shape].float()
            assert shape_sdf(shape, points).abs().max() > 1e-3, (shape, key)
    with pytest.raises(TypeError):  # read-only: the public numbers cannot drift from the SDFs
        SHAPE_DIMENSIONS["sphere"]["radius"] = 1.0


def _sphere_depth_errors(out, rays_o, rays_d, radius) -> dict[str, float]:
    """Compare a render of the sphere with the analytic ray-sphere intersection."""
    b = (rays_o * rays_d).sum(-1)
    disc = b**2 - (rays_o.square().sum(-1) - radius**2)
    hit = disc > 0
    t = -b - disc.clamp(min=0).sqrt()
    solid = disc > 1e-3  # away from grazing rays, where the mask may differ by convention
    mask = out["mask"]
    normal = F.normalize(rays_o + t[..., None] * rays_d, dim=-1)
    return {
        "mask": (mask[solid] != hit[solid]).float().sum().item(),
        "depth": (out["depth"][mask] - t[mask]).abs().max().item(),
        "depth_outside": out["depth"][~mask].abs().max().item(),
        "normal": (out["normal"][mask] - normal[mask]).norm(dim=-1).max().item(),
    }


def test_sphere_depth_normals_and_mask_are_exact():
    h, dist, fovy = 33, 1.7, 40.0
    c2w = camera_c2w(25.0, -40.0, dist)
    out = render_scene("sphere", "green", c2w, fovy, h, supersample=1)
    rays_o, rays_d = camera_rays(c2w, fovy, h, h)
    assert out["mask"].any() and not out["mask"].all()
    errors = _sphere_depth_errors(out, rays_o, rays_d, SPHERE_RADIUS)
    assert errors["mask"] == 0 and errors["depth_outside"] == 0, errors
    assert errors["depth"] < 1e-4 and errors["normal"] < 1e-3, errors
    assert abs(out["depth"][h // 2, h // 2].item() - (dist - SPHERE_RADIUS)) < 1e-4
    # depth along the optical axis (camera z) instead of along the ray is flagged
    z_depth = dict(out, depth=out["depth"] * (rays_d @ -c2w[:3, 2]))
    assert _sphere_depth_errors(z_depth, rays_o, rays_d, SPHERE_RADIUS)["depth"] > 1e-3
    # a wrong radius is flagged
    assert _sphere_depth_errors(out, rays_o, rays_d, SPHERE_RADIUS + 0.01)["depth"] > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_render_is_consistent_with_the_sdf(shape):
    """Foreground pixels lie on the surface with outward unit normals facing the camera; rays of
    background pixels stay outside the object (dense samples along them)."""
    h, fovy = 24, 50.0
    c2w = camera_c2w(torch.tensor([-10.0, 35.0]), torch.tensor([20.0, -120.0]), 1.6)
    out = render_scene(shape, "blue", c2w, fovy, h, supersample=1)
    rays_o, rays_d = camera_rays(c2w, fovy, h, h)
    mask = out["mask"]
    assert mask.shape == (2, h, h) and mask.dtype == torch.bool and mask.any()
    surface = rays_o[mask] + out["depth"][mask][:, None] * rays_d[mask]
    assert shape_sdf(shape, surface).abs().max() < 1e-3
    n = out["normal"][mask]
    assert (n.norm(dim=-1) - 1).abs().max() < 1e-4
    assert ((n * rays_d[mask]).sum(-1) < 1e-6).all()  # facing the camera (or grazing)
    assert out["normal"][~mask].abs().max() == 0 and out["depth"][~mask].abs().max() == 0
    t = torch.linspace(0.5, 3.0, 400)
    samples = rays_o[~mask][:, None] + t[None, :, None] * rays_d[~mask][:, None]
    assert shape_sdf(shape, samples).min() > -1e-3
    rgb = out["rgb"]
    assert rgb.shape == (2, h, h, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb[~mask] == 1).all()  # white background


def test_supersampling_keeps_geometry_and_smooths_edges():
    c2w = camera_c2w(20.0, 45.0, 1.7)
    plain = render_scene("cube", "red", c2w, 50.0, 32, supersample=1)
    smooth = render_scene("cube", "red", c2w, 50.0, 32, supersample=3)
    for key in ("depth", "mask", "normal"):
        assert torch.equal(plain[key], smooth[key])
    # anti-aliased edges take values between background and object
    edge_values = smooth["rgb"][..., 1][
        plain["mask"] ^ F.max_pool2d(plain["mask"][None].float(), 3, 1, 1)[0].bool()
    ]
    assert ((edge_values > 0.2) & (edge_values < 0.95)).any()


def _border_touched(mask: torch.Tensor) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _masks_by_shape(cameras: list[dict], shapes: list[str], resolution: int) -> list[torch.Tensor]:
    """Masks of ``shapes[k]`` seen from ``cameras[k]``, rendered in one batch per shape."""
    masks: list[torch.Tensor | None] = [None] * len(cameras)
    for shape in set(shapes):
        idx = [k for k, s in enumerate(shapes) if s == shape]
        c2w = torch.stack([cameras[k]["c2w"] for k in idx])
        fovy = torch.stack([torch.as_tensor(cameras[k]["fovy"], dtype=torch.float32) for k in idx])
        out = render_scene(shape, "red", c2w, fovy, resolution, supersample=1)["mask"]
        for row, k in enumerate(idx):
            masks[k] = out[row]
    return masks


def test_object_fully_visible_for_default_cameras():
    ds = ShapesDataset(size=60, resolution=64, seed=3, supersample=1)
    cameras = [ds.camera(i) for i in range(len(ds))]
    shapes = [parse_caption(ds.captions[i % len(ds.captions)])[0] for i in range(len(ds))]
    # the worst cases of the default ranges: nearest camera, narrowest field of view
    for shape in SHAPES:
        for el in (-10.0, 25.0, 60.0):
            for az in range(-180, 180, 90):
                cameras.append({"c2w": camera_c2w(el, float(az), 1.5), "fovy": 40.0})
                shapes.append(shape)
    masks = _masks_by_shape(cameras, shapes, 64)
    assert torch.equal(masks[7], ds[7]["mask"])  # a batched render equals the item's
    for k, mask in enumerate(masks):
        assert mask.any(), (k, shapes[k])
        assert not _border_touched(mask), (k, shapes[k])
    # the check does flag a camera range that is too close (and the constructor warns about it)
    with pytest.warns(UserWarning, match="leave the picture"):
        close = ShapesDataset(size=10, resolution=64, distance_range=(0.9, 1.0), fovy_range=(40, 40))
    close_masks = _masks_by_shape([close.camera(i) for i in range(10)], ["cube"] * 10, 64)
    assert any(_border_touched(mask) for mask in close_masks)


def test_render_time_is_reported():
    c2w = camera_c2w(30.0, 45.0, 1.8)
    timings = {}
    render_scene("torus", "yellow", c2w, 50.0, 64)  # warm-up
    for supersample in (1, 2):
        start = time.perf_counter()
        for shape in SHAPES:
            render_scene(shape, "yellow", c2w, 50.0, 64, supersample=supersample)
        timings[supersample] = (time.perf_counter() - start) / len(SHAPES)
    print(
        "\nrender_scene 64x64 on 1 thread: "
        + ", ".join(f"supersample={s}: {1000 * t:.1f} ms/image" for s, t in timings.items())
    )


def test_render_scene_rejects_bad_input():
    c2w = camera_c2w(0.0, 0.0, 2.0)
    with pytest.raises(ValueError, match="'prism'"):
        render_scene("prism", "red", c2w, 50.0, 8)
    with pytest.raises(ValueError, match="'mauve'"):
        render_scene("cube", "mauve", c2w, 50.0, 8)
    with pytest.raises(ValueError, match="4, 4"):
        render_scene("cube", "red", torch.eye(3), 50.0, 8)
    with pytest.raises(ValueError, match="supersample"):
        render_scene("cube", "red", c2w, 50.0, 8, supersample=0)


# ---------------------------------------------------------------------------------------------
# ShapesDataset
# ---------------------------------------------------------------------------------------------


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_shapes_items_are_deterministic_per_index():
    kwargs = dict(size=30, resolution=16, supersample=1)
    a, b = ShapesDataset(seed=5, **kwargs), ShapesDataset(seed=5, **kwargs)
    for i in (17, 3, 29, 0):  # access order does not matter
        _assert_items_equal(a[i], b[i])
    _assert_items_equal(a[-1], a[29])
    batched = a.render_items([3, 17, 23, 24])  # several captions, batched per caption
    for index, item in zip([3, 17, 23, 24], batched):
        _assert_items_equal(item, a[index])
    other_seed, test_split = ShapesDataset(seed=6, **kwargs), ShapesDataset(seed=5, split="test", **kwargs)
    for other in (other_seed, test_split):
        assert not torch.equal(a[3]["c2w"], other[3]["c2w"])
        assert a[3]["label"] == other[3]["label"]
    with pytest.raises(IndexError):
        a[30]
    with pytest.raises(IndexError, match="index 30"):
        a.render_items([1, 30])


def test_shapes_item_contents_and_ranges():
    ds = ShapesDataset(size=40, resolution=24, seed=1, supersample=1)
    assert ds.channels == 3 and ds.resolution == 24 and ds.n_levels == 256 and ds.captions == CAPTIONS
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (3, 24, 24) and it["image"].dtype == torch.float32
        assert it["image"].min() >= -1 and it["image"].max() <= 1
        levels = (it["image"] + 1) * 127.5
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # 8-bit quantised
        assert it["label"] == i % len(CAPTIONS) and it["caption"] == CAPTIONS[it["label"]]
        assert -10 <= it["elevation"] <= 60 and -180 <= it["azimuth"] <= 180
        assert 1.5 <= it["distance"] <= 2.0 and 40 <= it["fovy"] <= 70
        torch.testing.assert_close(it["c2w"], camera_c2w(it["elevation"], it["azimuth"], it["distance"]))
        assert (
            it["depth"].shape == (24, 24)
            and it["mask"].shape == (24, 24)
            and it["normal"].shape == (24, 24, 3)
        )
        # the image and the mask agree: background pixels are white
        assert (it["image"][:, ~it["mask"]] == 1).all()
    lean = ShapesDataset(size=2, resolution=8, return_geometry=False, supersample=1)[0]
    assert "depth" not in lean and "mask" not in lean and "normal" not in lean
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 24, 24) and batch["label"].tolist() == [0, 1]


def test_shapes_dataset_rejects_bad_settings():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(size=1, split="val")
    with pytest.raises(ValueError, match="distance_range"):
        ShapesDataset(size=1, distance_range=(0.3, 1.0))
    with pytest.raises(ValueError, match="elevation_range"):
        ShapesDataset(size=1, elevation_range=(30, 10))


def test_shapes_cache_in_memory_and_on_disk(tmp_path):
    kwargs = dict(size=6, resolution=16, seed=2, supersample=2)
    plain = ShapesDataset(**kwargs)
    memory = ShapesDataset(cache="memory", **kwargs)
    path = tmp_path / "cache" / "shapes.pt"
    first = ShapesDataset(cache=path, **kwargs)
    assert path.is_file()
    second = ShapesDataset(cache=path, **kwargs)  # read back, not re-rendered
    for i in range(6):
        for ds in (memory, first, second):
            _assert_items_equal(plain[i], ds[i])
    item = memory[0]
    item["image"] = None  # a caller mutating its dict does not touch the cache
    assert memory[0]["image"] is not None
    with pytest.raises(ValueError, match=r"shapes\.pt.*seed: file 2, asked 3"):
        ShapesDataset(cache=path, **{**kwargs, "seed": 3})
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="bad.pt"):
        ShapesDataset(cache=bad, **kwargs)


def test_shapes_cache_writers_do_not_collide(tmp_path, monkeypatch):
    """Two runs (or ranks) rendering into one cache file: each writes its own temporary file and
    renames it atomically, so neither sees a partial file; a failed write leaves nothing behind."""
    import lcss_prior.data.shapes as shapes

    kwargs = dict(size=3, resolution=4, seed=1, supersample=1)
    path = tmp_path / "shared.pt"
    seen = []
    real_save = torch.save

    def save_then_race(obj, f, *a, **kw):
        seen.append(str(f))
        if len(seen) == 1:  # a second writer renders and renames while the first one is writing
            ShapesDataset(cache=path, **kwargs)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(shapes.torch, "save", save_then_race)
    ShapesDataset(cache=path, **kwargs)
    assert len(seen) == 2 and seen[0] != seen[1] and all(".tmp" in n for n in seen)
    monkeypatch.setattr(shapes.torch, "save", real_save)
    ShapesDataset(cache=path, **kwargs)  # reads back a complete file
    assert [p.name for p in tmp_path.iterdir()] == ["shared.pt"]

    def broken_save(obj, f, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(shapes.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ShapesDataset(cache=tmp_path / "other.pt", **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.pt"]  # no stray temporary file


def test_shapes_stacked_is_the_collated_items(tmp_path):
    kwargs = dict(size=330, resolution=4, seed=4, supersample=1)  # more than one chunk of 16 x 20
    ds = ShapesDataset(**kwargs)
    batch = ds.stacked(progress=False)
    assert batch.keys() == {k for k in ds[0] if k != "caption"}
    assert batch["label"].tolist() == [i % len(CAPTIONS) for i in range(330)]
    for i in (0, 19, 20, 319, 320, 329):  # both sides of the chunk border
        for key, value in ds[i].items():
            if key != "caption":
                assert torch.equal(batch[key][i], torch.as_tensor(value)), (i, key)
    # the cache file holds the same batch (8-bit images are stored exactly)
    cached = ShapesDataset(cache=tmp_path / "s.pt", **kwargs).stacked(progress=False)
    assert cached.keys() == batch.keys()
    for key in batch:
        assert torch.equal(cached[key], batch[key]), key
    lean = ShapesDataset(size=3, resolution=4, return_geometry=False, supersample=1).stacked(progress=False)
    assert "depth" not in lean and lean["image"].shape == (3, 3, 4, 4)


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def test_digits_levels_ranges_and_split():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(test) == TEST_SIZE and len(train) == N_DIGITS - TEST_SIZE
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert len(set(train.indices.tolist()) | set(test.indices.tolist())) == N_DIGITS
    assert torch.equal(DigitsDataset("test").indices, test.indices)  # fixed for a seed
    assert not torch.equal(DigitsDataset("test", seed=1).indices, test.indices)
    assert train.channels == 1 and train.n_levels == 17 and train.resolution == 8
    assert train.captions == [f"digit {d}" for d in range(10)]
    values = torch.unique(torch.cat([train.images.flatten(), test.images.flatten()]))
    torch.testing.assert_close(values, torch.linspace(-1, 1, 17))  # all 17 levels, exactly
    item = train[0]
    assert item["image"].shape == (1, 8, 8) and item["caption"] == f"digit {item['label']}"
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # against scikit-learn's raw values
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images[test.indices.numpy()], dtype=torch.float32)
    torch.testing.assert_close(test.images[:, 0], raw / 8 - 1)


def test_digits_upsampling_keeps_levels():
    big = DigitsDataset("test", resolution=16)
    small = DigitsDataset("test")
    assert big[0]["image"].shape == (1, 16, 16)
    torch.testing.assert_close(big.images[:, :, ::2, ::2], small.images)
    assert torch.unique(big.images).numel() <= 17
    with pytest.raises(ValueError, match="multiple of 8"):
        DigitsDataset(resolution=12)
    with pytest.raises(ValueError, match="'validation'"):
        DigitsDataset("validation")


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_image_folder_happy_path(tmp_path):
    red = np.zeros((30, 50, 3), np.uint8)
    red[..., 0] = 255
    _write_png(tmp_path / "red_ball" / "a.png", red)
    _write_png(tmp_path / "red_ball" / "nested" / "b.PNG", red[:20, :20])
    gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[:, None, None], (1, 40, 3))
    _write_png(tmp_path / "grey-thing" / "c.png", gradient)
    (tmp_path / "grey-thing" / "notes.txt").write_text("not an image")

    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert ds.captions == ["grey thing", "red ball"] and len(ds) == 3
    assert ds.channels == 3 and ds.resolution == 16 and ds.n_levels == 256
    labels = [ds[i]["label"] for i in range(3)]
    assert labels == [0, 1, 1]
    red_item = ds[1]
    assert red_item["image"].shape == (3, 16, 16) and red_item["caption"] == "red ball"
    torch.testing.assert_close(
        red_item["image"], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16)
    )
    grey = ds[0]["image"]
    assert grey.min() >= -1 and grey.max() <= 1 and (grey[:, 0] < grey[:, -1]).all()  # rows kept in order
    levels = (grey + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)

    mono = ImageFolderDataset(tmp_path / "red_ball", resolution=8, channels=1, class_from_subfolder=False)
    assert mono.captions == ["red ball"] and len(mono) == 2 and mono[0]["image"].shape == (1, 8, 8)


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing, resolution=8)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty.*no images"):
        ImageFolderDataset(empty, resolution=8)
    corrupt = tmp_path / "corrupt"
    _write_png(corrupt / "cls" / "good.png", np.zeros((8, 8, 3)))
    (corrupt / "cls" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataset(corrupt, resolution=8)
    truncated = tmp_path / "truncated"
    _write_png(truncated / "cls" / "full.png", np.random.default_rng(0).integers(0, 255, (32, 32, 3)))
    data = (truncated / "cls" / "full.png").read_bytes()
    (truncated / "cls" / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.png"):
        ImageFolderDataset(truncated, resolution=8)
    # a truncated JPEG passes Image.verify (headers only) and used to crash training at the step that
    # first read it, on every resume; it is decoded up front now, and every bad file is named
    from PIL import Image

    jpegs = tmp_path / "jpegs"
    (jpegs / "cls").mkdir(parents=True)
    pixels = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(jpegs / "cls" / "full.jpg", quality=95)
    data = (jpegs / "cls" / "full.jpg").read_bytes()
    for name in ("cut1.jpg", "cut2.jpg"):
        (jpegs / "cls" / name).write_bytes(data[: len(data) // 2])
    with Image.open(jpegs / "cls" / "cut1.jpg") as im:
        im.verify()  # the check the data set relied on before: it does not notice
    with pytest.raises(ValueError, match=r"2 image file\(s\).*cut1.jpg.*cut2.jpg"):
        ImageFolderDataset(jpegs, resolution=8)
    flat = tmp_path / "flat"
    _write_png(flat / "x.png", np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="class_from_subfolder=False"):
        ImageFolderDataset(flat, resolution=8)


# ---------------------------------------------------------------------------------------------
# build_dataset
# ---------------------------------------------------------------------------------------------


def test_build_dataset(tmp_path):
    shapes = build_dataset("shapes", 16, "test", seed=1, size=3, supersample=1)
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 3 and shapes.split == "test"
    digits = build_dataset("digits", 8, "train")
    assert isinstance(digits, DigitsDataset) and len(digits) == N_DIGITS - TEST_SIZE
    _write_png(tmp_path / "train" / "cat" / "a.png", np.zeros((8, 8, 3)))
    _write_png(tmp_path / "test" / "cat" / "b.png", np.zeros((8, 8, 3)))
    folder = build_dataset(tmp_path, 8, "test")
    assert isinstance(folder, ImageFolderDataset) and folder.files[0].name == "b.png"
    for ds in (shapes, digits, folder):
        assert {"captions", "channels", "resolution", "n_levels"} <= set(dir(ds))
    with pytest.raises(ValueError, match="'imagenet'.*shapes, digits") as err:
        build_dataset("imagenet", 64)
    assert "folder" in str(err.value)
    with pytest.raises(ValueError, match="no 'test' subfolder"):
        build_dataset(tmp_path / "train", 8, "test")
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", 8, "val")


def test_no_warning_for_default_ranges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShapesDataset(size=1, resolution=8)
