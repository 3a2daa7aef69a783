"""Data-parallel runs: every rank draws its own ``(t, eps)`` (seeded ``seed + rank``, threestudio's
convention) and resumes its own stream from the checkpoint (every rank's noise state is gathered
into it; each rank picks its entry before Lightning loads the state dict)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from threestudio_ssd.testing import make_tiny_prior

from .conftest import REPO, subprocess_env
from .tiny_models import PRIOR

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("rank_noise") / "prior", **PRIOR)


def guidance_on_rank(ts, prior, rank, monkeypatch, **cfg):
    monkeypatch.setenv("RANK", str(rank))
    return ts.find("stein-score-distillation-guidance")(
        {
            "score_model": "lcss-prior",
            "prior_path": str(prior),
            "estimator": "sds",
            "baselines": ["constant"],
            "half_precision_weights": False,
            "seed": 4,
            **cfg,
        }
    )


def test_each_rank_draws_its_own_noise(threestudio_ts, prior, monkeypatch):
    g0 = guidance_on_rank(threestudio_ts, prior, 0, monkeypatch)
    g1 = guidance_on_rank(threestudio_ts, prior, 1, monkeypatch)
    assert (g0.rank, g1.rank) == (0, 1)
    draw0, draw1 = torch.rand(8, generator=g0.generator), torch.rand(8, generator=g1.generator)
    assert torch.equal(draw0, torch.rand(8, generator=torch.Generator().manual_seed(4)))  # rank 0 unchanged
    assert torch.equal(draw1, torch.rand(8, generator=torch.Generator().manual_seed(5)))
    vsd1 = guidance_on_rank(threestudio_ts, prior, 1, monkeypatch, estimator="vsd", vsd_seed=7)
    assert vsd1.distillation.config.vsd_seed == 8


def test_each_rank_resumes_its_own_state(threestudio_ts):
    from threestudio_ssd.threestudio.system import GUIDANCE_STATE_KEY, PER_RANK_KEY, select_rank_state

    states = [{"generator": torch.tensor([r]), "distillation": {"r": r}} for r in range(2)]

    def checkpoint(per_rank=True):
        ckpt = {"state_dict": {GUIDANCE_STATE_KEY: states[0], "other": 1}}
        if per_rank:
            ckpt[PER_RANK_KEY] = states
        return ckpt

    for rank in (0, 1):
        ckpt = checkpoint()
        select_rank_state(ckpt, rank)
        assert ckpt["state_dict"][GUIDANCE_STATE_KEY] is states[rank] and ckpt["state_dict"]["other"] == 1
    ckpt = checkpoint(per_rank=False)
    select_rank_state(ckpt, 0)  # a one-process checkpoint on rank 0: as saved
    assert ckpt["state_dict"][GUIDANCE_STATE_KEY] is states[0]
    for ckpt, rank in ((checkpoint(per_rank=False), 1), (checkpoint(), 2)):
        with pytest.warns(UserWarning, match=f"no guidance noise state for rank {rank}.*restarts"):
            select_rank_state(ckpt, rank)  # never rank 0's stream on another rank
        assert "generator" not in ckpt["state_dict"][GUIDANCE_STATE_KEY]


GATHER = r"""
import json, sys, torch, torch.distributed as dist
import threestudio_ssd.threestudio  # noqa: F401  (CPU set-up, registration)
from threestudio_ssd.threestudio.system import gather_per_rank
dist.init_process_group("gloo")
rank = dist.get_rank()
state = {"generator": torch.Generator().manual_seed(100 + rank).get_state(), "rank": rank}
states = gather_per_rank(state)
print(json.dumps([[s["rank"], int(s["generator"].sum())] for s in states]))
dist.destroy_process_group()
"""


def test_gather_per_rank_over_two_processes(threestudio_root):
    """Two real processes (gloo on the loopback interface): both see both states, in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = subprocess_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["PYTHONPATH"] = f"{threestudio_root}:{env['PYTHONPATH']}"
        procs.append(
            subprocess.Popen([sys.executable, "-c", GATHER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    expected = [[r, int(torch.Generator().manual_seed(100 + r).get_state().sum())] for r in (0, 1)]
    for out in outs:
        assert json.loads(out.strip().splitlines()[-1]) == expected
    assert expected[0] != expected[1]


def test_gather_per_rank_is_none_in_one_process(threestudio_ts):
    from threestudio_ssd.threestudio.system import gather_per_rank

    assert gather_per_rank({"generator": torch.tensor([1])}) is None
