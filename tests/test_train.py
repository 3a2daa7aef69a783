"""Training (lcss_prior.train) and the ``lcss-prior`` CLI (lcss_prior.cli), end to end on digits.

A tiny UNet trains for a handful of steps. One uninterrupted run and one run that stops half way
and is resumed are made once per module (``runs``) and shared by the tests that inspect them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcss_prior.cli import main
from lcss_prior.export import load_prior
from lcss_prior.sde import build_sde
from lcss_prior.train import (
    AtomicCheckpointIO,
    ConfigError,
    StepBatches,
    TrainConfig,
    build_loss,
    derive_seed,
    make_trainer,
    read_checkpoint_config,
)

TINY = [
    "--data", "digits",
    "--block-out-channels", "8,16",
    "--layers-per-block", "1",
    "--batch", "8",
    "--warmup", "2",
    "--checkpoint-every", "2",
    "--sample-every", "2",
    "--n-samples", "4",
    "--sample-steps", "2",
    "--log-every", "1",
    "--accelerator", "cpu",
    "--devices", "1",
    "--keep-best",
    "--no-progress",
]  # fmt: skip
STEPS = 4


def files_below(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def state_dict(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    full, split = root / "full", root / "split"
    assert main(["train", *TINY, "--steps", str(STEPS), "--out", str(full)]) == 0
    assert main(["train", *TINY, "--steps", str(STEPS // 2), "--out", str(split)]) == 0
    half = state_dict(split / "checkpoints" / "last.ckpt")
    assert main(["train", "--out", str(split), "--resume", "--steps", str(STEPS), "--no-progress"]) == 0
    return {"full": full, "split": split, "half": half}


# ---------------------------------------------------------------------------------------------
# the data stream
# ---------------------------------------------------------------------------------------------


class Items:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(i)), "label": i % 3}


def test_batches_depend_only_on_seed_step_and_rank():
    data = Items(10)
    a = StepBatches(data, 5, seed=0, start_step=0, end_step=8)
    b = StepBatches(data, 5, seed=0, start_step=5, end_step=8)
    batches_a = list(a)
    batches_b = list(b)
    for k in range(5, 8):
        assert torch.equal(batches_a[k]["image"], batches_b[k - 5]["image"])
        assert int(batches_b[k - 5]["step"]) == k
    # one epoch = two steps of 5: every item exactly once, in a new order each epoch
    for epoch in range(4):
        seen = sorted(a.indices(2 * epoch) + a.indices(2 * epoch + 1))
        assert seen == list(range(10))
    assert a.indices(0) + a.indices(1) != a.indices(2) + a.indices(3)
    assert StepBatches(data, 5, seed=1, start_step=0, end_step=1).indices(0) != a.indices(0)
    # two ranks share one epoch without overlap
    r0 = StepBatches(data, 5, 0, 0, 1, rank=0, world_size=2).indices(0)
    r1 = StepBatches(data, 5, 0, 0, 1, rank=1, world_size=2).indices(0)
    assert sorted(r0 + r1) == list(range(10))


def test_data_loader_workers_keep_the_order():
    from torch.utils.data import DataLoader

    stream = StepBatches(Items(10), 3, seed=0, start_step=2, end_step=9)
    plain = [b["image"] for b in stream]
    parallel = [b["image"] for b in DataLoader(stream, batch_size=None, num_workers=2)]
    assert len(plain) == len(parallel) == 7
    assert all(torch.equal(p, q) for p, q in zip(plain, parallel))


def test_derive_seed_separates_streams():
    seeds = {derive_seed(0, s, k) for s in range(3) for k in range(100)}
    assert len(seeds) == 300
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_train_writes_checkpoints_logs_samples_and_a_loadable_prior(runs):
    full = runs["full"]
    assert (full / "checkpoints" / "last.ckpt").is_file()
    best = state_dict(full / "checkpoints" / "best.ckpt")
    assert best["global_step"] in (2, 4)  # the checkpoint of the interval with the lowest mean loss
    assert list((full / "tb").glob("events.out.tfevents.*"))
    grids = sorted(p.name for p in (full / "samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(full / "samples" / "step_0000004.png").size[0] > 8
    assert not list(full.rglob(".*tmp*"))  # no half-written files left
    prior = load_prior(full / "prior")
    assert prior.captions == [f"digit {i}" for i in range(10)] and prior.null_class == 10
    assert prior.resolution == 8 and prior.channels == 1 and prior.n_levels == 17
    assert prior.metadata["training"]["method"] == "lcss" and prior.metadata["training"]["steps"] == STEPS
    # prior.json holds the resolved loss configuration, the one the run's settings build
    loss = json.loads((full / "prior" / "prior.json").read_text())["training"]["loss"]
    cfg = TrainConfig(**read_checkpoint_config(full / "checkpoints" / "last.ckpt")[0])
    assert loss == build_loss(build_sde(cfg.sde, **cfg.sde_kwargs), cfg).config
    assert loss["method"] == "lcss" and loss["weighting"] is not None
    # the exported weights are the EMA weights of the final checkpoint
    ckpt = state_dict(full / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS
    ema = {k[len("ema_net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_net.")}
    exported = prior.network.state_dict()
    assert ema.keys() == exported.keys()
    assert all(torch.equal(ema[k], exported[k]) for k in ema)
    net = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    assert any(not torch.equal(net[k], ema[k]) for k in net)  # EMA is not a copy of the live weights


def test_tensorboard_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["full"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "train/lr", "perf/step_time_s", "perf/peak_mem_gib"):
        assert tag in tags, tags
    assert "samples" in acc.Tags()["images"]


def test_resume_is_bit_for_bit(runs):
    full = state_dict(runs["full"] / "checkpoints" / "last.ckpt")
    resumed = state_dict(runs["split"] / "checkpoints" / "last.ckpt")
    half = runs["half"]
    assert full["global_step"] == resumed["global_step"] == STEPS and half["global_step"] == STEPS // 2
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    opt_full, opt_resumed = full["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for i in opt_full:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_full[i][name], opt_resumed[i][name])
    # ... and the comparison is sensitive: the second half of training did change every tensor group
    changed = [k for k, v in half["state_dict"].items() if not torch.equal(v, full["state_dict"][k])]
    assert any(k.startswith("net.") for k in changed) and any(k.startswith("ema_net.") for k in changed)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    p_full, p_resumed = load_prior(runs["full"] / "prior"), load_prior(runs["split"] / "prior")
    with torch.no_grad():
        assert torch.equal(p_full.eps(x, t, labels, 2.0), p_resumed.eps(x, t, labels, 2.0))


def test_a_checkpoint_saved_before_output_scaling_existed_resumes_and_exports_as_none(runs, tmp_path):
    """Runs saved before ``output_scaling`` existed trained ``eps_hat = UNet``: their checkpoints
    read back as ``"none"`` (``LEGACY_DEFAULTS``), in the resume check and in ``export``."""
    ckpt = torch.load(runs["full"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["output_scaling"] == "edm"  # today's default
    del ckpt["hyper_parameters"]["config"]["output_scaling"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert read_checkpoint_config(old)[0]["output_scaling"] == "none"
    assert main(["export", "--checkpoint", str(old), "--out", str(tmp_path / "prior")]) == 0
    assert load_prior(tmp_path / "prior").network.output_scaling == "none"


def test_export_subcommand_matches_the_final_export(runs, tmp_path):
    ckpt = runs["full"] / "checkpoints" / "last.ckpt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "p")]) == 0
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([0.1, 0.9]), torch.tensor([3, 7])
    with torch.no_grad():
        a = load_prior(tmp_path / "p").eps(x, t, labels)
        b = load_prior(runs["full"] / "prior").eps(x, t, labels)
    assert torch.equal(a, b)
    with pytest.raises(SystemExit) as info:
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "p")])
    assert info.value.code == 2


def test_sample_subcommand_is_delegated(runs, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--prior", str(runs["full"] / "prior"), "--caption", "digit 3", "--n", "4"]
    assert main([*args, "--steps", "3", "--method", "euler_maruyama", "--out", str(out)]) == 0
    assert out.is_file()


# ---------------------------------------------------------------------------------------------
# bad settings fail fast and never touch an existing run
# ---------------------------------------------------------------------------------------------


def corrupt_image_folder(root: Path) -> Path:
    (root / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cats" / "good.png")
    (root / "cats" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "nope"], "invalid choice"),
        (["--steps", "-3"], "--steps must be > 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--ema", "1.5"], "--ema must be in [0, 1)"),
        (["--sde", "nope"], "unknown SDE name"),
        (["--sde", "tanh", "--method", "dsm"], "not affine"),
        (["--data-size", "500"], "apply to --data shapes only"),  # digits would ignore it
        (["--smoothing", "1.5"], "--smoothing must be < 1 for LCSS"),  # unbounded below there
        (["--data", "/no/such/folder"], "neither 'digits', 'shapes' nor an existing image folder"),
        (["--data", "CORRUPT"], "bad.png"),
        ([], "already holds a run"),
        (["--resume", "--method", "dsm"], "differs from the resumed run"),
        (["--resume", "ELSEWHERE"], "does not exist"),
        # other devices would change the global batch (--batch is per device)
        (["--resume", "--devices", "2"], "trained on 1: the global batch would change from 8 to 16"),
    ],
)
def test_bad_settings_fail_fast_and_keep_checkpoints(runs, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    shutil.copytree(runs["split"], out)
    before = files_below(out)
    corrupt = str(corrupt_image_folder(tmp_path / "images"))
    extra = [
        corrupt if a == "CORRUPT" else str(tmp_path / "x.ckpt") if a == "ELSEWHERE" else a for a in extra
    ]
    # "--resume" cases use the run's own settings; the others start a new run in the same folder
    base = ["train", "--out", str(out), "--no-progress"] + ([] if "--resume" in extra else TINY)
    with pytest.raises(SystemExit) as info:
        main(base + extra)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert files_below(out) == before  # byte-identical: nothing written, nothing removed


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--block-out-channels", "8,8,8,8,8"], "network does not fit the data: resolution 8"),
        (["--accelerator", "tpu"], "Lightning cannot run with --accelerator 'tpu'"),
        (["--precision", "13-mixed"], "--precision '13-mixed'"),
    ],
)
def test_network_and_lightning_flags_are_checked_before_anything_is_written(tmp_path, capsys, extra, message):
    out = tmp_path / "new-run"
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--out", str(out), "--no-progress", *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # no config.json, no folder


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--out", str(tmp_path / "empty"), "--resume"])
    assert info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_lightning_flags_reach_the_trainer(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), accelerator="cpu", devices="2", strategy="ddp", steps=5)
    trainer = make_trainer(cfg.resolved())
    assert trainer.num_devices == 2 and trainer.max_steps == 5
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.gradient_clip_val == 1.0


def test_warmup_schedule():
    from lcss_prior.train import PriorTrainingModule

    cfg = TrainConfig(lr=1e-3, warmup_steps=4, block_out_channels=[8, 16], layers_per_block=1).resolved()
    info = {"captions": ["a", "b"], "channels": 1, "resolution": 8, "n_levels": 17}
    module = PriorTrainingModule(cfg.__dict__, info)
    assert [module.lr_at(k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_non_finite_gradients_stop_the_run_and_keep_the_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A finite loss with NaN gradients at step 3 (after the step-2 checkpoint): the run stops
    before the optimiser step, names the step, and last.ckpt is still step 2's, all finite."""
    from lcss_prior.train import PriorTrainingModule

    original = PriorTrainingModule.on_before_optimizer_step

    def poisoned(self, optimizer):
        if self.global_step == 3:
            next(p for p in self.net.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return original(self, optimizer)

    monkeypatch.setattr(PriorTrainingModule, "on_before_optimizer_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--steps", "4", "--out", str(out)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite gradients at step 3" in err and "--resume" in err
    ckpt = state_dict(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not list((out / "checkpoints").glob(".*tmp*"))


def test_non_finite_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    """Weights that became non-finite without a NaN gradient (here: poisoned after step 3's update)
    are caught before the step-4 save; last.ckpt stays step 2's."""
    from lcss_prior.train import PriorTrainingModule

    original = PriorTrainingModule.optimizer_step

    def poisoned(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.trainer.global_step == 3:
            with torch.no_grad():
                next(self.ema_net.parameters()).fill_(float("inf"))

    monkeypatch.setattr(PriorTrainingModule, "optimizer_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--steps", "4", "--out", str(out)])
    assert info.value.code == 1
    assert "non-finite weights at step 4" in capsys.readouterr().err
    assert state_dict(out / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_orphaned_checkpoint_temporaries_are_removed(tmp_path):
    """A kill during a checkpoint write leaves ``.last.ckpt.tmp-<pid>``; the next run removes those
    of dead processes (never a live one's, never a real checkpoint)."""
    from lcss_prior.train import remove_orphaned_checkpoint_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "last.ckpt").write_bytes(b"real")
    orphan = tmp_path / f".last.ckpt.tmp-{dead.pid}"
    orphan.write_bytes(b"partial")
    live = tmp_path / f".best.ckpt.tmp-{os.getppid()}"
    live.write_bytes(b"being written")
    assert remove_orphaned_checkpoint_files(tmp_path) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live.name])


def test_lcss_refuses_bfloat16_with_the_measured_reason(tmp_path, capsys):
    """bf16 rounds LCSS's small output difference to noise (benchmarks/lcss_precision.py): refused by
    name before anything is written; DSM under bf16 is allowed."""
    with pytest.raises(ConfigError, match="--precision bf16-mixed with --method lcss.*0.7-1.1x"):
        TrainConfig(method="lcss", precision="bf16-mixed").resolved().validate()
    TrainConfig(method="dsm", precision="bf16-mixed").resolved().validate()
    TrainConfig(method="lcss", precision="16-mixed").resolved().validate()


def test_a_float16_overflow_is_skipped_not_fatal(monkeypatch):
    """With a loss scaler (``--precision 16-mixed``) non-finite gradients are the scaler's recoverable
    overflow: the hook warns and lets the scaler skip the step; without one they stop the run."""
    from lcss_prior.train import PriorTrainingModule

    cfg = TrainConfig(block_out_channels=[8, 16], layers_per_block=1).resolved()
    info = {"captions": ["a", "b"], "channels": 1, "resolution": 8, "n_levels": 17}
    module = PriorTrainingModule(cfg.__dict__, info)
    for p in module.net.parameters():
        p.grad = torch.full_like(p, float("inf"))
    monkeypatch.setattr(PriorTrainingModule, "_gradient_scaler", lambda self: object())
    with pytest.warns(UserWarning, match="float16 gradient overflow at step 0"):
        module.on_before_optimizer_step(None)
    assert module.skipped_overflow_steps == 1
    monkeypatch.setattr(PriorTrainingModule, "_gradient_scaler", lambda self: None)
    with pytest.raises(FloatingPointError, match="non-finite gradients at step 0"):
        module.on_before_optimizer_step(None)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp_spawn", "deepspeed_stage_2", "ddp_fork", "ddp_notebook"])
def test_sharded_and_spawning_strategies_are_refused_before_anything_is_written(tmp_path, capsys, strategy):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--out", str(out), "--no-progress", "--strategy", strategy])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--strategy {strategy!r} is not supported" in err and "use --strategy ddp" in err
    assert not out.exists()


class _TwoRankStrategy:
    """What the other rank contributes to Lightning's collective calls, for one process: its mean
    loss and whether it found a problem."""

    def __init__(self, other_loss: float, other_bad: bool = False) -> None:
        self.other_loss, self.other_bad, self.calls = other_loss, other_bad, []

    def reduce(self, tensor, reduce_op="mean"):
        self.calls.append("reduce")
        return (tensor + self.other_loss) / 2

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls.append("reduce_boolean_decision")
        return (decision and self.other_bad) if all else (decision or self.other_bad)


def test_keep_best_and_stopping_are_decided_by_all_ranks_together(tmp_path):
    """Under DDP each rank sees its own losses; keep-best compares the mean over ranks (so every rank
    saves best.ckpt at the same steps and meets the same barriers), and a problem found on one rank
    stops every rank (instead of one raising while the others wait in a collective call)."""
    from types import SimpleNamespace

    from lcss_prior.train import PriorTrainingModule, StepCheckpoint

    cfg = TrainConfig(block_out_channels=[8, 16], layers_per_block=1).resolved()
    info = {"captions": ["a", "b"], "channels": 1, "resolution": 8, "n_levels": 17}
    module = PriorTrainingModule(cfg.__dict__, info)
    saved = []
    strategy = _TwoRankStrategy(other_loss=1.0)
    trainer = SimpleNamespace(
        global_step=1, max_steps=10, strategy=strategy, save_checkpoint=lambda p, **_: saved.append(p.name)
    )
    callback = StepCheckpoint(tmp_path, every_n_steps=2, keep_best=True)
    callback.best = 2.0
    # this rank's own interval mean (2.5) is worse than the best, the mean over both ranks (1.75) is better
    callback.on_train_batch_end(trainer, module, {"loss": torch.tensor(2.0)}, None, 0)  # step 1: no save
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, {"loss": torch.tensor(3.0)}, None, 0)
    assert saved == ["best.ckpt", "last.ckpt"] and callback.best == pytest.approx(1.75)
    assert strategy.calls == ["reduce_boolean_decision", "reduce"]
    # finite weights here, a problem on the other rank: this rank stops too, naming it
    trainer.global_step, strategy.other_bad = 4, True
    with pytest.raises(FloatingPointError, match="non-finite weights at step 4 \\(\\(on another rank\\)\\)"):
        callback.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, 0)
    module._trainer = SimpleNamespace(strategy=strategy)
    assert module._on_any_rank(False) is True  # the other rank's non-finite loss stops this one
    strategy.other_bad = False
    assert module._on_any_rank(False) is False and module._on_any_rank(True) is True
