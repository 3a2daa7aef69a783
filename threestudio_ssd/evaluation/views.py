"""Test views of a run: where threestudio saves them, how its panel grids split, which cameras.

threestudio's ``test_step`` saves one image per test camera, ``<trial>/save/it{step}-test/{i}.png``
(and ``it{step}-test.mp4``). Each image is a grid of panels side by side (``save_image_grid``):
for threestudio's own systems ``rgb | normal | opacity``, for ``steindreamer-system``
``rgb | [normal] | depth | opacity``; the normal panel only when the geometry has normals. A
``PanelLayout`` names the RGB panel and the opacity panel; the default (RGB first, opacity last
when there is more than one panel) fits all of them. Panels are ``panel_width`` wide (default: the
image height, i.e. square panels as with ``eval_width == eval_height``).

The test cameras are threestudio's ``random-camera-datamodule`` test split (``RandomCameraDataset``
with ``split="test"``): ``n_test_views`` cameras with azimuth ``linspace(0, 360, n_test_views)``
degrees (both ends included) at fixed ``eval_elevation_deg``, ``eval_camera_distance`` and
``eval_fovy_deg``; image ``i`` is camera ``i``. ``TestCameras.from_run`` reads them from the run's
``configs/parsed.yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "IMAGE_EXTENSIONS",
    "PanelLayout",
    "TestCameras",
    "Views",
    "find_test_views",
    "list_images",
    "load_views",
    "read_run_config",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_TEST_DIR = re.compile(r"^it(\d+)-test$")
GREY_TOLERANCE = 2  # uint8 levels: a grey panel has |R - G|, |G - B| <= this everywhere


@dataclass(frozen=True)
class PanelLayout:
    """How one saved image splits into panels side by side.

    ``n_panels`` / ``panel_width``: give either (or both, consistent with the image width); with
    neither, panels are square (``panel_width = H``). ``rgb``: index of the RGB panel (negative
    counts from the right). ``opacity``: index of the opacity panel, ``"last"`` (the last panel when
    there are at least two, else none) or ``None`` (no opacity panel).
    """

    n_panels: int | None = None
    panel_width: int | None = None
    rgb: int = 0
    opacity: int | str | None = "last"

    def resolve(self, height: int, width: int, path: str | os.PathLike = "image") -> tuple[int, int]:
        """``(n_panels, panel_width)`` for an image of this size; a clear error otherwise."""
        n, pw = self.n_panels, self.panel_width
        hint = "set the layout with --panels / --panel-width"
        if n is not None and n < 1 or pw is not None and pw < 1:
            raise ValueError(f"n_panels and panel_width must be positive, got {n}, {pw}")
        if n is None and pw is None:
            pw = height
        if pw is None:
            if width % n:
                raise ValueError(f"{path}: width {width} is not divisible into {n} panels ({hint})")
            pw = width // n
        if width % pw:
            raise ValueError(
                f"{path}: width {width} is not a multiple of the panel width {pw} "
                f"(image {height}x{width}; {hint})"
            )
        if n is not None and n * pw != width:
            raise ValueError(f"{path}: {n} panels of width {pw} do not make the image width {width} ({hint})")
        return width // pw, pw

    def indices(self, n_panels: int, path: str | os.PathLike = "image") -> tuple[int, int | None]:
        """Resolved ``(rgb, opacity)`` panel indices (``opacity`` may be ``None``)."""
        rgb = self.rgb + n_panels if self.rgb < 0 else self.rgb
        if not 0 <= rgb < n_panels:
            raise ValueError(
                f"{path}: RGB panel {self.rgb} does not exist in an image of {n_panels} panel(s)"
            )
        if self.opacity is None or (self.opacity == "last" and n_panels < 2):
            return rgb, None
        if self.opacity == "last":
            opacity = n_panels - 1
        elif isinstance(self.opacity, int):
            opacity = self.opacity + n_panels if self.opacity < 0 else self.opacity
        else:
            raise ValueError(f"opacity panel must be an int, 'last' or None, got {self.opacity!r}")
        if not 0 <= opacity < n_panels:
            raise ValueError(
                f"{path}: opacity panel {self.opacity} does not exist in an image of {n_panels} panel(s)"
            )
        if opacity == rgb:
            raise ValueError(f"{path}: the RGB and opacity panels are both panel {rgb}")
        return rgb, opacity

    def split(self, image: np.ndarray, path: str | os.PathLike = "image") -> dict[str, np.ndarray]:
        """``{"rgb": [H, P, 3] uint8, "opacity": [H, P] uint8 (if any)}`` from an ``[H, W, 3]`` grid.

        The opacity panel must be grey (threestudio writes it with ``R = G = B``); a colour panel
        there means the layout is wrong, and the error says so.
        """
        height, width = image.shape[:2]
        n, pw = self.resolve(height, width, path)
        rgb, opacity = self.indices(n, path)
        out = {"rgb": image[:, rgb * pw : (rgb + 1) * pw]}
        if opacity is not None:
            panel = image[:, opacity * pw : (opacity + 1) * pw].astype(np.int16)
            spread = max(
                np.abs(panel[..., 0] - panel[..., 1]).max(), np.abs(panel[..., 1] - panel[..., 2]).max()
            )
            if spread > GREY_TOLERANCE:
                raise ValueError(
                    f"{path}: panel {opacity} of {n} (width {pw}) is not grey, so it is not an opacity "
                    f"panel (colour spread {spread}); check the layout (--panels, --panel-width, "
                    "--opacity-panel; use --opacity-panel none for images without one)"
                )
            out["opacity"] = panel[..., 0].astype(np.uint8)
        return out


@dataclass
class Views:
    """Views of one run: ``rgb [N, 3, H, W]`` in ``[0, 1]``, ``opacity [N, H, W]`` in ``[0, 1]`` or
    ``None``, the image ``paths`` and each view's camera ``indices`` (from the file names)."""

    rgb: Float[Tensor, "N 3 H W"]
    opacity: Float[Tensor, "N H W"] | None
    paths: list[Path]
    indices: list[int]
    layout: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.rgb.shape[0]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Images directly in ``folder``, in numeric order of their stems when all are integers
    (threestudio's ``0.png ... 119.png``), else in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"view folder {folder} does not exist or is not a folder")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"view folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if all(p.stem.isdigit() for p in files):
        return sorted(files, key=lambda p: int(p.stem))
    return sorted(files)


def find_test_views(path: str | os.PathLike, step: int | None = None) -> Path:
    """The folder of test views under ``path``: ``path/save/it{step}-test`` (a trial folder),
    ``path/it{step}-test`` (its ``save`` folder) or ``path`` itself when it holds images. Without
    ``step`` the latest step is taken."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder")
    for base in (path / "save", path):
        if not base.is_dir():
            continue
        steps = {int(m.group(1)): d for d in base.iterdir() if d.is_dir() and (m := _TEST_DIR.match(d.name))}
        if steps:
            if step is None:
                return steps[max(steps)]
            if step not in steps:
                raise FileNotFoundError(
                    f"{base} has no it{step}-test folder; steps with test views: {sorted(steps)}"
                )
            return steps[step]
    if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return path
    raise FileNotFoundError(
        f"no test views under {path}: looked for save/it<step>-test/, it<step>-test/ and images in {path}"
    )


def load_views(folder: str | os.PathLike, layout: PanelLayout | None = None, progress: bool = True) -> Views:
    """Read every image in ``folder`` (``list_images``) and split it with ``layout``. Errors name
    the file: unreadable images, sizes that differ from the first image, a wrong layout."""
    import imageio.v3 as iio

    layout = layout or PanelLayout()
    paths = list_images(folder)
    rgbs, opacities, shape = [], [], None
    for p in tqdm(paths, desc="reading views", unit="view", disable=not progress, leave=False):
        try:
            image = np.asarray(iio.imread(p))
        except Exception as err:  # noqa: BLE001 - any decoder error gets the path
            raise ValueError(f"cannot read image {p}: {err}") from err
        if image.dtype != np.uint8:
            raise ValueError(f"{p}: expected an 8-bit image, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = image[..., :3]
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise ValueError(
                f"{p} has size {image.shape[:2]}, {paths[0]} has {shape[:2]}; views differ in size"
            )
        panels = layout.split(image, p)
        rgbs.append(torch.from_numpy(np.ascontiguousarray(panels["rgb"])))
        if "opacity" in panels:
            opacities.append(torch.from_numpy(panels["opacity"]))
    n, pw = layout.resolve(shape[0], shape[1])
    rgb_index, opacity_index = layout.indices(n)
    indices = (
        [int(p.stem) for p in paths] if all(p.stem.isdigit() for p in paths) else list(range(len(paths)))
    )
    return Views(
        rgb=torch.stack(rgbs).permute(0, 3, 1, 2).float() / 255.0,
        opacity=torch.stack(opacities).float() / 255.0 if opacities else None,
        paths=paths,
        indices=indices,
        layout={"n_panels": n, "panel_width": pw, "rgb_panel": rgb_index, "opacity_panel": opacity_index},
    )


def read_run_config(trial: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``configs/parsed.yaml`` as a plain dict (not resolved), or ``None`` when absent.
    ``trial`` may be the trial folder or any folder below it (e.g. ``save/it1000-test``)."""
    from omegaconf import OmegaConf

    trial = Path(trial).resolve()
    for folder in (trial, *trial.parents[:3]):
        path = folder / "configs" / "parsed.yaml"
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"cannot read run config {path}: {err}") from err
    return None


@dataclass
class TestCameras:
    """threestudio's test cameras: ``azimuth_i = linspace(0, 360, n_views)[i]`` degrees at fixed
    elevation, distance and fovy (``random-camera-datamodule`` defaults below). ``source`` says
    where the numbers came from."""

    elevation_deg: float = 15.0
    distance: float = 1.5
    fovy_deg: float = 70.0
    n_views: int = 120
    source: str = "threestudio defaults"
    __test__ = False  # not a pytest test class despite the name

    @classmethod
    def from_run(cls, config: dict[str, Any] | None, **overrides: float | int | None) -> TestCameras:
        """From a run config (``data.eval_elevation_deg``, ``data.eval_camera_distance``,
        ``data.eval_fovy_deg``, ``data.n_test_views``); ``overrides`` that are not ``None`` win."""
        cams = cls()
        data = (config or {}).get("data", {}) or {}
        keys = {
            "elevation_deg": "eval_elevation_deg",
            "distance": "eval_camera_distance",
            "fovy_deg": "eval_fovy_deg",
            "n_views": "n_test_views",
        }
        origin: dict[str, str] = {}
        for attr, key in keys.items():
            if key in data:
                setattr(cams, attr, type(getattr(cams, attr))(data[key]))
                origin[attr] = "configs/parsed.yaml"
        for attr, value in overrides.items():
            if attr not in keys:
                raise KeyError(f"unknown camera setting {attr!r}; valid: {', '.join(keys)}")
            if value is not None:
                setattr(cams, attr, type(getattr(cams, attr))(value))
                origin[attr] = "flags"
        cams.source = ", ".join(f"{attr}: {origin.get(attr, 'threestudio default')}" for attr in keys)
        return cams

    def azimuths(self, indices: list[int]) -> Float[Tensor, " N"]:
        """Azimuth (degrees) of the test views ``indices``."""
        bad = [i for i in indices if not 0 <= i < self.n_views]
        if bad:
            raise ValueError(
                f"view indices {bad[:5]} are outside the {self.n_views} test cameras (n_test_views); "
                "set --n-views to the run's data.n_test_views"
            )
        return torch.linspace(0.0, 360.0, self.n_views)[torch.tensor(indices, dtype=torch.long)]

    def c2w(self, indices: list[int]) -> Float[Tensor, "N 4 4"]:
        """Camera-to-world matrices of the test views ``indices`` (``lcss_prior.data.camera_c2w``)."""
        from lcss_prior.data.shapes import camera_c2w

        return camera_c2w(self.elevation_deg, self.azimuths(indices), self.distance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
