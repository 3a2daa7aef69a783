"""Test-wide settings: never touch the network, keep CPU runs small and deterministic."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# nerfacc JIT-compiles CUDA kernels on first use; never let that write into the user's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="torch_ext_"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run faster on one thread than on two contended ones (30x on a loaded machine):
# measured, e.g., a tiny UNet call 3-6 s on two threads vs 0.1 s on one, 500 Euler-Maruyama steps
# 8.3 s vs 0.2 s. Set at import (module-scoped fixtures build models before any test runs) and again
# around every test, so that a test whose code changes the thread count cannot leak it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state (tests still pass explicit generators)."""
    torch.manual_seed(0)
    yield
