"""Sample-quality metrics with an injected feature extractor: FID, KID and classifier accuracy.

A feature extractor is any callable ``images [N, C, H, W] in [-1, 1] -> features [N, F]``, or an
object with such a ``features`` method. Two ship here:

* ``InceptionFeatures`` -- torchvision Inception-v3 pool3 (2048-d) loaded from a LOCAL torchvision
  weights file (``load_inception``), fed the network's own input convention (``[-1, 1]``, 299 px).
  These FIDs are comparable with each other, NOT with published FIDs: those use the TF FID
  Inception (pytorch-fid's port: other blocks, a 1008-way classifier), which is not implemented
  here, and whose weights ``load_inception`` refuses by name.
* ``FeatureClassifier`` -- a small CNN trained on a data set's labels (``train_feature_extractor``,
  ``load_feature_extractor``): in-domain penultimate features for ``shapes`` and ``digits``, and a
  classifier whose accuracy on generated samples measures "recognisable samples of every caption".

Equations:

* Frechet distance: ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``.
* KID: unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x . y / F + 1)^3``,
  ``(1/(m(m-1))) sum_{i != j} [k(a_i, a_j) + k(b_i, b_j)] - (2/m^2) sum_{i,j} k(a_i, b_j)``,
  averaged over random subsets of size ``m``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

FeatureExtractor = Callable[[Tensor], Tensor]

# --------------------------------------------------------------------------------------------------
# FID / KID from features
# --------------------------------------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``.

    ``(sigma1 sigma2)^{1/2}`` is scipy's ``sqrtm``. Its round-off noise is handled: if the root is
    not finite (singular product) ``eps I`` is added to both covariances; a complex root is
    accepted as real when the imaginary part of its diagonal is below ``1e-3`` (relative to the
    trace), otherwise it is an error. The result is clipped at ``0``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, abs(np.trace(sigma1)) + abs(np.trace(sigma2)))
        if np.abs(np.diagonal(covmean).imag).max() > 1e-3 * scale:
            raise ValueError(
                f"sqrtm(sigma1 sigma2) has a large imaginary part ({np.abs(covmean.imag).max():.3g}); "
                "the covariances are not valid (not symmetric positive semi-definite?)"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def _as_numpy(features: Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {array.shape}")
    return array.astype(np.float64)


def feature_statistics(features: Float[Tensor, "N F"] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` of the features (float64)."""
    array = _as_numpy(features)
    if array.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def fid_from_features(
    features_a: Float[Tensor, "N F"] | np.ndarray, features_b: Float[Tensor, "M F"] | np.ndarray
) -> float:
    """FID: ``frechet_distance`` between the Gaussian fits of two feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """``k(x, y) = (x . y / F + coef0)^degree`` for all pairs (KID's kernel)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 of two equally sized sets with ``polynomial_kernel`` (diagonals excluded)."""
    m = a.shape[0]
    if b.shape[0] != m or m < 2:
        raise ValueError(
            f"mmd2_unbiased needs two sets of equal size >= 2, got {a.shape[0]} and {b.shape[0]}"
        )
    k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2.0 * k_ab.mean())


def kid_from_features(
    features_a: Float[Tensor, "N F"] | np.ndarray,
    features_b: Float[Tensor, "M F"] | np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation over ``n_subsets`` random subsets (without replacement,
    size ``min(subset_size, N, M)``) of ``mmd2_unbiased``."""
    a, b = _as_numpy(features_a), _as_numpy(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2 or n_subsets < 1:
        raise ValueError(
            f"KID needs subsets of >= 2 samples and n_subsets >= 1 (m={m}, n_subsets={n_subsets})"
        )
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(
            a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)]
        )
        for _ in range(int(n_subsets))
    ]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------------------------------
# feature extraction from images
# --------------------------------------------------------------------------------------------------


def _extractor_fn(extractor: Any) -> FeatureExtractor:
    return extractor.features if hasattr(extractor, "features") else extractor


def extract_features(
    images: Float[Tensor, "N C H W"] | Sequence[Tensor],
    extractor: Any,
    batch_size: int = 64,
    progress: bool = False,
) -> Float[Tensor, "N F"]:
    """Features ``[N, F]`` of images in ``[-1, 1]`` (a tensor or an iterable of batches), computed
    in batches without gradient."""
    fn = _extractor_fn(extractor)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    out = []
    with torch.no_grad():
        for batch in tqdm(batches, desc="features", disable=not progress, leave=False):
            feats = fn(batch)
            if feats.dim() != 2:
                raise ValueError(f"the feature extractor must return [N, F], got shape {tuple(feats.shape)}")
            out.append(feats.detach().float().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


def compute_fid(
    images_a: Float[Tensor, "N C H W"],
    images_b: Float[Tensor, "M C H W"],
    extractor: Any,
    batch_size: int = 64,
) -> float:
    """FID between two image sets in ``[-1, 1]`` under the injected feature ``extractor``."""
    return fid_from_features(
        extract_features(images_a, extractor, batch_size), extract_features(images_b, extractor, batch_size)
    )


def compute_kid(
    images_a: Float[Tensor, "N C H W"],
    images_b: Float[Tensor, "M C H W"],
    extractor: Any,
    batch_size: int = 64,
    **kid_kwargs: Any,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two image sets under the injected ``extractor``."""
    return kid_from_features(
        extract_features(images_a, extractor, batch_size),
        extract_features(images_b, extractor, batch_size),
        **kid_kwargs,
    )


def fid_kid_between_folders(
    folder_a: str | os.PathLike,
    folder_b: str | os.PathLike,
    extractor: Any,
    resolution: int,
    channels: int = 3,
    batch_size: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID between all images below two folders under ``extractor``:
    ``{"fid", "kid_mean", "kid_std", "n_a", "n_b"}``. Images are read by
    ``lcss_prior.data.ImageFolderDataset`` (one class per folder; resized and centre-cropped to
    ``resolution``, ``channels`` 1 or 3)."""
    from lcss_prior.data import ImageFolderDataset

    feats = []
    for folder in (folder_a, folder_b):
        dataset = ImageFolderDataset(folder, resolution, channels=channels, class_from_subfolder=False)
        images, _ = stack_dataset(dataset, None, progress=False)
        feats.append(extract_features(images, extractor, batch_size))
    feats_a, feats_b = feats
    kid_mean, kid_std = kid_from_features(feats_a, feats_b, kid_subsets, kid_subset_size, seed)
    return {
        "fid": fid_from_features(feats_a, feats_b),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_a": int(feats_a.shape[0]),
        "n_b": int(feats_b.shape[0]),
    }


# --------------------------------------------------------------------------------------------------
# Inception-v3 pool3 features from a local weights file
# --------------------------------------------------------------------------------------------------

class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 up to pool3: images in ``[-1, 1]`` (1 or 3 channels, any size) are
    resized to 299x299 (bilinear) and embedded as the 2048-d average-pooled features.

    Input convention: torchvision's Inception-v3 weights were ported from TensorFlow and expect
    ``2 rgb - 1``; with ``transform_input=True`` torchvision converts ImageNet-normalised input to
    that itself. Here the network is built with ``transform_input=False`` and fed ``[-1, 1]``
    directly: the same numbers, without a normalisation round trip (tests/test_metrics.py checks the
    equality against torchvision's own path)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if getattr(network, "transform_input", False):
            raise ValueError("InceptionFeatures feeds [-1, 1] itself: build the network with transform_input=False")
        network.fc = nn.Identity()
        self.network = network
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:  # frozen: always eval
        return super().train(False)

    def features(self, images: Float[Tensor, "N C H W"]) -> Float[Tensor, "N 2048"]:
        """pool3 features ``[N, 2048]``."""
        return self.forward(images)

    def forward(self, images: Float[Tensor, "N C H W"]) -> Float[Tensor, "N 2048"]:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        dtype = next(self.network.parameters()).dtype
        x = images.to(dtype).expand(-1, 3, -1, -1)
        return self.network(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Inception-v3 pool3 extractor with weights from the LOCAL file ``path`` (a torchvision
    ``inception_v3`` state dict; auxiliary-classifier keys are ignored). Nothing is downloaded.
    pytorch-fid's FID Inception weights (a 1008-way classifier and other blocks) are refused by
    name: their FIDs would need that network, which is not implemented here."""
    from torchvision.models import inception_v3

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {path} does not exist; give a local torchvision inception_v3 "
            "state dict (nothing is downloaded)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    fc = state.get("fc.weight")
    if isinstance(fc, Tensor) and fc.shape[0] == 1008:
        raise ValueError(
            f"{path} holds the TF FID Inception weights (pytorch-fid's port, 1008-way classifier): its blocks "
            "differ from torchvision's inception_v3 and it is not implemented here, so FIDs comparable with "
            "published ones are not available; give torchvision inception_v3 weights (FIDs comparable with "
            "each other) or an in-domain feature classifier"
        )
    network = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a torchvision inception_v3 state dict: {e}") from e
    return InceptionFeatures(network).to(device)


# --------------------------------------------------------------------------------------------------
# in-domain feature extractor: a small CNN classifier
# --------------------------------------------------------------------------------------------------

CLASSIFIER_FORMAT = "lcss-feature-classifier"
CLASSIFIER_VERSION = 1


class FeatureClassifier(nn.Module):
    """Small CNN classifier ``images [N, C, H, W] in [-1, 1] -> logits [N, K]``; its penultimate
    activations (``features``, ``[N, feature_dim]``) are the in-domain features for FID/KID.
    Inputs of another size are resized (bilinear) to the training ``resolution``."""

    def __init__(
        self, channels: int, resolution: int, num_classes: int, width: int = 32, feature_dim: int = 128
    ) -> None:
        super().__init__()
        self.config = {
            "channels": int(channels),
            "resolution": int(resolution),
            "num_classes": int(num_classes),
            "width": int(width),
            "feature_dim": int(feature_dim),
        }

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(channels, width, 1),
            *block(width, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def _prepare(self, images: Tensor) -> Tensor:
        c, r = self.config["channels"], self.config["resolution"]
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must be [N, {c}, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return images.to(self.head.weight.dtype)

    def features(self, images: Float[Tensor, "N C H W"]) -> Float[Tensor, "N F"]:
        """Penultimate activations ``[N, feature_dim]``."""
        return self.body(self._prepare(images))

    def forward(self, images: Float[Tensor, "N C H W"]) -> Float[Tensor, "N K"]:
        return self.head(self.features(images))


def balanced_indices(labels: Int[Tensor, " N"], n: int, seed: int = 0) -> list[int]:
    """``n`` of ``range(len(labels))`` chosen so that every label is represented as equally as
    possible (round robin over the labels, each label's items in a seeded random order); sorted.
    A data set stored class by class then gives all classes, not the first one or two."""
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(int(seed))
    queues = [idx[torch.randperm(len(idx), generator=g)].tolist() for idx in
              (torch.nonzero(labels == k).flatten() for k in labels.unique())]
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return sorted(chosen)


def stack_dataset(
    dataset: Any, max_items: int | None = None, progress: bool = False, seed: int = 0
) -> tuple[Float[Tensor, "N C H W"], Int[Tensor, " N"]]:
    """Items of a data set of ``{"image", "label"}`` dicts as one image tensor and one label tensor:
    all of them, or ``max_items`` chosen class-balanced with ``seed`` (:func:`balanced_indices`,
    from the data set's ``labels`` attribute when it has one, else from every item's label)."""
    size = len(dataset)
    if size == 0:
        raise ValueError("the data set is empty")
    if max_items is None or int(max_items) >= size:
        indices = list(range(size))
    else:
        labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = [int(dataset[i]["label"]) for i in range(size)]
        indices = balanced_indices(torch.as_tensor(labels), int(max_items), seed)
    images, labels = [], []
    for i in tqdm(indices, desc="loading data", disable=not progress, leave=False):
        item = dataset[i]
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise KeyError(f"data set items must be dicts with 'image' and 'label'; item {i} is not")
        images.append(torch.as_tensor(item["image"], dtype=torch.float32))
        labels.append(int(item["label"]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def classifier_accuracy(
    classifier: FeatureClassifier,
    images: Float[Tensor, "N C H W"],
    labels: Int[Tensor, " N"],
    batch_size: int = 256,
) -> tuple[float, dict[int, float]]:
    """Overall accuracy of ``classifier`` on ``(images, labels)`` and the accuracy per label (the
    "recognisable caption" score when ``images`` are samples generated for ``labels``)."""
    labels = torch.as_tensor(labels).long().cpu()
    with torch.no_grad():
        predictions = torch.cat([classifier(b).argmax(dim=1).cpu() for b in images.split(batch_size)])
    correct = predictions == labels
    per_label = {int(k): float(correct[labels == k].float().mean()) for k in labels.unique()}
    return float(correct.float().mean()), per_label


def train_feature_extractor(
    dataset: Any,
    steps: int = 500,
    path: str | os.PathLike | None = None,
    eval_dataset: Any | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 32,
    feature_dim: int = 128,
    noise_augment: float = 0.05,
    max_items: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FeatureClassifier:
    """Train a ``FeatureClassifier`` on the labels of ``dataset`` (items ``{"image", "label"}``,
    attributes ``channels``, ``resolution`` and optionally ``captions``) by AdamW on the
    cross-entropy for ``steps`` minibatch steps (cosine learning-rate decay; images perturbed by Gaussian noise of std
    ``noise_augment`` so that slightly noisy samples are still classified). Accuracy on
    ``eval_dataset`` (if given) and on the training data is stored in ``classifier.metrics``; the
    classifier is saved to ``path`` (if given) for ``load_feature_extractor``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    generator = torch.Generator().manual_seed(int(seed))
    images, labels = stack_dataset(dataset, max_items, progress, seed=seed)
    captions = list(getattr(dataset, "captions", []) or [])
    num_classes = max(len(captions), int(labels.max()) + 1)
    channels = int(getattr(dataset, "channels", images.shape[1]))
    resolution = int(getattr(dataset, "resolution", images.shape[-1]))
    torch.manual_seed(int(seed))  # parameter initialisation
    classifier = FeatureClassifier(channels, resolution, num_classes, width, feature_dim)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    classifier.train()
    bar = tqdm(range(steps), desc="training feature classifier", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        x = images[idx]
        if noise_augment > 0:
            x = x + noise_augment * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(classifier(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    classifier.eval()
    metrics = {"train_accuracy": classifier_accuracy(classifier, images, labels)[0]}
    if eval_dataset is not None:
        eval_images, eval_labels = stack_dataset(eval_dataset, None, progress)
        metrics["eval_accuracy"] = classifier_accuracy(classifier, eval_images, eval_labels)[0]
    classifier.metrics = metrics
    classifier.captions = captions
    if path is not None:
        save_feature_extractor(classifier, path, training={"steps": steps, "lr": lr, "seed": seed})
    return classifier


def save_feature_extractor(
    classifier: FeatureClassifier, path: str | os.PathLike, training: dict[str, Any] | None = None
) -> Path:
    """Save a ``FeatureClassifier`` (config, weights, captions, metrics) to one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CLASSIFIER_FORMAT,
            "version": CLASSIFIER_VERSION,
            "config": classifier.config,
            "captions": list(getattr(classifier, "captions", [])),
            "metrics": dict(getattr(classifier, "metrics", {})),
            "training": dict(training or {}),
            "state_dict": classifier.state_dict(),
        },
        path,
    )
    return path


def is_feature_classifier_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a classifier saved by ``save_feature_extractor``."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return False
    return isinstance(blob, dict) and blob.get("format") == CLASSIFIER_FORMAT


def load_feature_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureClassifier:
    """Load a classifier saved by ``train_feature_extractor`` / ``save_feature_extractor`` (eval
    mode, frozen); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"feature extractor file {path} does not exist (train one with train_feature_extractor)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} cannot be read as a saved feature classifier: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path} is not a {CLASSIFIER_FORMAT!r} file")
    if blob.get("version") != CLASSIFIER_VERSION:
        raise ValueError(f"{path}: version {blob.get('version')!r} is not supported ({CLASSIFIER_VERSION})")
    classifier = FeatureClassifier(**blob["config"])
    classifier.load_state_dict(blob["state_dict"])
    classifier.captions = list(blob.get("captions", []))
    classifier.metrics = dict(blob.get("metrics", {}))
    classifier.requires_grad_(False)
    classifier.eval()
    return classifier.to(device)


def load_extractor(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> FeatureClassifier | InceptionFeatures:
    """A feature extractor from a local file: a classifier saved by ``train_feature_extractor``
    (recognised by its format tag) or, otherwise, torchvision Inception-v3 weights."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"feature weights file {path} does not exist (an Inception-v3 state dict or a classifier saved "
            "by lcss_prior.metrics.save_feature_extractor)"
        )
    if is_feature_classifier_file(path):
        return load_feature_extractor(path, device)
    return load_inception(path, device)
