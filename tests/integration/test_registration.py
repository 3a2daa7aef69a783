"""threestudio discovers the repository in ``custom/`` and our names register exactly once.

Runs in a fresh interpreter in a temporary threestudio root: threestudio's registry is one global
dict, and the point is what ``launch.py``'s own ``load_custom_modules`` does with a clean one.
"""

from __future__ import annotations

import json

import pytest

from .conftest import run_python

pytestmark = pytest.mark.integration

EXPECTED = {
    "stein-dense-volume-renderer",
    "stein-prior-prompt-processor",
    "stein-score-distillation-guidance",
    "steindreamer-system",
    "stein-vertex-color-mesh-exporter",
    "stein-random-camera-datamodule",
    "stein-mesh-rasterizer",
}

SCRIPT = r"""
import contextlib, importlib, importlib.util, io, json, os, sys

# the CPU placeholders, loaded from the file so that our package is NOT imported before threestudio
# discovers it in custom/
spec = importlib.util.spec_from_file_location(
    "_ssd_cpu", os.path.join("custom", "threestudio-ssd", "threestudio_ssd", "threestudio", "cpu.py")
)
cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu)
placeholders = cpu.install_placeholders()
import threestudio
cpu.patch_get_device()
builtin = set(threestudio.__modules__)
assert "threestudio_ssd" not in sys.modules

import launch  # threestudio's own launch.py
log = io.StringIO()
with contextlib.redirect_stdout(log):
    launch.load_custom_modules()
first = set(threestudio.__modules__) - builtin
classes = {name: threestudio.__modules__[name] for name in first}

# second route: the extension folder executed again, then imported directly, then re-executed
with contextlib.redirect_stdout(log):
    again = launch.load_custom_module(os.path.join("custom", "threestudio-ssd"))
import threestudio_ssd.threestudio as adapter
for module in (adapter.renderer, adapter.prompt_processor, adapter.guidance, adapter.system):
    importlib.reload(module)
after = set(threestudio.__modules__) - builtin
same = all(threestudio.__modules__[n] is c for n, c in classes.items())

# a real conflict is still reported
from threestudio_ssd.threestudio.registry import register
try:
    register("stein-dense-volume-renderer")(type("SomethingElse", (), {}))
    conflict = None
except ValueError as e:
    conflict = str(e)

from threestudio.utils.misc import get_device
print("RESULT" + json.dumps({
    "placeholders": placeholders, "log": log.getvalue(), "first": sorted(first), "after": sorted(after),
    "again": again, "same": same, "conflict": conflict, "registered": adapter.REGISTERED_NAMES,
    "module_file": os.path.realpath(adapter.__file__), "device": str(get_device()),
    "n_builtin": len(builtin),
}))
"""


def test_custom_folder_discovery_registers_each_name_once(threestudio_root):
    proc = run_python(["-c", SCRIPT], cwd=threestudio_root)
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    print("registered by threestudio-ssd:", result["first"])
    assert "IMPORT FAILED" not in result["log"] and "Cannot import" not in result["log"], result["log"]
    assert "custom/threestudio-ssd" in result["log"]  # launch.py's import-time table lists us
    assert set(result["first"]) == EXPECTED
    assert set(result["after"]) == EXPECTED and result["same"] and result["again"]
    assert sorted(result["registered"]) == sorted(EXPECTED)
    assert "already exists" in result["conflict"]
    assert result["n_builtin"] >= 50  # threestudio's own modules all imported on this CPU
    assert "tinycudann" in result["placeholders"] and "nvdiffrast" in result["placeholders"]
    assert "envlight" not in result["placeholders"]  # the real package wins when it imports
    assert result["device"] == "cpu"
