"""Entry point when this repository is cloned into ``threestudio/custom/``.

threestudio's ``launch.py`` imports threestudio, then executes ``custom/<name>/__init__.py`` for
every extension folder. We put this folder on ``sys.path`` (so ``threestudio_ssd`` and
``lcss_prior`` import without ``pip install``) and import the adapter, whose modules register the
``stein-*`` and ``steindreamer-*`` names. Outside threestudio (pytest, ``pip install -e .``) this
file does nothing, so the repository stays importable on machines without threestudio. On a Python
older than 3.10 (threestudio's configs evaluate our ``X | None`` annotations at run time) it raises one
line naming the needed version, which launch.py prints, instead of a later ``KeyError`` on
``steindreamer-system``.
"""

import os
import sys

MIN_PYTHON = (3, 10)
if sys.version_info < MIN_PYTHON:  # before anything else, so launch.py prints this one line
    raise ImportError(
        f"threestudio-ssd needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is Python "
        f"{sys.version.split()[0]}: its steindreamer-system and stein-* classes are NOT registered"
    )

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if "threestudio" in sys.modules:
    import threestudio_ssd.threestudio  # noqa: F401,E402  (registers the classes)
