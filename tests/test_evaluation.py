"""Tests of ``threestudio_ssd.evaluation`` (``ssd-eval``): panel grids, test cameras, IoU/PSNR
against the shapes renderer, CLIP (a tiny random open_clip model saved to a temporary folder and
loaded like real weights), FID through ``lcss_prior.metrics``, mesh checks, Chamfer distance and
video writing. Everything is local and small (CPU, no download)."""

from __future__ import annotations

import json
import math

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from lcss_prior.data import shapes as S
from lcss_prior.data.shapes import render_scene, shape_sdf
from threestudio_ssd.evaluation import (
    PanelLayout,
    TestCameras,
    chamfer_distance,
    clip_scores,
    clip_similarity,
    evaluate_run,
    find_test_views,
    load_clip,
    load_views,
    make_video,
    mask_iou,
    mesh_chamfer,
    mesh_stats,
    psnr,
    r_precision_hits,
    read_video_frames,
    reference_mesh,
)
from threestudio_ssd.evaluation.cli import main

RES = 32
N_TEST_VIEWS = 6
CAPTION = "a red cube"
DATA = {
    "eval_elevation_deg": 20.0,
    "eval_camera_distance": 1.75,
    "eval_fovy_deg": 50.0,
    "n_test_views": N_TEST_VIEWS,
}


# ------------------------------------------------------------------------------------------------
# a simulated threestudio trial folder: save/it{step}-test/{i}.png grids + configs/parsed.yaml
# ------------------------------------------------------------------------------------------------


def _grid(rgb: np.ndarray, normal: np.ndarray, depth: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    """rgb | normal | depth | opacity, uint8, as steindreamer-system's save_image_grid writes it."""
    to8 = lambda x: np.round(255 * np.clip(x, 0, 1)).astype(np.uint8)  # noqa: E731
    grey = lambda x: np.repeat(to8(x)[..., None], 3, axis=2)  # noqa: E731
    d = (depth - depth.min()) / max(depth.max() - depth.min(), 1e-8)
    return np.concatenate([to8(rgb), to8((normal + 1) / 2), grey(d), grey(opacity)], axis=1)


def _render_truth(caption: str = CAPTION, data: dict | None = None) -> dict[str, torch.Tensor]:
    data = data or DATA
    cams = TestCameras.from_run({"data": data})
    shape, color = S.parse_caption(caption)
    return render_scene(shape, color, cams.c2w(list(range(cams.n_views))), cams.fovy_deg, RES)


def _make_trial(root, truth, rgb_offset: float = 0.0, mask_shift: int = 0, step: int = 100, prompt=CAPTION):
    trial = root / "trial"
    views = trial / "save" / f"it{step}-test"
    views.mkdir(parents=True)
    (trial / "configs").mkdir(exist_ok=True)
    config = {
        "name": "test",
        "data_type": "random-camera-datamodule",
        "data": {**DATA, "eval_height": RES, "eval_width": RES},
        "system_type": "steindreamer-system",
        "system": {
            "background_type": "solid-color-background",
            "background": {"color": [1.0, 1.0, 1.0]},
            "prompt_processor": {"prompt": prompt},
        },
    }
    (trial / "configs" / "parsed.yaml").write_text(yaml.safe_dump(config))
    for i in range(truth["rgb"].shape[0]):
        mask = truth["mask"][i].numpy()
        rgb = truth["rgb"][i].numpy() + rgb_offset * mask[..., None]
        opacity = np.roll(mask.astype(np.float32), mask_shift, axis=1)
        iio.imwrite(
            views / f"{i}.png", _grid(rgb, truth["normal"][i].numpy(), truth["depth"][i].numpy(), opacity)
        )
    return trial


@pytest.fixture(scope="module")
def truth():
    return _render_truth()


# ------------------------------------------------------------------------------------------------
# panel layout, view folders, cameras
# ------------------------------------------------------------------------------------------------


def test_panel_layout_splits_threestudio_grids_and_rejects_wrong_layouts():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grey = np.repeat(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), 3, axis=2)
    image = np.concatenate([rgb, colour, grey], axis=1)  # rgb | normal | opacity (threestudio's)

    panels = PanelLayout().split(image, "x.png")
    assert np.array_equal(panels["rgb"], rgb) and np.array_equal(panels["opacity"], grey[..., 0])
    assert np.array_equal(PanelLayout(n_panels=3, rgb=1, opacity=None).split(image)["rgb"], colour)
    assert "opacity" not in PanelLayout().split(rgb)  # one panel: no opacity with "last"
    with pytest.raises(ValueError, match=r"x\.png.*not grey"):
        PanelLayout(opacity=1).split(image, "x.png")  # the normal panel is not an opacity panel
    with pytest.raises(ValueError, match=r"x\.png.*not divisible into 5 panels"):
        PanelLayout(n_panels=5).split(image, "x.png")
    with pytest.raises(ValueError, match=r"x\.png.*not a multiple of the panel width 7"):
        PanelLayout(panel_width=7).split(image, "x.png")
    with pytest.raises(ValueError, match=r"x\.png.*RGB panel 3 does not exist"):
        PanelLayout(rgb=3).split(image, "x.png")
    with pytest.raises(ValueError, match=r"not a multiple of the panel width 8"):  # not square panels
        PanelLayout().split(np.zeros((8, 20, 3), np.uint8), "y.png")


def test_find_and_load_views(tmp_path, truth):
    trial = _make_trial(tmp_path, truth)
    (trial / "save" / "it50-test").mkdir()
    assert find_test_views(trial) == trial / "save" / "it100-test"  # the latest step
    assert find_test_views(trial, 50) == trial / "save" / "it50-test"
    assert find_test_views(trial / "save") == trial / "save" / "it100-test"
    with pytest.raises(FileNotFoundError, match="no it7-test folder"):
        find_test_views(trial, 7)

    views = load_views(trial / "save" / "it100-test", progress=False)
    assert views.rgb.shape == (N_TEST_VIEWS, 3, RES, RES) and views.opacity.shape == (N_TEST_VIEWS, RES, RES)
    assert views.indices == list(range(N_TEST_VIEWS))
    assert views.layout == {"n_panels": 4, "panel_width": RES, "rgb_panel": 0, "opacity_panel": 3}
    assert torch.equal(views.opacity > 0.5, truth["mask"])
    assert (views.rgb - truth["rgb"].permute(0, 3, 1, 2)).abs().max() <= 0.5 / 255 + 1e-6


def test_view_folder_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no test views under {empty}"):
        find_test_views(empty)
    with pytest.raises(ValueError, match=f"{empty} holds no images"):
        load_views(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    iio.imwrite(bad / "0.png", np.zeros((4, 8, 3), np.uint8))
    (bad / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*1\.png"):
        load_views(bad, progress=False)
    (bad / "1.png").unlink()
    iio.imwrite(bad / "1.png", np.zeros((4, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1\.png has size"):
        load_views(bad, progress=False)


def test_test_cameras_follow_threestudio_test_split():
    cams = TestCameras.from_run({"data": DATA}, distance=2.0)
    assert (cams.elevation_deg, cams.distance, cams.fovy_deg, cams.n_views) == (20.0, 2.0, 50.0, 6)
    assert "distance: flags" in cams.source and "fovy_deg: configs/parsed.yaml" in cams.source
    assert TestCameras.from_run(None).to_dict()["n_views"] == 120  # threestudio's defaults
    # RandomCameraDataset(split="test"): azimuth linspace(0, 360, n) with both ends, fixed el/d
    az = cams.azimuths(list(range(6)))
    assert torch.allclose(az, torch.tensor([0.0, 72.0, 144.0, 216.0, 288.0, 360.0]))
    el, a = math.radians(20.0), math.radians(72.0)
    expected = 2.0 * torch.tensor([math.cos(el) * math.cos(a), math.cos(el) * math.sin(a), math.sin(el)])
    assert torch.allclose(cams.c2w([1])[0, :3, 3], expected, atol=1e-6)
    with pytest.raises(ValueError, match="outside the 6 test cameras"):
        cams.azimuths([6])
    with pytest.raises(KeyError, match="unknown camera setting 'fov'"):
        TestCameras.from_run(None, fov=3)


# ------------------------------------------------------------------------------------------------
# IoU / PSNR
# ------------------------------------------------------------------------------------------------


def test_iou_and_psnr_exact_values():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, :2], b[0, 1:3] = True, True  # 8 and 8 pixels, 4 shared -> 4 / 12
    a[1] = True  # vs empty -> 0
    iou = mask_iou(a, b)  # view 2: both empty -> 1
    assert torch.allclose(iou, torch.tensor([1 / 3, 0.0, 1.0], dtype=torch.float64))

    target = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[:, :2] = True
    pred = target + 0.1 * mask[:, None]  # error 0.1 on the mask (2/5 of the pixels), 0 elsewhere
    assert torch.allclose(psnr(pred, target, mask), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.allclose(
        psnr(pred, target), torch.full((2,), -10 * math.log10(0.01 * 2 / 5), dtype=torch.float64)
    )
    assert torch.isinf(psnr(target, target)).all()
    assert torch.isnan(psnr(pred, target, torch.zeros_like(mask))).all()


def test_shapes_metrics_against_the_renderer(tmp_path, truth):
    # views rendered by the shapes renderer itself: IoU 1, PSNR limited only by 8-bit quantisation
    exact = _make_trial(tmp_path / "exact", truth)
    report, views, true = evaluate_run(exact, progress=False)
    shapes = report["shapes"]
    assert report["prompt"] == CAPTION and report["prompt_source"] == "configs/parsed.yaml"
    assert shapes["cameras"]["distance"] == 1.75 and shapes["iou_mean"] == 1.0
    assert shapes["psnr_foreground_mean"] > 20 * math.log10(2 * 255)  # |error| <= 0.5/255
    assert shapes["psnr_full_mean"] > 20 * math.log10(2 * 255)

    # perturbed: +10/255 on the object, opacity shifted right by 2 pixels
    offset, shift = 10 / 255, 2
    perturbed = _make_trial(tmp_path / "perturbed", truth, rgb_offset=offset, mask_shift=shift)
    shapes = evaluate_run(perturbed, progress=False)[0]["shapes"]
    # error = offset + rounding error (uniform, variance 1/(12 * 255^2), mean ~0 over many pixels)
    expected_fg = -10 * math.log10(offset**2 + 1 / (12 * 255**2))
    assert abs(shapes["psnr_foreground_mean"] - expected_fg) < 0.1
    shifted = torch.roll(truth["mask"], shift, dims=2)
    expected_iou = (
        (shifted & truth["mask"]).sum((1, 2)).double() / (shifted | truth["mask"]).sum((1, 2))
    ).mean()
    assert abs(shapes["iou_mean"] - float(expected_iou)) < 1e-9 and shapes["iou_mean"] < 0.95

    # the checks fail on the wrong ground truth: another shape, or other cameras
    wrong_shape = evaluate_run(exact, prompt="a red sphere", progress=False)[0]["shapes"]
    assert wrong_shape["iou_mean"] < 0.95 and wrong_shape["psnr_foreground_mean"] < 25
    wrong_camera = evaluate_run(exact, cameras={"elevation_deg": 40.0}, progress=False)[0]["shapes"]
    assert wrong_camera["iou_mean"] < 0.95


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random open_clip model saved as a local folder (config + weights), like a hub download."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, model


def test_load_clip_from_a_local_folder_and_file(tmp_path, tiny_clip):
    import open_clip

    folder, reference = tiny_clip
    clip = load_clip("tiny", folder)
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    emb = clip.encode_images(images)
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    # the weights were loaded: same embedding as the model that was saved
    with torch.no_grad():
        expected = reference.eval().encode_image(clip.preprocess(images))
    assert torch.allclose(emb, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)

    # the tensor preprocessing equals open_clip's own (PIL) transform on an image of the model's size
    _, _, pil_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = clip.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    theirs = pil_preprocess(PIL.Image.fromarray(pixels))[None]
    assert torch.allclose(ours, theirs, atol=1e-5)

    # a weights file for a named model (registered here as real users have ViT-B-32 built in)
    config_file = tmp_path / "tiny-test-clip.json"
    config_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_file)
    by_file = load_clip("tiny-test-clip", folder / "open_clip_pytorch_model.bin")
    assert torch.allclose(by_file.encode_texts(["a red cube"]), clip.encode_texts(["a red cube"]), atol=1e-5)


def test_load_clip_errors_name_the_path(tmp_path, tiny_clip):
    folder, _ = tiny_clip
    with pytest.raises(FileNotFoundError, match=f"CLIP weights {tmp_path / 'missing.bin'} do not exist"):
        load_clip("ViT-B-32", tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no open_clip_config.json"):
        load_clip("ViT-B-32", tmp_path)
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        load_clip("no-such-model", folder / "open_clip_pytorch_model.bin")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{no_weights} holds no weights file"):
        load_clip("tiny", no_weights)


class _OneHotEncoder:
    """Stub encoder: an image's embedding is the one-hot of the caption index written in its first
    pixel; a caption's embedding is its one-hot in ``captions``."""

    name = "one-hot stub"

    def __init__(self, captions):
        self.captions = list(captions)

    def encode_images(self, rgb):
        return torch.nn.functional.one_hot(rgb[:, 0, 0, 0].long(), len(self.captions)).float()

    def encode_texts(self, texts):
        return torch.nn.functional.one_hot(
            torch.tensor([self.captions.index(t) for t in texts]), len(self.captions)
        ).float()


def test_clip_similarity_and_r_precision_logic():
    captions = ["a red cube", "a blue cube", "a red cone"]
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 2.0])  # views 0, 1 match the prompt
    scores = clip_scores(_OneHotEncoder(captions), images, captions[0], captions[1:])
    assert scores["r_precision"] == 0.5 and scores["r_precision_per_view"] == [True, True, False, False]
    assert scores["clip_similarity_per_view"] == [100.0, 100.0, 0.0, 0.0]
    assert clip_scores(_OneHotEncoder(captions), images, captions[0])["r_precision"] is None
    # ties count against the view; top-k counts ranks
    emb = torch.tensor([[1.0, 1.0, 0.0]])
    assert not r_precision_hits(emb, torch.eye(3), 0, k=1).item()
    assert r_precision_hits(emb, torch.eye(3), 0, k=2).item()
    cos = clip_similarity(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(cos, torch.tensor([60.0]))


# ------------------------------------------------------------------------------------------------
# the CLI: run (the report), fid, mesh, video
# ------------------------------------------------------------------------------------------------


def test_ssd_eval_run_writes_json_and_png(tmp_path, truth, tiny_clip, capsys):
    folder, _ = tiny_clip
    trial = _make_trial(tmp_path, truth)
    out = tmp_path / "eval"
    assert main(["run", str(trial), "--clip-weights", str(folder), "--clip-model", "tiny", "--out", str(out),
                 "--turntable", "gif", "--no-progress"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["n_views"] == N_TEST_VIEWS and report["shapes"]["iou_mean"] == 1.0
    clip = report["clip"]
    assert clip["backbone"].startswith("tiny") and clip["n_captions"] == len(S.CAPTIONS)
    assert math.isfinite(clip["clip_similarity"]) and 0.0 <= clip["r_precision"] <= 1.0
    assert report["mesh"] == {
        "skipped": "no mesh given (--mesh) and none exported under save/it<step>-export/"
    }
    png = iio.imread(out / "report.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
    assert read_video_frames(out / "turntable.gif").shape[0] == N_TEST_VIEWS
    assert "clip skipped" not in capsys.readouterr().err

    # any folder of views (no run config): prompt and cameras from flags
    plain = tmp_path / "views"
    plain.mkdir()
    for i in range(N_TEST_VIEWS):
        (plain / f"{i}.png").write_bytes((trial / "save" / "it100-test" / f"{i}.png").read_bytes())
    flags = ["--elevation", "20", "--distance", "1.75", "--fovy", "50", "--n-views", str(N_TEST_VIEWS)]
    assert main(["run", str(plain), "--prompt", CAPTION, *flags, "--no-progress"]) == 0
    from_flags = json.loads((tmp_path / "views-eval" / "report.json").read_text())
    assert from_flags["prompt_source"] == "argument" and from_flags["shapes"]["iou_mean"] == 1.0
    assert "threestudio default" not in from_flags["shapes"]["cameras"]["source"]

    # no CLIP weights: reported and printed as skipped; default output folder beside the views
    assert main(["run", str(trial), "--no-progress"]) == 0
    default = json.loads((trial / "save" / "it100-test-eval" / "report.json").read_text())
    assert "skipped" in default["clip"] and "clip skipped" in capsys.readouterr().err


def test_ssd_eval_fid_uses_lcss_prior_metrics(tmp_path, capsys):
    from lcss_prior.metrics import FeatureClassifier, save_feature_extractor

    torch.manual_seed(0)
    features = save_feature_extractor(FeatureClassifier(3, 16, 4, width=8, feature_dim=8), tmp_path / "f.pt")
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i in range(12):
        iio.imwrite(a / f"{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        iio.imwrite(b / f"{i}.png", rng.integers(0, 128, (16, 16, 3), dtype=np.uint8))  # darker
    args = ["--features", str(features), "--resolution", "16", "--kid-subsets", "5", "--kid-subset-size", "6"]
    main(["fid", str(a), str(a), *args])
    same = json.loads(capsys.readouterr().out)
    main(["fid", str(a), str(b), *args])
    other = json.loads(capsys.readouterr().out)
    assert same["n_a"] == 12 and abs(same["fid"]) < 1e-6 and other["fid"] > 1e-3
    with pytest.raises(FileNotFoundError, match="feature weights file .*nope.pt does not exist"):
        main(["fid", str(a), str(b), "--features", str(tmp_path / "nope.pt")])


def test_mesh_checks_on_known_meshes(tmp_path, capsys):
    import trimesh

    cube = trimesh.creation.box(extents=[0.5, 0.5, 0.5])
    stats = mesh_stats(cube)
    assert stats["watertight"] and stats["n_components"] == 1 and stats["euler_number"] == 2
    assert (stats["n_vertices"], stats["n_faces"]) == (8, 12) and abs(stats["volume"] - 0.125) < 1e-12
    assert np.allclose(stats["bbox_min"], -0.25) and np.allclose(stats["bbox_max"], 0.25)
    # vertices split per face (as texture seams split an OBJ): still one watertight component
    split = cube.copy()
    split.unmerge_vertices()
    assert len(split.vertices) == 36 and mesh_stats(split)["watertight"]
    two = trimesh.util.concatenate([cube, cube.copy().apply_translation([2.0, 0, 0])])
    assert mesh_stats(two)["n_components"] == 2
    holed = trimesh.Trimesh(cube.vertices, cube.faces[:-1], process=False)
    assert not mesh_stats(holed)["watertight"] and mesh_stats(holed)["volume"] is None

    path = tmp_path / "cube.obj"
    cube.export(path)
    main(["mesh", str(path), "--reference", "a red cube", "--n-points", "2000", "--backend", "torch"])
    (result,) = json.loads(capsys.readouterr().out)
    assert result["watertight"] and result["chamfer"]["backend"] == "torch"
    # same surface: only the sampling floor (A + A) / (pi n); the nearest-sample squared distance
    # is ~ Exp with std = mean, so each direction's mean has standard error floor / (2 sqrt(n))
    cd, floor = result["chamfer"]["chamfer"], result["chamfer"]["sampling_floor"]
    assert floor == pytest.approx(2 * 1.5 / (math.pi * 2000))
    se = floor / math.sqrt(2 * 2000)
    assert abs(cd - floor) < 5 * se
    assert abs(cd - 2 * 1.5 / 2000) > 5 * se  # a floor without the 1/pi would be flagged
    with pytest.raises(FileNotFoundError, match=f"mesh file {tmp_path / 'none.obj'} does not exist"):
        main(["mesh", str(tmp_path / "none.obj")])
    with pytest.raises(ValueError, match="neither a mesh file nor a shapes caption"):
        reference_mesh("a purple blob")


@pytest.mark.parametrize(
    "caption", ["a red sphere", "a red cube", "a red cylinder", "a red cone", "a red torus"]
)
def test_reference_meshes_lie_on_the_rendered_surfaces(caption):
    shape = caption.split()[-1]
    mesh = reference_mesh(caption)
    vertices = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    assert shape_sdf(shape, vertices).abs().max() < 1e-5
    assert mesh_stats(mesh)["watertight"]
    # a wrong size is flagged by the same check
    assert shape_sdf(shape, 1.05 * vertices).abs().max() > 1e-3


def _sphere_points(n: int, radius: float, seed: int) -> torch.Tensor:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return radius * x / x.norm(dim=1, keepdim=True)


def test_chamfer_distance_analytic_spheres():
    """Concentric spheres: CD = 2 (r1 - r2)^2 plus a positive sampling bias ~ 4 (r1^2 + r2^2) / n
    (mean squared tangential distance to the nearest of n uniform points, 1 / (pi rho))."""
    r1, r2, n = 0.4, 0.3, 3000
    a, b = _sphere_points(n, r1, 0), _sphere_points(n, r2, 1)
    result = chamfer_distance(a, b)
    exact, bias = 2 * (r1 - r2) ** 2, 4 * (r1**2 + r2**2) / n
    # every nearest distance is >= |r1 - r2| exactly, so the lower bound is strict
    assert exact <= result["chamfer"] <= exact + 3 * bias
    assert abs(result["chamfer_l2"] - 2 * abs(r1 - r2)) < 3 * math.sqrt(bias)
    assert result["a_to_b"] >= (r1 - r2) ** 2 and result["b_to_a"] >= (r1 - r2) ** 2
    # the unsquared convention would be flagged by the same check
    assert not exact <= result["chamfer_l2"] <= exact + 3 * bias
    assert chamfer_distance(a, a)["chamfer"] < 1e-12
    assert chamfer_distance(a, b, chunk=7)["chamfer"] == pytest.approx(result["chamfer"], rel=1e-12)
    # through meshes and surface sampling
    import trimesh

    spheres = [trimesh.creation.icosphere(subdivisions=4, radius=r) for r in (r1, r2)]
    by_mesh = mesh_chamfer(*spheres, n_points=n, backend="torch")["chamfer"]
    assert abs(by_mesh - exact) < 3 * bias + 1e-3 * exact  # + the flat facets of the icosphere


def test_chamfer_pytorch3d_matches_torch():
    try:
        import pytorch3d  # noqa: F401
    except ImportError:
        pytest.skip("pytorch3d is not installed (no Linux wheel on PyPI); the torch Chamfer is tested alone")
    a, b = _sphere_points(500, 0.4, 0), _sphere_points(400, 0.3, 1) + 0.05
    ours = chamfer_distance(a, b)["chamfer"]
    theirs = chamfer_distance(a, b, backend="pytorch3d")["chamfer"]
    assert theirs == pytest.approx(ours, rel=1e-4)


def test_chamfer_pytorch3d_backend_error_without_it():
    try:
        import pytorch3d  # noqa: F401

        pytest.skip("pytorch3d is installed; the error path does not apply")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="needs pytorch3d"):
        chamfer_distance(torch.zeros(2, 3), torch.ones(2, 3), backend="pytorch3d")


def test_make_video_mp4_and_gif(tmp_path, truth, capsys):
    frames = [torch.rand(3, 17, 20, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for suffix in ("mp4", "gif"):
        path = make_video(frames, tmp_path / f"traj.{suffix}", fps=10, progress=False)
        back = read_video_frames(path)
        assert back.shape[0] == 5 and back.shape[-1] == 3
    assert read_video_frames(tmp_path / "traj.gif").shape[1:3] == (17, 20)
    assert read_video_frames(tmp_path / "traj.mp4").shape[1:3] == (18, 20)  # padded to even size
    gif = read_video_frames(tmp_path / "traj.gif")[0].astype(int)
    assert np.abs(gif - np.round(255 * frames[0].permute(1, 2, 0).numpy())).mean() < 40  # palette

    # a turntable from a trial folder's views (the CLI)
    trial = _make_trial(tmp_path, truth)
    main(["video", str(trial), str(tmp_path / "turn.mp4"), "--fps", "12"])
    assert read_video_frames(tmp_path / "turn.mp4").shape[0] == N_TEST_VIEWS

    with pytest.raises(ValueError, match="no frames to write"):
        make_video([], tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="unsupported video format '.avi'"):
        make_video(frames, tmp_path / "x.avi")
    with pytest.raises(ValueError, match="frame 1 has shape"):
        make_video([frames[0], torch.rand(3, 8, 8)], tmp_path / "y.gif", progress=False)
