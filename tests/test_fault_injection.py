"""Fault injection for ``lcss-prior train`` and the prior folders it writes: the promises of
docs/training.md ("resume is bit-for-bit", "checked before anything is written", "a good checkpoint is
never replaced") under kill -9 at random moments and under corrupted files.

* kill -9 of a real ``lcss-prior train`` process during training, right after a checkpoint write
  (a random one, plus a random delay of up to a few steps) or during the final export; resumed until
  done; the final weights, optimiser state and exported prior equal an uninterrupted run's bit for
  bit, and no temporary file is left anywhere in the run folder.
* every file of a checkpoint folder and of an exported prior truncated, byte-flipped and deleted in
  turn: each gives one clear error naming the file, and nothing else in the folder changes.

* two real data-parallel processes (``--strategy ddp`` over gloo): ``--keep-best`` runs to the end
  (decisions taken on every rank together), and a NaN loss on rank 1 alone stops both ranks at that
  step with the reason, the last good checkpoint kept (per-rank decisions make rank 0 die in a
  collective call instead: on gloo "Connection closed by peer", on NCCL a hang until the timeout).

(A NaN gradient at a checkpoint step is tests/test_train.py's
``test_non_finite_gradients_stop_the_run_and_keep_the_good_checkpoint``; the kill-and-resume of a
threestudio SSD run is tests/integration/test_kill_resume.py.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
TRAIN = [
    "--data", "digits",
    "--block-out-channels", "8,16",
    "--layers-per-block", "1",
    "--batch", "8",
    "--warmup", "2",
    "--checkpoint-every", "3",
    "--sample-every", "1000",
    "--n-samples", "4",
    "--sample-steps", "2",
    "--log-every", "1",
    "--accelerator", "cpu",
    "--devices", "1",
    "--no-progress",
    "--steps", str(STEPS),
]  # fmt: skip
TEMPORARY = ("tmp-", "old-", ".tmp")


def train_command(out: Path, resume: bool) -> list[str]:
    args = ["--out", str(out), "--resume", "--steps", str(STEPS), "--no-progress"] if resume else [*TRAIN, "--out", str(out)]
    return [sys.executable, "-m", "lcss_prior.cli", "train", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_to_completion(out: Path) -> None:
    resume = (out / "checkpoints" / "last.ckpt").is_file()
    done = subprocess.run(train_command(out, resume), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_during(out: Path, moment: str, rng: random.Random) -> str:
    """Start (or resume) the run and kill -9 it at ``moment``: ``"step"`` (after the k-th checkpoint
    write, k random, plus a random delay), ``"export"`` (as soon as the export's temporary folder
    appears). Returns what happened (the run may finish first)."""
    ckpt = out / "checkpoints" / "last.ckpt"
    resume = ckpt.is_file()
    proc = subprocess.Popen(
        train_command(out, resume), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    writes, last = rng.randint(1, 4), ckpt.stat().st_mtime_ns if ckpt.exists() else None
    seen = 0
    try:
        while proc.poll() is None:
            if moment == "step" and ckpt.exists() and ckpt.stat().st_mtime_ns != last:
                last, seen = ckpt.stat().st_mtime_ns, seen + 1
                if seen >= writes:
                    time.sleep(rng.uniform(0.0, 0.15))
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return f"killed after checkpoint write {seen}"
            if moment == "export" and out.exists() and any(p.name.startswith(".prior") for p in out.iterdir()):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return "killed during export"
            time.sleep(0.001 if moment == "export" else 0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return f"finished (return code {proc.returncode})"


def leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if any(t in p.name for t in TEMPORARY)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_completion(out)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    from lcss_prior.export import load_prior

    ca = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cb = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ca["global_step"] == cb["global_step"] == STEPS
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    for i, state in ca["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer_states"][0]["state"][i][name]), (i, name)
    pa, pb = load_prior(a / "prior"), load_prior(b / "prior")
    for (ka, va), (kb, vb) in zip(pa.state_dict().items(), pb.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_minus_9_during_training_then_resume_is_the_uninterrupted_run(reference, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    events = [kill_during(out, "step", rng) for _ in range(2)]
    run_to_completion(out)
    assert any(e.startswith("killed") for e in events), events  # the fault was injected
    assert_same_run(reference, out)
    assert leftovers(out) == [], (events, leftovers(out))


def test_kill_minus_9_during_export_then_resume_exports_the_same_prior(reference, tmp_path):
    out = tmp_path / "run"
    event = kill_during(out, "export", random.Random(7))
    assert event == "killed during export", event
    run_to_completion(out)  # resumes at the last step: nothing to train, the export is redone
    assert_same_run(reference, out)
    assert leftovers(out) == [], leftovers(out)


# ---------------------------------------------------------------------------------------------
# corrupted files
# ---------------------------------------------------------------------------------------------


def files_below(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :])
    else:
        path.unlink()


HOW = ("truncate", "flip", "delete")


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", ["prior.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"])
def test_a_corrupted_prior_file_is_named_and_nothing_changes(reference, tmp_path, name, how):
    from lcss_prior.export import load_prior
    from threestudio_ssd.score_models import LCSSPriorScoreModel

    prior = tmp_path / "prior"
    shutil.copytree(reference / "prior", prior)
    corrupt(prior / name, how)
    before = files_below(prior)
    for loader in (load_prior, LCSSPriorScoreModel):  # the library and the plugin
        with pytest.raises((OSError, ValueError)) as info:
            loader(prior)
        message = str(info.value)
        assert Path(name).name in message or str(prior) in message, (loader, message)
        assert len(message.strip().splitlines()) == 1, message  # one clear error, not a dump
    assert files_below(prior) == before


@pytest.mark.parametrize("how", HOW)
def test_a_corrupted_checkpoint_is_named_on_resume_and_nothing_changes(reference, tmp_path, capsys, how):
    from lcss_prior.cli import main

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    corrupt(out / "checkpoints" / "last.ckpt", how)
    before = files_below(out)
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(out), "--resume", "--steps", str(STEPS + 3), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "last.ckpt" in err and len(err.splitlines()) == 1, err
    assert files_below(out) == before


# ---------------------------------------------------------------------------------------------
# two real data-parallel processes (DDP over gloo on the CPU)
# ---------------------------------------------------------------------------------------------

RANK_FAULT = r"""
import os, sys
import torch
import lcss_prior.train as train

nan_step, original = int(os.environ["NAN_STEP"]), train.PriorTrainingModule.training_step


def training_step(self, batch, batch_idx):  # rank 1 alone sees NaN images at step NAN_STEP
    if self.global_rank == 1 and self.global_step == nan_step:
        batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
    return original(self, batch, batch_idx)


train.PriorTrainingModule.training_step = training_step
from lcss_prior.cli import main

sys.exit(main())
"""


def ddp_train(tmp_path: Path, nan_step: int) -> tuple[subprocess.CompletedProcess, Path]:
    """``lcss-prior train --devices 2 --strategy ddp --keep-best`` through a script Lightning can
    relaunch for rank 1 (its subprocess launcher re-runs ``sys.argv``)."""
    script, out = tmp_path / "train_ddp.py", tmp_path / "run"
    script.write_text(RANK_FAULT)
    drop = {i + j for i, a in enumerate(TRAIN) if a in ("--devices", "--steps") for j in (0, 1)}
    args = [a for i, a in enumerate(TRAIN) if i not in drop]  # these two flags take one value each
    args += ["--devices", "2", "--strategy", "ddp", "--keep-best", "--steps", "8", "--checkpoint-every", "2"]
    command = [sys.executable, str(script), "train", *args, "--out", str(out)]
    # a hang (a rank alone in a collective call) would wait for gloo's 30-minute timeout: 300 s fails it
    done = subprocess.run(
        command, env={**env(), "NAN_STEP": str(nan_step)}, capture_output=True, text=True, timeout=300
    )
    return done, out


def test_ddp_keep_best_decides_on_every_rank_together(tmp_path):
    """Two processes, --keep-best: the interval losses are averaged over ranks, so both ranks take
    the same save decisions and the run ends (no rank waits alone in a barrier)."""
    done, out = ddp_train(tmp_path, nan_step=-1)
    assert done.returncode == 0, done.stderr[-3000:]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert last["world_size"] == 2 and last["global_step"] == 8 and best["global_step"] in (2, 4, 6, 8)
    assert (out / "prior" / "prior.json").is_file() and leftovers(out) == []


def test_ddp_nan_on_one_rank_stops_every_rank_and_keeps_the_good_checkpoint(tmp_path):
    """Rank 1 alone gets a NaN loss at step 5: both ranks stop at that step with the reason (rank 0
    learns it from the collective decision), within seconds, and last.ckpt holds step 4, finite."""
    done, out = ddp_train(tmp_path, nan_step=5)
    assert done.returncode != 0
    assert "non-finite training loss nan at step 5" in done.stderr, done.stderr[-3000:]
    assert "at step 5 on another rank" in done.stderr, done.stderr[-3000:]  # rank 0 stopped too
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert all(v.isfinite().all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (out / "prior").exists()
