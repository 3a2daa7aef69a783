"""The prior network (lcss_prior.model) and the exported prior folder (lcss_prior.export).

Tiny random UNets are built here, exported to ``tmp_path`` and loaded back through
``load_prior``, the code path the threestudio plugin uses.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcss_prior.ema import ema_decay, ema_update
from lcss_prior.export import PriorFormatError, export_prior, load_prior
from lcss_prior.guidance import classifier_free_guidance
from lcss_prior.model import PRESETS, EpsNetwork, build_unet, get_score_fn
from lcss_prior.sde import build_sde

CAPTIONS = ["digit 0", "digit 1", "digit 2"]


def tiny_unet(num_classes: int = 3, resolution: int = 8, channels: int = 1):
    return build_unet(
        resolution,
        channels,
        num_classes,
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention=(False, True),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def tiny_network(sde, num_classes: int = 3, input_scaling: str = "edm", seed: int = 0) -> EpsNetwork:
    torch.manual_seed(seed)
    return EpsNetwork(tiny_unet(num_classes), sde, input_scaling=input_scaling).eval()


def inputs(b: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 0.98 + 0.01
    labels = torch.randint(0, 3, (b,), generator=g)
    return x, t, labels


@pytest.fixture
def sde():
    return build_sde("vp")


@pytest.fixture
def exported(tmp_path, sde):
    net = tiny_network(sde)
    path = export_prior(
        net, sde, tmp_path / "prior", CAPTIONS, 8, 1, 3, {"method": "lcss", "steps": 0}, n_levels=17
    )
    return net, path


# ---------------------------------------------------------------------------------------------
# build_unet / EpsNetwork
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("resolution,levels", [(8, 3), (32, None)])
def test_presets_build_class_conditional_unets(preset, resolution, levels):
    unet = build_unet(resolution, 3, 20, preset)
    cfg = unet.config
    assert cfg.num_class_embeds == 21  # 20 classes + the NULL class
    assert cfg.sample_size == resolution and cfg.in_channels == cfg.out_channels == 3
    n = len(cfg.block_out_channels)
    assert resolution // 2 ** (n - 1) >= 2  # smallest feature map at least 2 px
    if levels is not None:
        assert n == levels


def test_unconditional_unet_and_bad_arguments():
    assert build_unet(8, 1, 0, "tiny").config.num_class_embeds is None
    with pytest.raises(ValueError, match="preset"):
        build_unet(8, 1, 3, "huge")
    with pytest.raises(ValueError, match="divisible"):
        build_unet(12, 1, 3, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_unet(8, 1, 3, block_out_channels=(6, 12), norm_num_groups=4)


def test_eps_network_maps_time_scales_input_and_defaults_to_null_class(sde):
    net = tiny_network(sde)
    x, t, labels = inputs()
    out = net(x, t, labels)
    assert out.shape == x.shape
    c_in = torch.rsqrt(sde.alpha(t) ** 2 * 0.25 + sde.std(t) ** 2).view(-1, 1, 1, 1)
    direct = net.unet(c_in * x, 999.0 * t, class_labels=labels).sample
    assert torch.equal(out, direct)
    null = torch.full_like(labels, 3)
    assert torch.equal(net(x, t, None), net(x, t, null))
    assert not torch.allclose(net(x, t, labels), net(x, t, null))  # the condition matters
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, torch.full_like(labels, 4))
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, t[:2], labels)


def test_ve_inputs_are_scaled_to_unit_variance():
    ve = build_sde("ve")
    net = tiny_network(ve)
    t = torch.tensor([1.0])
    # data std sigma_data = 0.5: c_in^2 (alpha^2 sigma_data^2 + std^2) = 1
    c_in = net.c_in(t)
    assert torch.allclose(c_in**2 * (0.25 + ve.std(t) ** 2), torch.ones(1))
    assert ve.std(t) > 10  # without the scaling the UNet would see inputs of this size


def label_dropout_flags(net: EpsNetwork, p: float, n: int = 20000) -> bool:
    """True when the empirical NULL rate is within 5 binomial standard errors of ``p``."""
    labels = torch.zeros(n, dtype=torch.long)
    dropped = net.drop_labels(labels, torch.Generator().manual_seed(3))
    rate = float((dropped == net.null_class).float().mean())
    return abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_edm_output_scaling_is_the_linear_posterior_mean_plus_a_unit_variance_rest(sde_name):
    """``eps_hat = c_skip x_t + c_out F``: on Gaussian data of variance ``sigma_data^2``, ``c_skip x_t``
    is ``E[eps | x_t]`` (residual orthogonal to ``x_t``; its MSE equals ``c_out^2``, so ``F``'s
    target has unit variance) at every ``t``; a ``c_skip`` off by 10% fails the orthogonality check."""
    sde = build_sde(sde_name)
    net = EpsNetwork(tiny_unet(), sde, input_scaling="edm", output_scaling="edm", sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    for t_value in (0.05, 0.3, 0.7, 1.0):
        t = torch.full((n,), t_value, dtype=torch.float64)
        x0 = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        x_t = sde.alpha(t) * x0 + sde.std(t) * eps
        c_skip, c_out = net.skip_and_out(t)
        # the wrong c_skip shifts the mean by -0.1 std(t): checked where that is >> the SE
        for scale, ok in ((1.0, True), (1.1, False)) if t_value >= 0.7 else ((1.0, True),):
            residual = eps - scale * c_skip * x_t
            orthogonal = residual * x_t  # normal equation of the best linear predictor: mean 0
            mean, se = float(orthogonal.mean()), float(orthogonal.std()) / math.sqrt(n)
            assert (abs(mean) < 4 * se) == ok, (sde_name, t_value, scale, mean, se)
        err = (eps - c_skip * x_t) ** 2
        mean, se = float(err.mean()), float(err.std()) / math.sqrt(n)
        assert abs(mean - float(c_out[0] ** 2)) < 4 * se, (sde_name, t_value, mean, float(c_out[0] ** 2), se)


def test_edm_output_scaling_makes_eps_hat_x_t_at_large_t(sde):
    """At ``t = 1`` on VP (``alpha ~ 0.0066``) the UNet's output is scaled by ``alpha``: ``eps_hat`` is
    ``x_t`` up to ``O(alpha)`` whatever the (random) UNet says; without it, it is the UNet's output."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    edm = EpsNetwork(unet, sde, output_scaling="edm").eval()
    plain = EpsNetwork(unet, sde, output_scaling="none").eval()
    x, _, labels = inputs()
    t = torch.ones(x.shape[0])
    with torch.no_grad():
        err_edm = (edm(x, t, labels) - x).abs().max()
        err_plain = (plain(x, t, labels) - x).abs().max()
    assert err_edm < 0.05 * float(sde.alpha(t[:1])) * 100 and err_plain > 10 * err_edm
    assert edm.config["output_scaling"] == "edm" and plain.config["output_scaling"] == "none"
    with pytest.raises(ValueError, match="output_scaling"):
        EpsNetwork(unet, sde, output_scaling="v")
    with pytest.raises(ValueError, match="needs the SDE"):
        EpsNetwork(unet, None, input_scaling="none", output_scaling="edm")


def test_output_scaling_round_trips_and_old_priors_load_as_none(tmp_path, sde):
    torch.manual_seed(0)
    net = EpsNetwork(tiny_unet(), sde, output_scaling="edm").eval()
    path = export_prior(net, sde, tmp_path / "p", CAPTIONS, 8, 1, 3, {})
    x, t, labels = inputs()
    with torch.no_grad():
        assert torch.equal(load_prior(path).eps(x, t, labels), net(x, t, labels))
    meta = json.loads((path / "prior.json").read_text())
    assert meta["network"]["output_scaling"] == "edm"
    del meta["network"]["output_scaling"]  # a prior exported before the key existed
    (path / "prior.json").write_text(json.dumps(meta))
    old = load_prior(path)
    assert old.network.output_scaling == "none"
    meta["network"]["output_scaling"] = "x0"
    (path / "prior.json").write_text(json.dumps(meta))
    with pytest.raises(PriorFormatError, match=r"prior\.json.*network\.output_scaling 'x0'"):
        load_prior(path)


def test_label_dropout_rate_training_only(sde):
    net = tiny_network(sde)
    net.p_uncond = 0.1
    net.train()
    assert label_dropout_flags(net, 0.1)
    # the same check rejects a network that drops at a different rate
    net.p_uncond = 0.15
    assert not label_dropout_flags(net, 0.1)
    labels = torch.arange(3).repeat(10)
    before = labels.clone()
    net.eval()
    assert torch.equal(net.drop_labels(labels, torch.Generator().manual_seed(0)), labels)
    net.train()
    net.drop_labels(labels, torch.Generator().manual_seed(0))
    assert torch.equal(labels, before)  # the caller's tensor is not modified


def test_get_score_fn_is_minus_eps_over_std(sde):
    net = tiny_network(sde)
    x, t, labels = inputs()
    score = get_score_fn(sde, net)(x, t, labels)
    assert torch.allclose(score, -net(x, t, labels) / sde.std(t).view(-1, 1, 1, 1))


def test_ema_update_and_decay_schedule():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    a0 = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, 0.9)
    for p_ema, p0, p in zip(a.parameters(), a0, b.parameters()):
        assert torch.allclose(p_ema, 0.9 * p0 + 0.1 * p)
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(10**6, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999
    with pytest.raises(ValueError, match="decay"):
        ema_decay(0, 1.0)


# ---------------------------------------------------------------------------------------------
# export / load
# ---------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(exported, sde):
    net, path = exported
    prior = load_prior(path)
    x, t, labels = inputs()
    with torch.no_grad():
        assert torch.equal(prior.eps(x, t, labels, guidance_scale=1.0), net(x, t, labels))
        assert torch.equal(prior.eps(x, t, None), net(x, t, None))
    assert prior.resolution == 8 and prior.channels == 1 and prior.null_class == 3
    assert prior.captions == CAPTIONS and prior.n_levels == 17
    assert prior.sde == sde
    assert torch.equal(prior.alpha(t), sde.alpha(t)) and torch.equal(prior.sigma(t), sde.std(t))
    assert not prior.training and not any(p.requires_grad for p in prior.parameters())
    prior.train()
    assert not prior.training  # frozen: stays in eval mode
    meta = json.loads((path / "prior.json").read_text())
    assert meta["format"] == "lcss-prior" and meta["version"] == 1
    assert meta["prediction"] == "epsilon" and meta["data_range"] == [-1, 1]
    assert meta["sde"] == sde.config and meta["training"]["method"] == "lcss"
    assert (path / "unet" / "config.json").is_file()


def test_bare_unet_export_means_unscaled_input(tmp_path, sde):
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    path = export_prior(unet, sde, tmp_path / "p", CAPTIONS, 8, 1, 3, {})
    prior = load_prior(path)
    x, t, labels = inputs()
    with torch.no_grad():
        assert torch.equal(prior.eps(x, t, labels), unet(x, 999.0 * t, class_labels=labels).sample)


def test_labels_for_an_unconditional_prior_are_an_error(tmp_path, sde):
    net = tiny_network(sde, num_classes=0)  # 0 classes: an unconditional UNet
    path = export_prior(net, sde, tmp_path / "uncond", [], 8, 1, None, {"steps": 0})
    prior = load_prior(path)
    x, t = torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5)
    assert prior.eps(x, t).shape == x.shape
    with pytest.raises(ValueError, match="unconditional.*class_labels must be None"):
        prior.eps(x, t, torch.tensor([0, 1]))


def test_exported_folder_is_readable_by_others(exported):
    """``tempfile.mkdtemp`` creates 0700 folders; the exported prior follows the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(exported[1])
    for path in (folder, *[p for p in folder.rglob("*") if p.is_dir()]):
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o777 & ~umask, path


def test_load_in_float64(exported):
    net, path = exported
    prior = load_prior(path, dtype=torch.float64)
    x, t, labels = inputs()
    with torch.no_grad():
        out = prior.eps(x.double(), t.double(), labels)
        assert out.dtype == torch.float64
        assert torch.allclose(out.float(), net(x, t, labels), atol=1e-5)


def test_classifier_free_guidance_scales(exported):
    net, path = exported
    prior = load_prior(path)
    x, t, labels = inputs()
    with torch.no_grad():
        eps_c, eps_u = net(x, t, labels), net(x, t, None)
        assert torch.equal(prior.eps(x, t, labels, 1.0), eps_c)
        assert torch.equal(prior.eps(x, t, labels, 0.0), eps_u)
        for s in (0.5, 3.0, 7.5):
            guided = prior.eps(x, t, labels, s)  # one batched call of size 2B
            assert torch.allclose(guided, classifier_free_guidance(eps_c, eps_u, s), atol=1e-5)
            # threestudio's convention eps_c + s (eps_c - eps_u) is a different estimator
            assert not torch.allclose(guided, eps_c + s * (eps_c - eps_u), atol=1e-3)


def test_caption_to_label(exported):
    _, path = exported
    prior = load_prior(path)
    assert prior.caption_to_label("digit 2") == 2
    with pytest.raises(KeyError, match="digit 0"):
        prior.caption_to_label("a red cube")


def test_export_never_clobbers(exported, sde, tmp_path):
    net, path = exported
    with pytest.raises(FileExistsError, match="already holds a prior"):
        export_prior(net, sde, path, CAPTIONS, 8, 1, 3, {})
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a prior"):
        export_prior(net, sde, other, CAPTIONS, 8, 1, 3, {}, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    export_prior(net, sde, path, CAPTIONS, 8, 1, 3, {}, overwrite=True)
    x, t, labels = inputs()
    with torch.no_grad():
        assert torch.equal(load_prior(path).eps(x, t, labels), net(x, t, labels))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_export_checks_consistency(sde, tmp_path):
    net = tiny_network(sde)
    with pytest.raises(ValueError, match="null_class"):
        export_prior(net, sde, tmp_path / "a", CAPTIONS, 8, 1, 2, {})
    with pytest.raises(ValueError, match="captions"):
        export_prior(net, sde, tmp_path / "b", CAPTIONS[:2], 8, 1, 3, {})
    with pytest.raises(ValueError, match="resolution"):
        export_prior(net, sde, tmp_path / "c", CAPTIONS, 16, 1, 3, {})


def _rewrite_json(path, **changes):
    meta = json.loads((path / "prior.json").read_text())
    meta.update(changes)
    (path / "prior.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "breakage,fragment",
    [
        ("missing_dir", "does not exist"),
        ("missing_json", "prior.json is missing"),
        ("truncated_json", "not valid JSON"),
        ("wrong_format", "format"),
        ("wrong_version", "version 2 is not supported"),
        ("missing_key", "missing keys"),
        ("bad_sde", "cannot build the SDE"),
        ("missing_unet", "unet is missing"),
        ("corrupt_unet", "is corrupted: its SHA-256 differs"),  # caught by the export's checksum
        ("flipped_weights", "is corrupted: its SHA-256 differs"),  # would load silently without it
        ("corrupt_unet_unchecked", "cannot be loaded"),  # a prior exported before checksums existed
        ("mismatched_unet", "does not match"),
        ("bad_sigma_data", "network.sigma_data must be a positive number"),
        ("bad_time_scale", "network.time_scale must be a positive number"),
        ("bad_n_levels", "n_levels must be null or an integer >= 2"),
    ],
)
def test_broken_prior_folders_raise_one_clear_error(exported, breakage, fragment):
    _, path = exported
    meta_file = path / "prior.json"
    named = meta_file
    if breakage == "missing_dir":
        path = path.parent / "nowhere"
        named = path
    elif breakage == "missing_json":
        meta_file.unlink()
    elif breakage == "truncated_json":
        meta_file.write_text(meta_file.read_text()[:40])
    elif breakage == "wrong_format":
        _rewrite_json(path, format="something-else")
    elif breakage == "wrong_version":
        _rewrite_json(path, version=2)
    elif breakage == "missing_key":
        meta = json.loads(meta_file.read_text())
        del meta["captions"]
        meta_file.write_text(json.dumps(meta))
    elif breakage == "bad_sde":
        _rewrite_json(path, sde={"name": "no-such-sde"})
    elif breakage == "missing_unet":
        import shutil

        shutil.rmtree(path / "unet")
        named = path / "unet"
    elif breakage in ("corrupt_unet", "corrupt_unet_unchecked"):
        weights = next((path / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
        named = weights
        if breakage == "corrupt_unet_unchecked":
            _rewrite_json(path, checksums=None)
            named = path / "unet"
    elif breakage == "flipped_weights":
        weights = next((path / "unet").glob("*.safetensors"))
        data = bytearray(weights.read_bytes())
        data[-8] ^= 0x01  # one bit of the last weight: still a valid safetensors file
        weights.write_bytes(bytes(data))
        named = weights
    elif breakage == "mismatched_unet":
        _rewrite_json(path, channels=3)
        named = path / "unet"
    elif breakage in ("bad_sigma_data", "bad_time_scale"):
        meta = json.loads(meta_file.read_text())
        meta["network"][breakage.removeprefix("bad_")] = -1 if breakage == "bad_sigma_data" else "999"
        meta_file.write_text(json.dumps(meta))
    elif breakage == "bad_n_levels":
        _rewrite_json(path, n_levels=1.5)
    with pytest.raises(PriorFormatError, match=fragment) as info:
        load_prior(path)
    assert str(named) in str(info.value)


def test_lcss_prior_never_imports_the_plugin():
    code = (
        "import sys, lcss_prior.export, lcss_prior.model, lcss_prior.sampling;"
        "assert not any(m.startswith('threestudio') for m in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_export_killed_between_its_renames_is_recovered(exported, sde):
    """The previous prior sits in ``.prior.old-*/prior`` and ``prior/`` is gone (killed between the
    two renames): loading restores it, and the next export replaces it and leaves no leftovers."""
    net, folder = exported
    folder = Path(folder)
    hidden = folder.parent / ".prior.old-abc123"
    hidden.mkdir()
    os.replace(folder, hidden / "prior")
    (folder.parent / ".prior.tmp-def456").mkdir()  # a half-written new export of the killed run
    with pytest.warns(UserWarning, match="interrupted export; restored"):
        prior = load_prior(folder)
    assert prior.captions == list(CAPTIONS) and folder.is_dir()
    export_prior(net, sde, folder, CAPTIONS, 8, 1, 3, {"method": "lcss", "steps": 1}, n_levels=17, overwrite=True)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["prior"]
