"""Score-based diffusion priors trained with LCSS (and DSM, SSM, FD-SSM to compare).

Objectives live in ``lcss_prior.losses``, SDEs in ``lcss_prior.sde``; both import only torch.
Trained priors are exported with ``lcss_prior.export.export_prior`` and loaded with
``lcss_prior.export.load_prior``.
"""

__version__ = "0.1.0"
