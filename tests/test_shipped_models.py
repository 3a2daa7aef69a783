"""The models shipped in ``models/``: they load through the public loaders, their manifests say how
they were made and how good they are, and a missing or corrupted file is one clear error naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lcss_prior.export import PriorFormatError, load_prior
from lcss_prior.manifest import MANIFEST, ManifestError, list_files, sha256, verify_manifest
from threestudio_ssd.depth import load_depth_estimator
from threestudio_ssd.shipped import DEPTH, PRIOR, SHIPPED, repo_relative, shipped_model

WEIGHTS = {PRIOR: "unet/diffusion_pytorch_model.safetensors", DEPTH: "model.safetensors"}


@pytest.mark.parametrize("name", SHIPPED)
def test_manifest_lists_every_file_with_its_checksum_and_provenance(name):
    folder = shipped_model(name)
    manifest = verify_manifest(folder)
    assert manifest is not None and sorted(manifest["files"]) == list_files(folder)
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(folder / rel)
    for key in ("command", "commit", "trained", "quality"):
        assert manifest.get(key), f"{name}: MANIFEST.json lacks {key!r}"
    assert len(manifest["commit"]) == 40
    assert repo_relative(folder) == f"models/{name}"


def test_shipped_prior_loads_and_is_the_shapes_prior():
    from lcss_prior.data.shapes import CAPTIONS

    prior = load_prior(shipped_model(PRIOR))
    assert prior.captions == list(CAPTIONS) and prior.resolution == 32 and prior.channels == 3
    quality = json.loads((shipped_model(PRIOR) / MANIFEST).read_text())["quality"]
    assert quality["caption_accuracy"] > 0.5  # an in-domain classifier names most samples' captions
    x = torch.zeros(2, 3, 32, 32)
    eps = prior.eps(x, torch.full((2,), 0.5), torch.tensor([0, 4]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_shipped_depth_model_loads_and_has_the_right_sign():
    estimator = load_depth_estimator(shipped_model(DEPTH))
    assert estimator.output_kind == "relative_inverse_depth"
    quality = json.loads((shipped_model(DEPTH) / MANIFEST).read_text())["quality"]
    assert quality["held_out_foreground_pearson"] > 0.5  # positive: relief the right way round
    assert estimator(torch.rand(1, 3, 64, 64)).shape == (1, 64, 64)


def _copy(name, tmp_path):
    dest = tmp_path / name
    shutil.copytree(shipped_model(name), dest)
    return dest


LOADERS = {PRIOR: load_prior, DEPTH: load_depth_estimator}
ERRORS = {PRIOR: PriorFormatError, DEPTH: ManifestError}


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_weights_are_one_clear_error_naming_the_file(tmp_path, name, damage):
    folder = _copy(name, tmp_path)
    weights = folder / WEIGHTS[name]
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        expected = "corrupted"
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 3]))
        expected = "corrupted"
    else:
        weights.unlink()
        expected = "missing"
    with pytest.raises(ERRORS[name], match=rf"{weights.name}.*{expected}|{expected}.*{weights.name}") as info:
        LOADERS[name](folder)
    assert str(weights) in str(info.value)
    # nothing was rewritten: the other files are as shipped
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel, entry in manifest["files"].items():
        if rel != WEIGHTS[name]:
            assert sha256(folder / rel) == entry["sha256"]


def test_corrupt_manifest_is_named(tmp_path):
    folder = _copy(PRIOR, tmp_path)
    (folder / MANIFEST).write_text('{"files": ')
    with pytest.raises(PriorFormatError, match="MANIFEST.json is not valid JSON"):
        load_prior(folder)


def test_folder_without_manifest_still_loads(tmp_path):
    folder = _copy(DEPTH, tmp_path)
    (folder / MANIFEST).unlink()
    assert verify_manifest(folder) is None
    load_depth_estimator(folder)


def test_unknown_shipped_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="shapes-lcss-32"):
        shipped_model("sd-2-1")
