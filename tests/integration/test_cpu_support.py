"""CPU support: placeholders only for missing packages, clear errors when one is used, CPU
devices in threestudio, and the launcher's argument and checkout handling."""

from __future__ import annotations

import sys

import pytest

from threestudio_ssd.launch import build_parser, find_threestudio_root

pytestmark = pytest.mark.integration


def test_placeholders_raise_clear_errors_and_real_packages_win(threestudio_ts):
    from threestudio_ssd.threestudio import cpu

    tcnn = sys.modules["tinycudann"]
    if not cpu.is_placeholder(tcnn):
        pytest.skip("tinycudann is really installed here")
    tcnn.free_temporary_memory()  # threestudio's cleanup() calls it: must be a no-op
    with pytest.raises(cpu.MissingDependencyError, match=r"'tinycudann\.Encoding'.*ProgressiveBandFrequency"):
        tcnn.Encoding(3, {"otype": "HashGrid"})
    # threestudio's own HashGrid path reaches the placeholder (or CUDA) and fails loudly
    with pytest.raises((cpu.MissingDependencyError, RuntimeError, AssertionError)):
        threestudio_ts.find("implicit-volume")({"radius": 1.0})
    import nvdiffrast.torch as dr

    with pytest.raises(cpu.MissingDependencyError, match="nvdiffrast"):
        dr.RasterizeCudaContext(device="cpu")
    # envlight (PyPI, imports nvdiffrast) is the real package, importable thanks to the placeholder
    import envlight

    assert not cpu.is_placeholder(envlight) and envlight.__file__
    assert cpu.install_placeholders() == []  # idempotent: nothing left to install


def test_get_device_is_cpu_everywhere(threestudio_ts):
    from threestudio_ssd.threestudio import cpu

    if cpu.cuda_available():
        pytest.skip("CUDA is available: get_device stays threestudio's")
    import threestudio.utils.base
    import threestudio.utils.misc

    assert str(threestudio.utils.misc.get_device()) == "cpu"
    assert threestudio.utils.base.get_device is cpu.cpu_device  # bound by `from ... import get_device`
    assert threestudio_ts.find("no-material")({}).device.type == "cpu"


def test_launcher_arguments_and_checkout(tmp_path, monkeypatch, threestudio_src):
    args, extras = build_parser().parse_known_args(
        ["--config", "c.yaml", "--train", "--gpu", "1", "resume=x.ckpt", "system.loss.lambda_ssd=2"]
    )
    assert args.train and not args.test and args.gpu == "1"
    assert extras == ["resume=x.ckpt", "system.loss.lambda_ssd=2"]
    with pytest.raises(SystemExit):  # one of --train/--validate/--test/--export is required, as in launch.py
        build_parser().parse_known_args(["--config", "c.yaml"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THREESTUDIO_SRC", str(threestudio_src))
    assert find_threestudio_root() == str(threestudio_src)
    with pytest.raises(FileNotFoundError, match="--threestudio-root"):
        find_threestudio_root(str(tmp_path))
    monkeypatch.setenv("THREESTUDIO_SRC", str(tmp_path))  # set, but not a checkout: named in the error
    with pytest.raises(FileNotFoundError, match="THREESTUDIO_SRC=.* is not a threestudio checkout"):
        find_threestudio_root()
