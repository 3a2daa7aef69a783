"""Evaluate a run's test views and write ``report.json`` and a one-page ``report.png``.

``evaluate_run`` gathers what applies to a run folder (a threestudio trial folder or any folder of
views): CLIP similarity / R-precision when a CLIP model is given, IoU / PSNR against the true object
when the prompt is a ``shapes`` caption, mesh checks (and Chamfer distance to the true primitive or
a given reference) when meshes were exported. A metric that cannot be computed is reported with
the reason (``{"skipped": "..."}``) and printed, never silently left out.

JSON has no infinity: an infinite PSNR (identical images) is written as the string ``"inf"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .clip import TextImageEncoder, clip_scores
from .groundtruth import shapes_metrics, true_views
from .mesh import find_exported_meshes, load_mesh, mesh_chamfer, mesh_stats, reference_mesh
from .video import make_video
from .views import PanelLayout, TestCameras, Views, find_test_views, load_views, read_run_config

__all__ = ["REPORT_VERSION", "evaluate_run", "jsonable", "plot_report", "write_report"]

REPORT_VERSION = 1


def jsonable(value: Any) -> Any:
    """``value`` with tensors/arrays as lists and non-finite floats as ``"inf"``, ``"-inf"``, ``"nan"``."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _nested(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config or {}
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _shapes_caption(prompt: str | None) -> str | None:
    from lcss_prior.data.shapes import parse_caption

    if prompt is None:
        return None
    try:
        shape, color = parse_caption(prompt)
    except ValueError:
        return None
    return f"a {color} {shape}"


def evaluate_run(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    layout: PanelLayout | None = None,
    prompt: str | None = None,
    distractors: Sequence[str] | None = None,
    clip: TextImageEncoder | None = None,
    clip_top_k: int = 5,
    cameras: dict[str, float | int | None] | None = None,
    background: tuple[float, float, float] | None = None,
    mask_threshold: float = 0.5,
    supersample: int = 1,
    meshes: Sequence[str | os.PathLike] | None = None,
    reference: str | os.PathLike | None = None,
    chamfer_points: int = 10000,
    chamfer_backend: str = "auto",
    progress: bool = True,
) -> tuple[dict[str, Any], Views, dict[str, torch.Tensor] | None]:
    """Evaluate the test views under ``path`` (``find_test_views``); returns the report dict, the
    views and the true renders (``None`` unless the prompt is a shapes caption).

    ``prompt``: default ``system.prompt_processor.prompt`` of ``configs/parsed.yaml``.
    ``distractors``: captions for R-precision; default the rest of the shapes vocabulary for a
    shapes prompt, else none. ``cameras``: overrides of ``TestCameras`` (``elevation_deg``,
    ``distance``, ``fovy_deg``, ``n_views``). ``background``: of the true renders; default the
    run's ``solid-color-background`` colour, else white. ``meshes``: mesh files to check; default
    the run's exported meshes. ``reference``: mesh file or caption for Chamfer; default the shapes
    caption.
    """
    views_dir = find_test_views(path, step)
    views = load_views(views_dir, layout, progress=progress)
    config = read_run_config(views_dir)
    report: dict[str, Any] = {
        "ssd_eval_version": REPORT_VERSION,
        "source": {
            "path": str(path),
            "views_dir": str(views_dir),
            "run_config": config is not None,
            "n_views": len(views),
            "resolution": list(views.rgb.shape[-2:]),
            "layout": views.layout,
        },
    }
    prompt_source = "argument"
    if prompt is None:
        prompt = _nested(config, "system.prompt_processor.prompt")
        prompt_source = "configs/parsed.yaml" if prompt is not None else None
    report["prompt"], report["prompt_source"] = prompt, prompt_source
    caption = _shapes_caption(prompt)

    # -- CLIP ------------------------------------------------------------------------------
    if clip is None:
        report["clip"] = {"skipped": "no CLIP model given (--clip-model and --clip-weights)"}
    elif prompt is None:
        report["clip"] = {"skipped": "no prompt: none given (--prompt) and none in configs/parsed.yaml"}
    else:
        if distractors is None and caption is not None:
            from lcss_prior.data.shapes import CAPTIONS

            distractors = [c for c in CAPTIONS if c != caption]
        report["clip"] = clip_scores(clip, views.rgb, prompt, distractors or (), k=clip_top_k)

    # -- shapes ground truth ---------------------------------------------------------------
    truth = None
    if caption is None:
        report["shapes"] = {"skipped": f"prompt {prompt!r} is not a shapes caption (e.g. 'a red cube')"}
    else:
        cams = TestCameras.from_run(config, **(cameras or {}))
        if background is None:
            bg = _nested(config, "system.background.color")
            solid = _nested(config, "system.background_type") == "solid-color-background"
            background = tuple(float(c) for c in bg) if solid and bg is not None else (1.0, 1.0, 1.0)
        truth = true_views(
            caption, cams, views.indices, tuple(views.rgb.shape[-2:]), tuple(background), supersample
        )
        metrics = shapes_metrics(views.rgb, views.opacity, truth, mask_threshold)
        shapes: dict[str, Any] = {
            "caption": caption,
            "cameras": cams.to_dict(),
            "background": list(background),
            "mask_threshold": mask_threshold,
            "psnr_foreground_mean": _mean(metrics["psnr_foreground"]),
            "psnr_full_mean": _mean(metrics["psnr_full"]),
            "per_view": {"index": views.indices, **{k: v for k, v in metrics.items() if v is not None}},
        }
        if metrics["iou"] is None:
            shapes["iou_mean"] = None
            shapes["iou_note"] = "no opacity panel in the views (--opacity-panel), so no IoU"
        else:
            shapes["iou_mean"] = _mean(metrics["iou"])
        report["shapes"] = shapes

    # -- meshes ----------------------------------------------------------------------------
    mesh_paths = list(meshes) if meshes is not None else find_exported_meshes(path)
    if not mesh_paths:
        report["mesh"] = {"skipped": "no mesh given (--mesh) and none exported under save/it<step>-export/"}
    else:
        reference = reference if reference is not None else caption
        ref = reference_mesh(reference) if reference is not None else None
        entries = []
        for mesh_path in mesh_paths:
            mesh = load_mesh(mesh_path)
            entry: dict[str, Any] = {"path": str(mesh_path), **mesh_stats(mesh)}
            if ref is not None:
                entry["chamfer"] = mesh_chamfer(mesh, ref, chamfer_points, backend=chamfer_backend)
                entry["chamfer"]["reference"] = str(reference)
            entries.append(entry)
        report["mesh"] = entries
    return report, views, truth


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if v == math.inf else f"{v:.4g}"
        return str(v)

    rows = [("prompt", fmt(report.get("prompt"))), ("views", fmt(report["source"]["n_views"]))]
    clip = report.get("clip", {})
    if "skipped" in clip:
        rows.append(("CLIP", "skipped: " + clip["skipped"]))
    else:
        rows.append((f"CLIP similarity x100 [{clip['backbone']}]", fmt(clip["clip_similarity"])))
        rows.append((f"CLIP R-precision ({clip['n_captions']} captions)", fmt(clip.get("r_precision"))))
    shapes = report.get("shapes", {})
    if "skipped" in shapes:
        rows.append(("shapes ground truth", "skipped: " + shapes["skipped"]))
    else:
        rows.append((f"IoU (opacity > {shapes['mask_threshold']})", fmt(shapes["iou_mean"])))
        rows.append(("PSNR foreground (dB)", fmt(shapes["psnr_foreground_mean"])))
        rows.append(("PSNR full image (dB)", fmt(shapes["psnr_full_mean"])))
    mesh = report.get("mesh")
    if isinstance(mesh, dict):
        rows.append(("mesh", "skipped: " + mesh["skipped"]))
    else:
        for entry in mesh or []:
            name = Path(entry["path"]).name
            rows.append(
                (
                    f"mesh {name}",
                    f"{entry['n_vertices']} v, {entry['n_faces']} f, watertight {entry['watertight']}, "
                    f"{entry['n_components']} component(s)",
                )
            )
            if "chamfer" in entry:
                cd = entry["chamfer"]
                rows.append(
                    (
                        f"Chamfer {name} (mean sq, sum)",
                        f"{fmt(cd['chamfer'])} (floor {fmt(cd['sampling_floor'])})",
                    )
                )
    return rows


def plot_report(
    report: dict[str, Any],
    views: Views,
    truth: dict[str, torch.Tensor] | None,
    path: str | os.PathLike,
    n_thumbnails: int = 8,
) -> Path:
    """One page: up to ``n_thumbnails`` evenly spaced views (and the true renders below them, for
    shapes prompts) over a table of the headline metrics."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(n_thumbnails, len(views))
    picks = np.linspace(0, len(views) - 1, n).round().astype(int)
    image_rows = 2 if truth is not None else 1
    rows = _metric_rows(report)
    fig = plt.figure(figsize=(2 * n, 2.1 * image_rows + 0.32 * len(rows) + 0.8))
    grid = fig.add_gridspec(image_rows + 1, n, height_ratios=[2.1] * image_rows + [0.32 * len(rows) + 0.4])
    for col, i in enumerate(picks):
        panels = [("run", views.rgb[i])] + ([("true", truth["rgb"][i])] if truth is not None else [])
        for row, (label, image) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label} view {views.indices[i]}", fontsize=8)
    ax = fig.add_subplot(grid[image_rows, :])
    ax.axis("off")
    table = ax.table(
        cellText=[[k, v] for k, v in rows], colLabels=["metric", "value"], loc="center", cellLoc="left"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width([0, 1])
    fig.suptitle(f"ssd-eval: {report['source']['views_dir']}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(
    report: dict[str, Any],
    views: Views,
    truth: dict[str, torch.Tensor] | None,
    out_dir: str | os.PathLike,
    turntable: str | None = None,
    fps: float = 30.0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.png`` and optionally ``turntable.<mp4|gif>`` (the RGB
    panels in view order) to ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "png": out_dir / "report.png"}
    paths["json"].write_text(json.dumps(jsonable(report), indent=2) + "\n")
    plot_report(report, views, truth, paths["png"])
    if turntable is not None:
        paths["turntable"] = make_video(
            list(views.rgb), out_dir / f"turntable.{turntable}", fps=fps, progress=progress
        )
    return paths
