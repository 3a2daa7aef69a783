"""threestudio-ssd: Stein Score Distillation for threestudio, and LCSS-trained diffusion priors.

Two packages ship from this repository:

* ``threestudio_ssd`` -- the SSD estimator (pure math in ``stein.py``), score models, depth
  estimators, baseline functions and, in ``threestudio_ssd.threestudio``, the threestudio adapter.
* ``lcss_prior`` -- score-matching objectives (LCSS, DSM, SSM, FD-SSM), SDEs, training, sampling,
  likelihood and the exported prior format that ``threestudio_ssd`` loads.

Versions are pinned to one environment in which threestudio 0.2.3 itself imports and runs
(see DESIGN.md section 6): threestudio needs ``diffusers<0.20``, and diffusers 0.19.3 needs
``huggingface_hub<0.26``.
"""

from setuptools import find_packages, setup

CORE = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "diffusers==0.19.3",
    "huggingface_hub==0.25.2",
    "transformers==4.46.3",
    "safetensors",
    "accelerate",
    "pytorch_lightning>=2.6,<2.7",
    "omegaconf==2.3.0",
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
# ``threestudio_ssd.threestudio.cpu`` installs placeholders). ``envlight`` must be installed
# without its dependencies: ``pip install --no-deps envlight==0.1.0``.
THREESTUDIO = [
    "libigl==2.5.1",
    "nerfacc==0.5.3",
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

EVAL = ["open-clip-torch>=3.3,<3.4"]

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
