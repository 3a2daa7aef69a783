"""Tests of threestudio_ssd.depth: offline loading of transformers depth checkpoints, the
differentiable torch preprocessing, output kinds, clear errors, and the ``ssd-train-depth`` trainer.

Every model is tiny, randomly initialised, written with ``save_pretrained`` into ``tmp_path`` and
loaded back through ``load_depth_estimator``, the code path a user takes (HF_HUB_OFFLINE=1 is set
by conftest.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from threestudio_ssd.baselines.ops import scale_shift_align
from threestudio_ssd.depth import DepthEstimator, load_depth_estimator
from threestudio_ssd.depth.estimator import Preprocessing


def tiny_dpt_config(image_size: int = 32, **kwargs):
    from transformers import DPTConfig

    return DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
        initializer_range=0.1,  # outputs of order 1e-2 instead of 1e-9 (see depth/train.py)
        **kwargs,
    )


@pytest.fixture(scope="module")
def dpt_folder(tmp_path_factory) -> Path:
    from transformers import DPTForDepthEstimation

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dpt")
    DPTForDepthEstimation(tiny_dpt_config()).save_pretrained(folder)
    return folder


def test_loads_offline_from_save_pretrained_folder(dpt_folder):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    est = load_depth_estimator(dpt_folder)
    assert isinstance(est, DepthEstimator)
    assert est.output_kind == "relative_inverse_depth"
    # No processor config: DPT's defaults (mean/std 0.5) at the config's image_size, patch multiple.
    assert est.preprocessing == Preprocessing((0.5,) * 3, (0.5,) * 3, (32, 32), False, 8, "bicubic")
    assert all(not p.requires_grad for p in est.parameters())
    est.train()
    assert not est.training and not est.model.training


def test_output_at_input_resolution_and_gradient_reaches_input(dpt_folder):
    est = load_depth_estimator(dpt_folder)
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 40, 56, generator=g, requires_grad=True)  # not the model's 32x32
    out = est(rgb)
    assert out.shape == (2, 40, 56) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    assert (rgb.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient
    # Samples are independent (no batch statistics): image 0's output ignores image 1.
    rgb2 = rgb.detach().clone()
    rgb2[1] = torch.rand(3, 40, 56, generator=g)
    torch.testing.assert_close(est(rgb2)[0], out[0].detach(), rtol=1e-5, atol=1e-7)


def test_preprocessing_matches_the_transformers_image_processor(tmp_path, dpt_folder):
    """Our torch preprocessing reproduces DPTImageProcessor's normalisation exactly and its resize
    rule (aspect ratio, multiple) exactly; it reads the processor config from the folder."""
    from transformers import DPTImageProcessor
    from transformers.models.dpt.image_processing_dpt import get_resize_output_image_size

    folder = tmp_path / "dpt-with-processor"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((dpt_folder / name).read_bytes())
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    proc = DPTImageProcessor(
        size={"height": 48, "width": 64},
        image_mean=mean,
        image_std=std,
        keep_aspect_ratio=True,
        ensure_multiple_of=8,
    )
    proc.save_pretrained(folder)
    est = load_depth_estimator(folder)
    p = est.preprocessing
    assert p.mean == tuple(mean) and p.std == tuple(std) and p.size == (48, 64) and p.keep_aspect_ratio
    for h, w in [(48, 64), (100, 37), (31, 90), (64, 64)]:
        ref = get_resize_output_image_size(np.zeros((h, w, 3)), (48, 64), True, 8, "channels_last")
        assert p.output_size(h, w) == tuple(ref), (h, w)
    # Normalisation: at the target size no resampling happens, so the values must agree exactly.
    g = torch.Generator().manual_seed(1)
    img8 = (torch.rand(48, 64, 3, generator=g) * 255).round().to(torch.uint8)
    ref = proc(images=img8.numpy(), return_tensors="pt")["pixel_values"]
    ours = est.preprocess(img8.permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_half_precision_weights_and_input_size_override(dpt_folder):
    est32 = load_depth_estimator(dpt_folder)
    est16 = load_depth_estimator(dpt_folder, dtype=torch.bfloat16, input_size=24)
    assert est16.dtype == torch.bfloat16 and est16.preprocessing.size == (24, 24)
    est16b = load_depth_estimator(dpt_folder, dtype=torch.bfloat16)
    rgb = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a, b = est32(rgb), est16b(rgb)
    assert b.dtype == torch.float32  # cast back to the input's dtype
    r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert r > 0.95
    assert est16(rgb).shape == (1, 32, 32)


def tiny_depth_anything(folder: Path, kind: str) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[4, 8, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=4,
        depth_estimation_type=kind,
        max_depth=10.0,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)


@pytest.mark.parametrize(
    "kind, expected", [("relative", "relative_inverse_depth"), ("metric", "metric_depth")]
)
def test_output_kind_from_config_depth_anything(tmp_path, kind, expected):
    tiny_depth_anything(tmp_path, kind)
    est = load_depth_estimator(tmp_path)
    assert est.output_kind == expected
    # Depth Anything defaults: ImageNet statistics, aspect ratio kept, multiple of the patch (14).
    assert est.preprocessing.mean == (0.485, 0.456, 0.406) and est.preprocessing.multiple == 14
    est = load_depth_estimator(tmp_path, input_size=28)
    assert est(torch.rand(1, 3, 20, 30)).shape == (1, 20, 30)


def test_output_kind_override_is_checked(dpt_folder):
    assert load_depth_estimator(dpt_folder, output_kind="metric_depth").output_kind == "metric_depth"
    with pytest.raises(ValueError, match="output_kind"):
        load_depth_estimator(dpt_folder, output_kind="depth")


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


def test_missing_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_depth_estimator(missing)


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(
        FileNotFoundError, match=r"not a local folder.*HF_HUB_OFFLINE.*huggingface-cli download"
    ):
        load_depth_estimator("nobody-has-this/depth-model-xyz")


def test_diffusers_folder_is_not_a_depth_model(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a transformers depth-estimation checkpoint.*UNet2DModel"):
        load_depth_estimator(tmp_path)


def test_other_transformers_model_type_is_not_a_depth_model(tmp_path):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'vit'.*supported model types"):
        load_depth_estimator(tmp_path)


def test_folder_without_config_and_file_path(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_depth_estimator(tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_depth_estimator(f)


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def test_scale_shift_invariant_loss():
    from threestudio_ssd.depth.train import scale_shift_invariant_loss

    g = torch.Generator().manual_seed(3)
    target = torch.rand(3, 8, 8, generator=g)
    mask = torch.rand(3, 8, 8, generator=g) > 0.3
    for kind in ("l1", "l2"):
        loss = scale_shift_invariant_loss(2.5 * target - 0.7, target, mask, kind)
        assert loss.shape == (3,) and loss.max() < 1e-6
        noisy = target + 0.1 * torch.randn(3, 8, 8, generator=g)
        base = scale_shift_invariant_loss(noisy, target, mask, kind)
        assert base.min() > 1e-4
        torch.testing.assert_close(scale_shift_invariant_loss(4 * noisy + 3, target, mask, kind), base)
        # Positive scale by construction: an inverted relief costs several times more than noise (a least-squares
        # fit with a free sign would align -target onto target at zero loss).
        assert (scale_shift_invariant_loss(-target, target, mask, kind) > 3 * base).all()
        # The background matters only where the mask says so.
        outside = noisy.clone()
        outside[~mask] = 100.0
        torch.testing.assert_close(scale_shift_invariant_loss(outside, target, mask, kind), base)


def test_scale_shift_align_positive_scale_does_not_flip_an_inverted_prediction():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(2, 8, 8, generator=g) + 0.5
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    inverted = 1.0 - 0.5 * target
    torch.testing.assert_close(scale_shift_align(inverted, target, mask, positive_scale=False), target)
    flat = scale_shift_align(inverted, target, mask)  # s clamped at 0: the target's mean
    torch.testing.assert_close(flat, target.mean((1, 2), keepdim=True).expand_as(target))


SIGN_SEEDS = (0, 1, 2, 3, 4)
SIGN_SETTINGS = [
    "--steps", "60", "--batch-size", "8", "--train-size", "128", "--eval-size", "32",
    "--resolution", "32", "--hidden-size", "32", "--heads", "2", "--num-threads", "1",
]  # fmt: skip


def _held_out_pearsons(tmp_path, monkeypatch, loss=None) -> list[float]:
    import threestudio_ssd.depth.train as depth_train

    if loss is not None:
        monkeypatch.setattr(depth_train, "scale_shift_invariant_loss", loss)
    out = []
    for seed in SIGN_SEEDS:
        args = depth_train.parse_args(
            ["--output", str(tmp_path / f"m{seed}"), "--seed", str(seed), "--cache-dir", str(tmp_path / "c")]
            + SIGN_SETTINGS
        )
        out.append(depth_train.train(args)["held_out"]["after"]["pearson"])
    return out


@pytest.mark.slow
def test_trained_depth_model_has_the_right_sign_for_every_seed(tmp_path, monkeypatch):
    """Short trainings (60 steps, 32 px, 5 seeds, ~3 s each) must all predict the relief the right
    way round (positive held-out foreground Pearson). The sign-free least-squares alignment that the
    trainer used before fails this on 2 of these 5 seeds (Pearson about -0.7), checked below so the
    test cannot pass by accident."""
    from threestudio_ssd.depth.train import check_quality

    pearsons = _held_out_pearsons(tmp_path / "signed", monkeypatch)
    assert min(pearsons) > 0.3, pearsons

    def sign_free_loss(pred, target, mask, kind="l1"):
        residual = scale_shift_align(pred, target, mask, positive_scale=False) - target
        m = mask.to(pred.dtype)
        return (residual.abs() * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)

    old = _held_out_pearsons(tmp_path / "free", monkeypatch, sign_free_loss)
    assert min(old) < 0, old
    assert "NEGATIVE" in check_quality({"pearson": min(old)}, 0.5)
    assert check_quality({"pearson": min(pearsons)}, 0.3) is None


def test_training_lowers_the_loss_on_a_fixed_batch():
    """The trainer's model and loss actually learn (the model is unfrozen, the head alive)."""
    from threestudio_ssd.depth.train import build_model, render_split, scale_shift_invariant_loss

    data = render_split(2, 32, seed=0, split="train", supersample=1)
    est = build_model(32, hidden_size=16, layers=4, heads=2, patch_size=8, seed=0)
    est.model.requires_grad_(True)
    opt = torch.optim.Adam(est.model.parameters(), lr=1e-3)
    mask = torch.ones_like(data["mask"])
    losses = []
    for _ in range(30):
        loss = scale_shift_invariant_loss(est(data["rgb"]), data["disparity"], mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_training_script_writes_a_folder_the_loader_reads(tmp_path):
    from threestudio_ssd.depth.train import main

    out = tmp_path / "depth-model"
    main(
        [
            "--output", str(out), "--steps", "3", "--batch-size", "2", "--resolution", "32",
            "--train-size", "4", "--eval-size", "3", "--hidden-size", "32", "--heads", "2",
            "--supersample", "1", "--cache-dir", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    assert (out / "preprocessor_config.json").is_file()
    est = load_depth_estimator(out)
    assert est.output_kind == "relative_inverse_depth"
    assert est.preprocessing.size == (32, 32) and est.preprocessing.mean == (0.5, 0.5, 0.5)
    assert est(torch.rand(1, 3, 32, 32)).shape == (1, 32, 32)
    record = json.loads((out / "training.json").read_text())
    after = record["held_out"]["after"]
    assert record["held_out"]["split"] == "test" and record["held_out"]["seed"] == 1
    assert after["n_images"] == 3 and -1 <= after["pearson"] <= 1 and after["abs_rel"] >= 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # rendered once, kept


def test_training_script_rejects_bad_options(tmp_path):
    from threestudio_ssd.depth.train import build_model, main

    for bad in (["--steps", "0"], ["--resolution", "30"], ["--heads", "3"], ["--layers", "2"]):
        with pytest.raises(SystemExit):
            main(["--output", str(tmp_path), *bad])
    assert not any(tmp_path.iterdir())  # rejected before rendering or writing anything
    with pytest.raises(ValueError, match="multiple of --patch-size"):
        build_model(30, hidden_size=32, layers=4, heads=2, patch_size=8, seed=0)
