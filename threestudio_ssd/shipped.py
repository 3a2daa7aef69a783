"""The models this repository ships in ``models/`` (each with a ``MANIFEST.json``).

* ``shapes-lcss-32``: the LCSS prior of the procedural ``shapes`` data (32 px, 20 captions), the
  score model of the CPU configs, the demo and the benchmarks;
* ``depth-shapes-64``: the small DPT trained on ``shapes`` renders (``ssd-train-depth``), the depth
  estimator of the SSD ``depth`` baseline in those runs.

:func:`shipped_model` gives a model's folder; threestudio configs name them as
``${ssd_model:shapes-lcss-32}`` (an OmegaConf resolver that ``threestudio_ssd.threestudio``
registers), so a config works from any working directory. The loaders verify the manifest's
checksums (``lcss_prior.manifest``). This module imports neither torch nor threestudio.
"""

from __future__ import annotations

from pathlib import Path

#: the repository's ``models/`` folder
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
PRIOR = "shapes-lcss-32"
DEPTH = "depth-shapes-64"
SHIPPED = (PRIOR, DEPTH)


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (what results files record, so
    they name no folder of the machine that made them), else unchanged."""
    try:
        return Path(path).resolve().relative_to(MODELS_DIR.parent).as_posix()
    except ValueError:
        return str(path)


def shipped_model(name: str) -> Path:
    """The folder of the shipped model ``name`` (one of :data:`SHIPPED`); raises naming the
    problem when it is unknown or absent (``models/`` comes with the repository, not with a wheel)."""
    if name not in SHIPPED:
        raise KeyError(f"unknown shipped model {name!r}; the repository ships {list(SHIPPED)}")
    path = MODELS_DIR / name
    if not (path / "MANIFEST.json").is_file():
        raise FileNotFoundError(
            f"shipped model {name!r} is not at {path} (it comes with a clone of the repository, "
            "not with a wheel); pass the model's folder explicitly instead"
        )
    return path
