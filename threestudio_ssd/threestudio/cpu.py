"""Running threestudio 0.2.3 on a machine without CUDA.

threestudio imports three CUDA-only packages at ``import threestudio`` time (``tinycudann``,
``nvdiffrast``, and ``envlight``/``controlnet_aux`` through them) and hard-codes
``torch.device("cuda")`` in ``threestudio.utils.misc.get_device``. This module

* installs placeholder modules for the packages that cannot be imported here -- and only for
  those: a real package always wins. A placeholder imports fine; any attribute of it is a class
  whose construction (or call) raises :class:`MissingDependencyError` naming the package and the
  attribute, so a config that actually needs, e.g., a hash grid fails with a clear message
  instead of an obscure one deep inside CUDA code;
* replaces ``get_device`` with a CPU version in every loaded ``threestudio*`` module when CUDA is
  unavailable (modules bind the function at import time with ``from ... import get_device``, so
  patching ``threestudio.utils.misc`` alone would not reach them).

Nothing here runs on import; :func:`setup_cpu` does both steps and is idempotent.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

# (module name, what it provides, how to get it) in import order: the ``nvdiffrast`` placeholder
# must exist before ``envlight`` is tried, because PyPI's envlight imports nvdiffrast.
_PLACEHOLDERS = (
    ("tinycudann", "hash-grid encodings and fused MLPs", "build it from NVlabs/tiny-cuda-nn (CUDA)"),
    ("nvdiffrast", "the mesh rasterizer (nvdiff-rasterizer, DMTet stages)", "build NVlabs/nvdiffrast (CUDA)"),
    (
        "nvdiffrast.torch",
        "the mesh rasterizer (nvdiff-rasterizer, DMTet stages)",
        "build NVlabs/nvdiffrast (CUDA)",
    ),
    ("envlight", "environment lighting for the pbr-material", "pip install --no-deps envlight==0.1.0"),
    ("controlnet_aux", "ControlNet edge/normal detectors", "pip install controlnet_aux"),
    # not CUDA-only, but imported by threestudio.utils at import time for features no config here
    # uses (winding numbers of a shape_init mesh, Weights & Biases logging); absent on a bare GPU
    # image, where scripts/gpu_check.sh brings only what the check runs
    ("igl", "winding numbers and OBJ reading for geometry.shape_init from a mesh", "pip install 'libigl<2.6'"),
    ("wandb", "Weights & Biases logging (system.loggers.wandb)", "pip install wandb"),
)

_PLACEHOLDER_FLAG = "__threestudio_ssd_placeholder__"
_ORIGINAL_GET_DEVICE = None  # threestudio's own get_device, remembered by the first patch


class MissingDependencyError(ImportError):
    """A CUDA-only (or otherwise absent) package that threestudio imports was actually used."""


def _missing_class(package: str, attribute: str, purpose: str, hint: str) -> type:
    """A class standing in for ``package.attribute``: usable in annotations and ``isinstance``,
    raising :class:`MissingDependencyError` when constructed or called."""

    message = (
        f"'{package}.{attribute}' was used, but '{package}' is not installed on this machine "
        f"(threestudio_ssd installed a placeholder so that threestudio imports). '{package}' "
        f"provides {purpose}; {hint}, or choose a CPU-capable config (e.g. "
        f"ProgressiveBandFrequency encodings with VanillaMLP and the stein-dense-volume-renderer)."
    )

    def _raise(cls, *args, **kwargs):
        raise MissingDependencyError(message)

    return type(attribute, (), {"__new__": _raise, "__doc__": message, "__module__": package})


class _PlaceholderModule(types.ModuleType):
    """A module whose every public attribute is a raising stand-in (see :func:`_missing_class`)."""

    def __init__(self, name: str, purpose: str, hint: str) -> None:
        super().__init__(name, f"Placeholder for the missing package '{name}' (threestudio_ssd).")
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        self.__path__: list[str] = []  # a package, so that ``import name.sub`` finds sys.modules
        self.__file__ = None
        setattr(self, _PLACEHOLDER_FLAG, True)
        self._purpose, self._hint, self._cache = purpose, hint, {}

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        if attribute == "free_temporary_memory":  # tinycudann; threestudio's cleanup() calls it
            return _no_op
        if attribute not in self._cache:
            self._cache[attribute] = _missing_class(self.__name__, attribute, self._purpose, self._hint)
        return self._cache[attribute]


def _no_op(*args, **kwargs) -> None:
    return None


def is_placeholder(module: object) -> bool:
    """Whether ``module`` is one of our placeholders (rather than the real package)."""
    return bool(getattr(module, _PLACEHOLDER_FLAG, False))


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, but also OSError/RuntimeError from CUDA libraries
        sys.modules.pop(name, None)
        return False
    return True


def install_placeholders() -> list[str]:
    """Put a placeholder into ``sys.modules`` for every package of :data:`_PLACEHOLDERS` (CUDA-only,
    or optional and imported by threestudio at import time) that cannot be imported here; returns the names that got one (empty where all are real)."""
    installed = []
    for name, purpose, hint in _PLACEHOLDERS:
        if _importable(name):
            continue
        module = _PlaceholderModule(name, purpose, hint)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
        installed.append(name)
    return installed


def cuda_available() -> bool:
    """``torch.cuda.is_available()`` (imported lazily, after the launcher set CUDA variables)."""
    import torch

    return torch.cuda.is_available()


def cpu_device():
    """The CPU stand-in for ``threestudio.utils.misc.get_device``."""
    import torch

    return torch.device("cpu")


def patch_get_device() -> list[str]:
    """Replace threestudio's ``get_device`` by :func:`cpu_device` in every loaded ``threestudio*``
    module when CUDA is unavailable; returns the patched module names (empty with CUDA)."""
    if cuda_available():
        return []
    misc = sys.modules.get("threestudio.utils.misc")
    if misc is None:
        raise RuntimeError("patch_get_device() must run after 'import threestudio'.")
    global _ORIGINAL_GET_DEVICE
    if _ORIGINAL_GET_DEVICE is None:
        _ORIGINAL_GET_DEVICE = misc.get_device
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("threestudio") and getattr(module, "get_device", None) is _ORIGINAL_GET_DEVICE:
            module.get_device = cpu_device
            patched.append(name)
    return patched


def setup_cpu():
    """Make ``import threestudio`` work on this machine and return the module: placeholders for
    missing CUDA-only packages, then the import, then (without CUDA) the ``get_device`` patch.
    Safe to call many times."""
    install_placeholders()
    import threestudio

    patch_get_device()
    return threestudio
