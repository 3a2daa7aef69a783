"""Stein Score Distillation (SteinDreamer) for threestudio.

``threestudio_ssd.stein`` holds the estimator (framework-free); ``score_models``, ``depth`` and
``baselines`` the parts it composes; ``threestudio_ssd.threestudio`` the threestudio adapter, which
is the only module that imports threestudio and is not imported here.
"""

__version__ = "0.1.0"
