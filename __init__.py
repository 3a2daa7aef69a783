"""Entry point when this repository is cloned into ``threestudio/custom/``.

threestudio's ``launch.py`` imports threestudio, then executes ``custom/<name>/__init__.py`` for
every extension folder. We put this folder on ``sys.path`` (so ``threestudio_ssd`` and
``lcss_prior`` import without ``pip install``) and import the adapter, whose modules register the
``stein-*`` and ``steindreamer-*`` names. Outside threestudio (pytest, ``pip install -e .``) this
file does nothing, so the repository stays importable on machines without threestudio.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if "threestudio" in sys.modules:
    import threestudio_ssd.threestudio  # noqa: F401,E402  (registers the classes)
