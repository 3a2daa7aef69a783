"""FID/KID with injected features, the Inception loader, the in-domain classifier, ``lcss-prior eval``.

Statistical checks use fixed seeds and Monte-Carlo tolerances, each paired with a wrong variant
that the same check must flag:
* the Frechet distance equals an independent closed form (and the FID of samples of two Gaussians
  converges to it), while the "commuting" shortcut ``sqrt(S1) sqrt(S2)`` is flagged;
* KID's unbiased MMD^2 has mean zero for equal distributions, while the biased V-statistic is
  flagged; for different distributions small-subset means agree with a large-sample value;
* the digits classifier reaches high held-out accuracy, and one trained on shuffled labels is flagged.
"""

from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from lcss_prior import metrics
from lcss_prior.data import DigitsDataset, build_dataset
from lcss_prior.evaluate import METRICS, add_cli_arguments, cli_main, evaluate_prior, format_table
from lcss_prior.export import export_prior, load_prior
from lcss_prior.metrics import (
    FeatureClassifier,
    InceptionFeatures,
    classifier_accuracy,
    compute_fid,
    compute_kid,
    extract_features,
    feature_statistics,
    fid_from_features,
    fid_kid_between_folders,
    frechet_distance,
    kid_from_features,
    load_extractor,
    load_feature_extractor,
    load_inception,
    mmd2_unbiased,
    polynomial_kernel,
    train_feature_extractor,
)
from lcss_prior.model import EpsNetwork, build_unet
from lcss_prior.sde import build_sde

N_SE = 5.0


# ----- Frechet distance ----------------------------------------------------------------------------


def _spd(seed: int, d: int = 4) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _reference_frechet(mu1, s1, mu2, s2) -> float:
    """Independent form: tr((S1^{1/2} S2 S1^{1/2})^{1/2}) through symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


def _commuting_shortcut(mu1, s1, mu2, s2) -> float:
    """Wrong on purpose: sqrt(S1 S2) replaced by sqrt(S1) sqrt(S2), true only if they commute."""
    cross = scipy.linalg.sqrtm(s1) @ scipy.linalg.sqrtm(s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * cross.real))


MU1, MU2 = np.zeros(4), np.array([0.5, -0.3, 0.2, 0.0])
S1, S2 = _spd(0), _spd(1)


def test_frechet_distance_closed_forms():
    expected = _reference_frechet(MU1, S1, MU2, S2)
    assert frechet_distance(MU1, S1, MU2, S2) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert abs(_commuting_shortcut(MU1, S1, MU2, S2) - expected) > 1e-3  # S1 and S2 do not commute
    # diagonal (commuting) covariances: ||mu1 - mu2||^2 + sum (sigma1 - sigma2)^2
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    diag = frechet_distance(np.ones(3), np.diag(v1), np.zeros(3), np.diag(v2))
    assert diag == pytest.approx(3 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    assert frechet_distance(MU1, S1, MU1, S1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_handles_singular_and_rejects_invalid_covariances():
    feats = np.random.default_rng(0).normal(size=(5, 10))  # 5 samples in 10-D: singular covariance
    value = fid_from_features(feats, feats + 0.1)
    assert math.isfinite(value) and value == pytest.approx(0.1, rel=1e-3)  # pure mean shift 10 * 0.01
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    bad = -np.eye(2)  # not positive semi-definite: sqrt(S1 S2) is genuinely complex
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_distance(np.zeros(2), np.diag([1.0, 2.0]), np.zeros(2), bad)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("frechet", [frechet_distance, _commuting_shortcut], ids=["ours", "wrong"])
def test_fid_of_gaussian_samples_converges_to_closed_form(frechet, monkeypatch):
    monkeypatch.setattr(metrics, "frechet_distance", frechet)
    rng = np.random.default_rng(0)
    l1, l2 = np.linalg.cholesky(S1), np.linalg.cholesky(S2)
    n, reps = 3000, 20
    values = [
        metrics.fid_from_features(
            MU1 + rng.normal(size=(n, 4)) @ l1.T,
            MU2 + rng.normal(size=(n, 4)) @ l2.T,
        )
        for _ in range(reps)
    ]
    z = (np.mean(values) - _reference_frechet(MU1, S1, MU2, S2)) / (np.std(values, ddof=1) / math.sqrt(reps))
    if frechet is _commuting_shortcut:
        assert abs(z) > N_SE
    else:
        assert abs(z) < N_SE, f"FID of samples is {z:.1f} standard errors from the closed form"


def test_feature_statistics_and_errors():
    feats = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(feats[:1])
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        feature_statistics(feats[:, 0])


# ----- KID ---------------------------------------------------------------------------------------


def _mmd2_biased(a, b):
    """Wrong on purpose: the V-statistic (diagonal kernel terms kept), biased upwards."""
    return float(
        polynomial_kernel(a, a).mean() + polynomial_kernel(b, b).mean() - 2 * polynomial_kernel(a, b).mean()
    )


@pytest.mark.parametrize("mmd2", [mmd2_unbiased, _mmd2_biased], ids=["unbiased", "biased"])
def test_kid_is_unbiased_for_equal_distributions(mmd2):
    rng = np.random.default_rng(1)
    values = [mmd2(rng.normal(size=(30, 8)), rng.normal(size=(30, 8))) for _ in range(400)]
    z = np.mean(values) / (np.std(values, ddof=1) / math.sqrt(len(values)))
    if mmd2 is _mmd2_biased:
        assert z > N_SE
    else:
        assert abs(z) < N_SE, f"unbiased MMD^2 has mean {z:.1f} standard errors from 0"


@pytest.mark.parametrize("mmd2", [mmd2_unbiased, _mmd2_biased], ids=["unbiased", "biased"])
def test_kid_does_not_depend_on_subset_size_for_different_distributions(mmd2):
    """Unbiased: subsets of 20 and of 200 estimate the same MMD^2; the V-statistic's bias ~ 1/m."""
    rng = np.random.default_rng(2)

    def draws(m, reps):
        return [mmd2(rng.normal(size=(m, 6)), 0.2 + 1.1 * rng.normal(size=(m, 6))) for _ in range(reps)]

    small, large = draws(20, 300), draws(200, 30)
    se = math.hypot(np.std(small, ddof=1) / math.sqrt(300), np.std(large, ddof=1) / math.sqrt(30))
    z = (np.mean(small) - np.mean(large)) / se
    assert np.mean(large) > 10 * np.std(large, ddof=1) / math.sqrt(30)  # clearly different distributions
    if mmd2 is _mmd2_biased:
        assert z > N_SE
    else:
        assert abs(z) < N_SE, f"small- and large-subset MMD^2 differ by {z:.1f} standard errors"


def test_kid_from_features_subsets():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 5, generator=g), torch.randn(50, 5, generator=g) + 1.0
    mean, std = kid_from_features(a, b, n_subsets=20, subset_size=1000, seed=0)  # size capped at 50
    assert mean > 0 and std > 0
    assert kid_from_features(a, b, n_subsets=20, seed=0) == (mean, std)  # seeded
    mean_full, std_full = kid_from_features(a[:50], b, n_subsets=3, subset_size=50)
    assert (
        mean_full == pytest.approx(mmd2_unbiased(a[:50].double().numpy(), b.double().numpy()))
        and std_full < 1e-12
    )
    with pytest.raises(ValueError, match="feature dimensions differ"):
        kid_from_features(a, b[:, :4])
    with pytest.raises(ValueError, match="subsets of >= 2"):
        kid_from_features(a[:1], b)


def test_compute_fid_and_kid_on_images_with_an_injected_extractor():
    g = torch.Generator().manual_seed(0)
    images_a = torch.rand(40, 1, 4, 4, generator=g) * 2 - 1
    images_b = (torch.rand(40, 1, 4, 4, generator=g) * 2 - 1) * 0.5

    def extractor(x):
        return x.flatten(1)[:, :5]

    assert compute_fid(images_a, images_b, extractor, batch_size=7) == pytest.approx(
        fid_from_features(images_a.flatten(1)[:, :5], images_b.flatten(1)[:, :5])
    )
    assert compute_fid(images_a, images_a, extractor) == pytest.approx(0.0, abs=1e-6)
    assert compute_kid(images_a, images_b, extractor, n_subsets=5)[0] > 0
    with pytest.raises(ValueError, match=r"must return \[N, F\]"):
        extract_features(images_a, lambda x: x)


def test_fid_kid_between_folders(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {
        "a": rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        "b": rng.integers(60, 200, (10, 8, 8), dtype=np.uint8),
    }
    for name, arrays in pixels.items():
        (tmp_path / name).mkdir()
        for i, arr in enumerate(arrays):
            Image.fromarray(arr, mode="L").save(tmp_path / name / f"{i:03d}.png")

    def extractor(x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)  # 4 features

    out = fid_kid_between_folders(
        tmp_path / "a", tmp_path / "b", extractor, resolution=8, channels=1, kid_subsets=5
    )
    ref = {k: extractor(torch.from_numpy(v).float()[:, None] / 127.5 - 1) for k, v in pixels.items()}
    assert out["fid"] == pytest.approx(fid_from_features(ref["a"], ref["b"]), rel=1e-5)
    assert (out["n_a"], out["n_b"]) == (12, 10) and out["kid_std"] >= 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid_kid_between_folders(tmp_path / "missing", tmp_path / "b", extractor, resolution=8)


# ----- Inception -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    return path


def test_inception_loader_with_random_weights(inception_weights, tmp_path):
    extractor = load_inception(inception_weights)
    assert isinstance(extractor, InceptionFeatures) and not extractor.training
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # grey, small
    feats = extract_features(images, extractor)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])
    assert isinstance(load_extractor(inception_weights), InceptionFeatures)
    with pytest.raises(FileNotFoundError, match="feature weights file .*nope.pt does not exist"):
        load_extractor(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_inception(tmp_path / "pt_inception.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision inception_v3 state dict"):
        load_inception(tmp_path / "other.pth")
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception-2015-12-05.pth")
    with pytest.raises(ValueError, match="TF FID Inception weights .*not implemented here"):
        load_inception(tmp_path / "pt_inception-2015-12-05.pth")


def test_inception_input_convention_is_torchvisions(tmp_path):
    """The same (random, torchvision-initialised) weights through torchvision's own path --
    ImageNet-normalised [0, 1] input with transform_input=True, which converts it to what the
    TF-ported weights expect -- and through load_inception, which feeds [-1, 1] directly: the same
    features. ImageNet-normalised input without transform_input (the convention this replaced) is
    flagged by the same comparison."""
    import torch.nn.functional as F
    from torchvision.models import inception_v3

    torch.manual_seed(3)
    reference = inception_v3(weights=None, aux_logits=False, init_weights=True, transform_input=True)
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    ours = load_inception(tmp_path / "inception.pth")
    reference.fc = torch.nn.Identity()
    reference.eval()
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    rgb = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 0.5 + 0.5
    with torch.no_grad():
        expected = reference((rgb - mean) / std)
        old_convention = ours.network((rgb - mean) / std)
        got = ours(images)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert expected.norm() > 0 and rel(got, expected) < 1e-4, rel(got, expected)
    assert rel(old_convention, expected) > 1e-2, rel(old_convention, expected)


# ----- in-domain classifier ------------------------------------------------------------------------


class _ShuffledLabels(torch.utils.data.Dataset):
    """Wrong on purpose: the same images with permuted labels."""

    def __init__(self, dataset):
        self.dataset, self.channels, self.resolution = dataset, dataset.channels, dataset.resolution
        self.perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {"image": self.dataset[i]["image"], "label": self.dataset[int(self.perm[i])]["label"]}


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "digits.pt"
    train, test = DigitsDataset("train", 8), DigitsDataset("test", 8)
    clf = train_feature_extractor(
        train, steps=150, path=path, eval_dataset=test, width=16, batch_size=64, progress=False
    )
    return clf, path


def test_feature_classifier_learns_digits(digits_classifier):
    clf, _ = digits_classifier
    assert clf.metrics["eval_accuracy"] > 0.9, clf.metrics
    test = DigitsDataset("test", 8)
    overall, per_label = classifier_accuracy(clf, test.images, test.labels)
    assert overall == pytest.approx(clf.metrics["eval_accuracy"]) and sorted(per_label) == list(range(10))
    assert min(per_label.values()) > 0.7
    # inputs of another resolution are resized to the training one
    assert clf.features(torch.nn.functional.interpolate(test.images[:3], scale_factor=2)).shape == (3, 128)


def test_accuracy_check_flags_a_classifier_trained_on_shuffled_labels():
    train, test = DigitsDataset("train", 8), DigitsDataset("test", 8)
    clf = train_feature_extractor(
        _ShuffledLabels(train), steps=60, eval_dataset=test, width=16, progress=False
    )
    assert clf.metrics["eval_accuracy"] < 0.5


def test_feature_classifier_round_trip_and_errors(digits_classifier, tmp_path):
    clf, path = digits_classifier
    loaded = load_feature_extractor(path)
    assert isinstance(load_extractor(path), FeatureClassifier)
    images = DigitsDataset("test", 8).images[:5]
    torch.testing.assert_close(loaded.features(images), clf.features(images))
    assert loaded.captions == DigitsDataset.captions and loaded.metrics == clf.metrics
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feature_extractor(tmp_path / "none.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a 'lcss-feature-classifier' file"):
        load_feature_extractor(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"images must be \[N, 1, H, W\]"):
        clf.features(torch.zeros(2, 3, 8, 8))
    assert train_feature_extractor(
        DigitsDataset("test", 8), steps=3, width=8, progress=False
    ).metrics  # tiny runs
    with pytest.raises(KeyError, match="'image' and 'label'"):
        train_feature_extractor([{"image": torch.zeros(1, 8, 8)}], steps=1, progress=False)


# ----- lcss-prior eval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_prior_dir(tmp_path_factory):
    torch.manual_seed(0)
    sde = build_sde("vp")
    network = EpsNetwork(build_unet(8, 1, num_classes=10, preset="tiny"), sde, input_scaling="edm")
    folder = tmp_path_factory.mktemp("prior") / "digits"
    return export_prior(network, sde, folder, DigitsDataset.captions, 8, 1, 10, n_levels=17)


def _eval_args(*argv: str) -> argparse.Namespace:
    return add_cli_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_eval_cli_writes_report(digits_prior_dir, tmp_path, capsys):
    features, out = tmp_path / "features.pt", tmp_path / "report.json"
    args = _eval_args(
        "--prior", str(digits_prior_dir), "--data", "digits", "--metrics", "fid,kid,accuracy",
        "--n-samples", "20", "--steps", "2", "--method", "ode", "--features", str(features),
        "--train-features", "20", "--out", str(out),
    )  # fmt: skip
    report = cli_main(args)
    assert features.is_file()  # trained on the train split because it did not exist
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    m = saved["metrics"]
    assert {"fid", "kid_mean", "kid_std", "accuracy", "accuracy_min_caption", "accuracy_real"} <= set(m)
    assert set(m["accuracy_per_caption"]) == set(DigitsDataset.captions)
    assert m["fid"] > 0 and 0 <= m["accuracy"] <= 1
    assert m["kid_subset_size"] == 10 and m["kid_std"] > 0
    printed = capsys.readouterr().out
    assert "accuracy_per_caption[digit 7]" in printed and f"wrote {out}" in printed


def test_evaluate_prior_bpd(digits_prior_dir):
    prior = load_prior(digits_prior_dir)
    data = build_dataset("digits", 8, split="test")
    report = evaluate_prior(prior, data, ["bpd"], bpd_samples=1, bpd_tol=1e-2, progress=False)
    assert report["metrics"]["n_levels"] == 17 and report["metrics"]["bpd_n"] == 1
    assert math.isfinite(report["metrics"]["bpd"]) and "bpd" in format_table(report)
    assert set(METRICS) == {"bpd", "fid", "kid", "accuracy"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--metrics", "fid,is"], r"unknown metric\(s\) \['is'\]"),
        (["--metrics", "fid"], r"metrics \['fid'\] need --features PATH"),
        (["--metrics", "bpd", "--data", "imagenet"], "unknown data set 'imagenet'"),
        (["--metrics", "accuracy", "--features", "INCEPTION"], "accuracy needs an in-domain classifier"),
        (["--metrics", "fid", "--features", "MISSING"], "does not exist"),
    ],
)
def test_eval_cli_errors(digits_prior_dir, inception_weights, tmp_path, capsys, argv, message):
    argv = [
        a.replace("INCEPTION", str(inception_weights)).replace("MISSING", str(tmp_path / "no.pt"))
        for a in argv
    ]
    base = ["--prior", str(digits_prior_dir), "--n-samples", "4", "--steps", "1"]
    if "--data" not in argv:
        base += ["--data", "digits"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_eval_args(*base, *argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lcss-prior eval: error: ") and re.search(message, err), err


def test_eval_uses_the_split_the_prior_was_trained_with():
    """The digits split is a seeded permutation: a prior trained with ``--seed 1`` scored on the
    default seed-0 "test" split would be scored mostly on its own training images."""
    from types import SimpleNamespace

    from lcss_prior.data.digits import _split_indices
    from lcss_prior.evaluate import data_seed_for

    leak = np.intersect1d(_split_indices("train", 1), _split_indices("test", 0))
    assert leak.size > 0.7 * _split_indices("test", 0).size  # the bug this guards against
    assert np.intersect1d(_split_indices("train", 1), _split_indices("test", 1)).size == 0

    prior = SimpleNamespace(metadata={"training": {"data": "digits", "seed": 1}})
    assert data_seed_for(prior, "digits", None) == 1
    assert data_seed_for(prior, "digits", 1) == 1
    with pytest.raises(ValueError, match="--data-seed 0 differs.*trained with \\(1"):
        data_seed_for(prior, "digits", 0)
    assert data_seed_for(prior, "shapes", None) == 0  # another data set: the documented default
    assert data_seed_for(prior, "shapes", 3) == 3
    assert data_seed_for(SimpleNamespace(metadata={}), "digits", None) == 0


def test_real_images_are_a_seeded_class_balanced_subset():
    """A folder stored class by class: the first N items would all be class 0."""
    from lcss_prior.metrics import balanced_indices, stack_dataset

    class ByClass:
        labels = torch.arange(3).repeat_interleave(100)  # 100 of class 0, then 1, then 2

        def __len__(self):
            return 300

        def __getitem__(self, i):
            return {"image": torch.full((1, 2, 2), float(i)), "label": int(self.labels[i])}

    images, labels = stack_dataset(ByClass(), 30, seed=0)
    assert torch.bincount(labels).tolist() == [10, 10, 10]
    again, _ = stack_dataset(ByClass(), 30, seed=0)
    other, _ = stack_dataset(ByClass(), 30, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert len(set(images.flatten().tolist())) == 30  # no item twice
    assert stack_dataset(ByClass(), None)[1].tolist() == ByClass.labels.tolist()  # all, in order
    uneven = balanced_indices(torch.tensor([0] * 50 + [1] * 2), 10)
    assert sorted(torch.tensor([0] * 50 + [1] * 2)[uneven].tolist()) == [0] * 8 + [1] * 2
