"""threestudio-ssd: Stein Score Distillation for threestudio, and LCSS-trained diffusion priors.

Two packages ship from this repository:

* ``threestudio_ssd`` -- the SSD estimator (pure math in ``stein.py``), score models, depth
  estimators, baseline functions and, in ``threestudio_ssd.threestudio``, the threestudio adapter.
* ``lcss_prior`` -- score-matching objectives (LCSS, DSM, SSM, FD-SSM), SDEs, training, sampling,
  likelihood and the exported prior format that ``threestudio_ssd`` loads.

Requirements are RANGES: the plugin installs into a user's threestudio GPU environment, where
torch, tiny-cuda-nn and nerfacc were built together, and must not replace any of them (no pin of
torch or of anything threestudio installs). The bounds that exist come from threestudio itself:
``diffusers<0.20``, and diffusers 0.19 imports ``huggingface_hub.cached_download`` (gone in 0.26).
The exact environment the tests run in (CPU) is ``constraints-cpu.txt``, which the README's
commands pass with ``-c``; ``scripts/check_install.py`` shows that installing next to threestudio's
own requirements keeps the user's torch.
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.0",
    "torchvision",
    "diffusers>=0.19,<0.20",
    "huggingface_hub>=0.14,<0.26",
    "transformers>=4.28,<5",
    "safetensors",
    "accelerate",
    "pytorch_lightning>=2.0,<3",
    "omegaconf>=2.3,<2.4",
    "numpy",
    "scipy",
    "scikit-learn",
    "pillow",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "imageio[ffmpeg]",
    "jaxtyping",
]

# What threestudio 0.2.3 imports on a CPU machine (besides the CUDA-only packages, for which
# ``threestudio_ssd.threestudio.cpu`` installs placeholders). A GPU environment set up by
# threestudio's requirements.txt already has all of them. ``envlight`` must be installed without
# its dependencies: ``pip install --no-deps envlight==0.1.0``.
THREESTUDIO = [
    "libigl<2.6",  # 2.6 removed igl.fast_winding_number_for_meshes, which threestudio imports
    "nerfacc>=0.5.2,<0.6",
    "typeguard",
    "opencv-python-headless",
    "trimesh",
    "PyMCubes",
    "xatlas",
    "kornia",
    "torchmetrics",
    "einops",
    "IPython",
    "wandb",
    "networkx",
]

EVAL = ["open-clip-torch>=3.3,<4"]

TEST = ["pytest", "pytest-timeout", "ruff"]

setup(
    name="threestudio-ssd",
    version="0.1.0",
    description="Stein Score Distillation (SteinDreamer) for threestudio, and LCSS diffusion priors",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["threestudio_ssd", "threestudio_ssd.*", "lcss_prior", "lcss_prior.*"]),
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "threestudio": THREESTUDIO,
        "eval": EVAL,
        "test": TEST + THREESTUDIO + EVAL,
    },
    entry_points={
        "console_scripts": [
            "lcss-prior=lcss_prior.cli:main",
            "ssd-train-depth=threestudio_ssd.depth.train:main",
            "ssd-eval=threestudio_ssd.evaluation.cli:main",
        ]
    },
)
