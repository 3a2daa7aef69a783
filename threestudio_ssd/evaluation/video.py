"""Videos and GIFs from frames: one writer (``make_video``) for turntables and trajectories.

Frames are image tensors ``[3, H, W]`` (or ``[1, H, W]``) with values in ``[0, 1]``, ``[H, W, 3]``
uint8 arrays, or image files. mp4 is written by imageio's ffmpeg plugin (H.264, yuv420p: each
frame is padded with its edge pixels to even height and width, which that pixel format needs);
GIF by imageio's Pillow plugin (frame duration ``1000 / fps`` ms, looping forever).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["VIDEO_FORMATS", "frame_to_uint8", "make_video", "read_video_frames"]

VIDEO_FORMATS = (".mp4", ".gif")


def frame_to_uint8(frame: Float[Tensor, "C H W"] | np.ndarray | str | os.PathLike) -> np.ndarray:
    """One frame as an ``[H, W, 3]`` uint8 array: tensors ``[C, H, W]`` in ``[0, 1]`` (C = 1 or 3)
    become ``round(255 clamp(x, 0, 1))``; uint8 arrays ``[H, W]`` / ``[H, W, 3|4]`` pass through
    (grey repeated, alpha dropped); paths are read with imageio."""
    if isinstance(frame, (str, os.PathLike)):
        import imageio.v3 as iio

        try:
            frame = np.asarray(iio.imread(Path(frame)))
        except Exception as err:  # noqa: BLE001 - any decoder error gets the path
            raise ValueError(f"cannot read image {frame}: {err}") from err
    if isinstance(frame, Tensor):
        if frame.dim() != 3 or frame.shape[0] not in (1, 3):
            raise ValueError(f"a frame tensor must be [1 or 3, H, W] in [0, 1], got {tuple(frame.shape)}")
        array = (frame.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        frame = array.permute(1, 2, 0).numpy()
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        raise ValueError(f"array frames must be uint8 [H, W, 3], got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"a frame must be [H, W], [H, W, 1|3|4], got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def _pad_even(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[:2]
    return np.pad(array, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def make_video(
    frames: Iterable[Float[Tensor, "C H W"] | np.ndarray | str | os.PathLike],
    path: str | os.PathLike,
    fps: float = 30.0,
    progress: bool = True,
) -> Path:
    """Write ``frames`` (all of one size) to ``path``; the format follows the suffix (``.mp4`` or
    ``.gif``). Returns the path. A progress bar counts the frames written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ValueError(f"unsupported video format {path.suffix!r} for {path}; use one of {VIDEO_FORMATS}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = list(frames) if not isinstance(frames, Sequence) else frames
    if len(frames) == 0:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    import imageio.v2 as imageio

    bar = tqdm(frames, desc=f"writing {path.name}", unit="frame", disable=not progress, leave=False)
    first_shape = None
    if suffix == ".mp4":
        writer = imageio.get_writer(
            path,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
        )
    else:
        writer = imageio.get_writer(path, format="GIF", mode="I", duration=1000.0 / fps, loop=0)
    try:
        for i, frame in enumerate(bar):
            array = frame_to_uint8(frame)
            if first_shape is None:
                first_shape = array.shape
            elif array.shape != first_shape:
                raise ValueError(
                    f"frame {i} has shape {array.shape}, frame 0 has {first_shape}; all frames of "
                    f"{path} must have one size"
                )
            writer.append_data(_pad_even(array) if suffix == ".mp4" else array)
    finally:
        writer.close()
    return path


def read_video_frames(path: str | os.PathLike) -> np.ndarray:
    """All frames of an mp4 or GIF as ``[N, H, W, 3]`` uint8 (for checks and reports)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    frames = np.asarray(iio.imread(path, index=None))
    return frames[..., :3] if frames.ndim == 4 else frames[None, ..., :3]
