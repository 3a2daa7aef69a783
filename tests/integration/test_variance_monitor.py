"""``system.variance_monitor`` of ``steindreamer-system``: the record it logs is exactly
``ScoreDistillation.estimate_variance`` of the batch's first view with the documented generator
(in-process, a real system and data module); a VSD training run through the launcher logs it to
TensorBoard and CSV at the monitored steps, writes its plot, and trains the particle model through
the system's optimizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

from .conftest import REPO, run_python
from .tiny_models import DPT, PRIOR, SMALL_NERF, SMALL_RENDERS

pytestmark = pytest.mark.integration

SMALL = [*SMALL_RENDERS, *SMALL_NERF, "use_timestamp=false", "tag=ci"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor_models")
    return {
        "prior": make_tiny_prior(root / "prior", **PRIOR),
        "dpt": make_tiny_depth_estimator(root / "dpt", **DPT),
    }


def test_parse_variance_monitor_names_bad_keys(threestudio_ts):
    from threestudio_ssd.threestudio.system import parse_variance_monitor

    assert parse_variance_monitor({}).every == 0  # off by default
    assert parse_variance_monitor({"every": 5, "n_draws": 4}).n_draws == 4
    with pytest.raises(ValueError, match=r"variance_monitor: unknown key\(s\) \['n_draw'\]"):
        parse_variance_monitor({"n_draw": 4})
    with pytest.raises(ValueError, match=r"variance_monitor\.n_draws must be >= 2"):
        parse_variance_monitor({"every": 1, "n_draws": 1})
    with pytest.raises(ValueError, match=r"variance_monitor\.every must be an integer"):
        parse_variance_monitor({"every": "often"})


def test_monitor_record_is_estimate_variance_of_the_first_view(threestudio_ts, models, tmp_path, monkeypatch):
    """A real system (SSD with the depth baseline) and a batch of two random training cameras: the
    monitor's record equals ``ScoreDistillation.estimate_variance`` called directly on view 0 with
    a generator seeded ``seed * MONITOR_SEED_STRIDE + step``; another seed or view 1 differ (so the
    equality is not vacuous)."""
    from threestudio.utils.config import load_config

    from threestudio_ssd.baselines import RenderOutputs
    from threestudio_ssd.threestudio.system import MONITOR_SEED_STRIDE, render_geometry_for_guidance

    monkeypatch.chdir(tmp_path)  # load_config creates outputs/
    cfg = load_config(
        str(REPO / "configs" / "steindreamer-cpu-shapes.yaml"),
        cli_args=[
            f"system.guidance.prior_path={models['prior']}",
            f"system.guidance.depth_estimator_path={models['dpt']}",
            "data.batch_size=2",
            "system.variance_monitor.every=1",
            "system.variance_monitor.n_draws=6",
            "system.variance_monitor.batch_size=4",
            "system.variance_monitor.seed=3",
            *SMALL,
        ],
    )
    torch.manual_seed(0)
    system = threestudio_ts.find(cfg.system_type)(cfg.system)
    dm = threestudio_ts.find(cfg.data_type)(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        out = system(batch)
    kwargs = {**batch, **render_geometry_for_guidance(out)}
    record = system.monitor_variance(out["comp_rgb"], kwargs)
    assert record["step"] == 0 and system.variance_history == [record]

    guidance = system.guidance
    labels = guidance.condition(
        system.prompt_utils, batch["elevation"], batch["azimuth"], batch["camera_distances"]
    )

    def direct(view: int, seed: int):
        sl = slice(view, view + 1)
        render = RenderOutputs.from_threestudio(
            {"depth": out["depth"][sl], "opacity": out["opacity"][sl], "comp_normal": None},
            {"c2w": batch["c2w"][sl], "fovy": batch["fovy"][sl]},
        )
        return guidance.distillation.estimate_variance(
            out["comp_rgb"][sl].permute(0, 3, 1, 2),
            labels[sl],
            render,
            n_draws=6,
            generator=torch.Generator().manual_seed(seed),
            t_range=(guidance.min_t, guidance.max_t),
            batch_size=4,
        )

    same = direct(0, 3 * MONITOR_SEED_STRIDE + 0)
    assert same.n_fallback == record["n_fallback"] == 0  # the depth baseline was evaluated
    assert record["var_estimator"] == pytest.approx(same.var_ssd, rel=1e-6)
    assert record["var_sds"] == pytest.approx(same.var_sds, rel=1e-6)
    assert record["ratio"] == pytest.approx(same.ratio, rel=1e-6)
    assert direct(0, 4 * MONITOR_SEED_STRIDE).var_sds != pytest.approx(record["var_sds"], rel=1e-6)
    assert direct(1, 3 * MONITOR_SEED_STRIDE).var_sds != pytest.approx(record["var_sds"], rel=1e-6)


def test_vsd_run_logs_the_monitor_and_trains_the_particle(threestudio_root, models):
    config = "custom/threestudio-ssd/configs/vsd-cpu-shapes.yaml"
    run_python(
        [
            "-m",
            "threestudio_ssd.launch",
            "--config",
            config,
            "--train",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.log_every_n_steps=100",  # the monitor logs at its own steps regardless
            f"system.guidance.prior_path={models['prior']}",
            "system.variance_monitor.every=2",
            "system.variance_monitor.n_draws=4",
            *SMALL,
        ],
        cwd=threestudio_root,
    )
    trial = threestudio_root / "outputs" / "vsd-cpu-shapes" / "ci"
    saved = json.loads((trial / "save" / "variance_monitor.json").read_text())
    assert saved["estimator"] == "vsd"
    assert [r["step"] for r in saved["history"]] == [0, 2]
    for r in saved["history"]:
        assert math.isfinite(r["ratio"]) and r["var_sds"] > 0 and r["var_estimator"] > 0
    assert (trial / "save" / "variance_monitor.png").stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((trial / "tb_logs").glob("version_*")))).Reload()
    ratios = {e.step: e.value for e in events.Scalars("variance/ratio")}
    assert ratios == pytest.approx({r["step"]: r["ratio"] for r in saved["history"]}, rel=1e-5)
    assert "variance/var_sds" in events.Tags()["scalars"]
    metrics = (trial / "csv_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "variance/ratio" in metrics

    state = torch.load(trial / "ckpts" / "last.ckpt", map_location="cpu")
    assert [r["step"] for r in state["variance_monitor"]] == [0, 2]
    guidance_keys = [k for k in state["state_dict"] if k.startswith("guidance.")]
    assert all(
        k.startswith("guidance.distillation.particle.") or k.endswith("_extra_state") for k in guidance_keys
    )
    camera_out = state["state_dict"][
        "guidance.distillation.particle.network.unet.class_embedding.camera.net.2.weight"
    ]
    assert camera_out.abs().sum() > 0  # starts at 0: the system's optimizer stepped the particle model
