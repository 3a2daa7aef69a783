"""Every shipped YAML goes through threestudio's ``load_config`` and each section through
``parse_structured`` of the registered class's ``Config`` (so an unknown or misspelt key fails);
``sds-*.yaml`` differ from their ``steindreamer-*.yaml`` twins in ``guidance.estimator`` only."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .conftest import REPO

pytestmark = pytest.mark.integration

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXAMPLES = {  # example configs -> the names they need from an extension that cannot be installed here
    "steindreamer-gaussian-splatting.example.yaml": ["gaussian-splatting", "diff-gaussian-rasterizer-advanced"],
}
SECTIONS = ("geometry", "material", "background", "renderer", "guidance", "prompt_processor")

# values the configs leave to the user (``???``)
OVERRIDES = [
    "system.prompt_processor.prompt=a red cube",
    "system.geometry_convert_from=coarse/ckpts/last.ckpt",
    "system.guidance.prior_path=some/prior",
    "system.guidance.depth_estimator_path=some/dpt",
]


def has_key(cfg, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    return node is not None and leaf in node.keys()  # `in node` is False for ??? values


def parse_all(ts, path: Path, extra: list[str] = ()):
    """``load_config`` + ``parse_structured`` of the data, system and every system section."""
    from threestudio.data.uncond import RandomCameraDataModuleConfig
    from threestudio.utils.config import load_config, parse_structured

    raw = OmegaConf.load(path)
    overrides = [o for o in OVERRIDES if has_key(raw, o.split("=")[0])]
    cfg = load_config(str(path), cli_args=overrides + list(extra))
    assert cfg.data_type == "stein-random-camera-datamodule"  # resumable cameras (data.py)
    parse_structured(RandomCameraDataModuleConfig, cfg.data)
    system_cls = ts.find(cfg.system_type)
    system_cfg = parse_structured(system_cls.Config, cfg.system)
    parsed = {}
    for section in SECTIONS:
        name = system_cfg[f"{section}_type"]
        parsed[section] = parse_structured(ts.find(name).Config, system_cfg[section])
    return cfg, parsed


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_through_threestudio(threestudio_ts, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_config creates outputs/<name>/<tag>
    if path.name in EXAMPLES:
        raw = OmegaConf.load(path)
        foreign = [
            raw.system[f"{s}_type"]
            for s in ("geometry", "renderer")
            if raw.system[f"{s}_type"] not in threestudio_ts.__modules__
        ]
        if foreign:
            # The 3DGS extension (CUDA-only, not on a package index) cannot be installed here, so
            # its classes are absent: check that they are the ONLY absent names (nothing of ours
            # or of threestudio's is misspelt) and that our own sections parse. The example is not
            # run here; docs/threestudio.md says what of it is supported.
            from threestudio.utils.config import parse_structured

            assert sorted(foreign) == sorted(EXAMPLES[path.name]), foreign
            parse_structured(threestudio_ts.find(raw.system.guidance_type).Config, raw.system.guidance)
            for section in ("system", "system.prompt_processor", "system.material", "system.background"):
                assert OmegaConf.select(raw, f"{section}_type") in threestudio_ts.__modules__, section
            return
    cfg, parsed = parse_all(threestudio_ts, path)
    if cfg.system_type == "steindreamer-system":
        assert cfg.system.stage in ("coarse", "geometry", "texture")
        guidance = parsed["guidance"]
        # every loss the guidance can return has its lambda
        assert "lambda_ssd" in cfg.system.loss
        if guidance.estimator == "ssd" and guidance.mu_mode == "learned":
            assert "lambda_mu" in cfg.system.loss
        if guidance.estimator == "vsd":
            assert "lambda_vsd_particle" in cfg.system.loss


def test_unknown_key_is_rejected(threestudio_ts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / "steindreamer-cpu-shapes.yaml"
    parse_all(threestudio_ts, path)
    with pytest.raises(Exception, match="mask_treshold"):
        parse_all(threestudio_ts, path, ["system.guidance.mask_treshold=0.3"])


@pytest.mark.parametrize("stem", ["sd", "sd-scene", "sd-neus", "sd-geometry", "sd-texture"])
def test_sds_twins_differ_only_in_the_estimator(stem):
    ssd = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / f"steindreamer-{stem}.yaml"))
    sds = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / f"sds-{stem}.yaml"))
    assert (ssd["system"]["guidance"]["estimator"], sds["system"]["guidance"]["estimator"]) == ("ssd", "sds")
    assert (ssd["name"], sds["name"]) == (f"steindreamer-{stem}", f"sds-{stem}")
    for cfg in (ssd, sds):
        cfg["system"]["guidance"]["estimator"] = cfg["name"] = None
    assert ssd == sds


def test_cpu_twins_differ_only_in_the_estimator_and_its_own_keys():
    """``sds-cpu-shapes.yaml`` and ``vsd-cpu-shapes.yaml`` are ``steindreamer-cpu-shapes.yaml`` but
    for the estimator, the depth model they do not use, and VSD's own keys (its ``vsd_*``
    settings, ``lambda_vsd_particle`` and the particle model's learning rate)."""

    def load(stem):
        return OmegaConf.to_container(OmegaConf.load(REPO / "configs" / f"{stem}-cpu-shapes.yaml"))

    ssd, sds, vsd = load("steindreamer"), load("sds"), load("vsd")
    estimators = [c["system"]["guidance"]["estimator"] for c in (ssd, sds, vsd)]
    assert estimators == ["ssd", "sds", "vsd"]
    assert sds["system"]["guidance"]["depth_estimator_path"] is None
    vsd_keys = sorted(k for k in vsd["system"]["guidance"] if k.startswith("vsd_"))
    assert vsd_keys == [
        "vsd_camera_dropout",
        "vsd_camera_hidden_dim",
        "vsd_guidance_scale",
        "vsd_lora_rank",
        "vsd_seed",
    ]
    assert vsd["system"]["loss"].pop("lambda_vsd_particle") == 1.0
    assert (
        vsd["system"]["optimizer"]["params"]["guidance"]["lr"]
        < ssd["system"]["optimizer"]["params"]["guidance"]["lr"]
    )
    for key in vsd_keys:
        del vsd["system"]["guidance"][key]
    for cfg in (ssd, sds, vsd):
        cfg["name"] = None
        cfg["system"]["guidance"]["estimator"] = cfg["system"]["guidance"]["depth_estimator_path"] = None
        cfg["system"]["optimizer"]["params"]["guidance"]["lr"] = None
    assert ssd == sds == vsd
