"""``ssd-eval``: evaluate threestudio runs (and any folder of views), FID/KID, meshes, videos.

    ssd-eval run TRIAL [--clip-model ViT-B-32 --clip-weights PATH] [--prompt ...] [--out DIR]
    ssd-eval fid FOLDER_A FOLDER_B --features PATH --resolution 64
    ssd-eval mesh MESH [--reference MESH_OR_CAPTION]
    ssd-eval video VIEWS OUT.mp4|OUT.gif [--fps 30]

``run`` writes ``report.json`` and ``report.png`` (default folder: ``<views folder>-eval``) and
prints the JSON. Everything is local: CLIP and Inception weights come from paths.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _opacity_panel(text: str) -> int | str | None:
    if text.lower() == "none":
        return None
    if text.lower() == "last":
        return "last"
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--opacity-panel must be an index, 'last' or 'none', got {text!r}"
        ) from err


def _rgb_triple(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"expected three comma-separated numbers (R,G,B in [0, 1]), got {text!r}"
        )
    return tuple(float(p) for p in parts)


def _add_layout_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("panel layout of the saved images (threestudio grids: rgb | ... | opacity)")
    g.add_argument(
        "--panels",
        type=int,
        default=None,
        help="number of panels side by side (default: width / panel width)",
    )
    g.add_argument(
        "--panel-width", type=int, default=None, help="panel width in pixels (default: image height)"
    )
    g.add_argument("--rgb-panel", type=int, default=0, help="index of the RGB panel (default 0)")
    g.add_argument(
        "--opacity-panel",
        type=_opacity_panel,
        default="last",
        help="index of the opacity panel, 'last' (default: the last of >= 2 panels) or 'none'",
    )


def _layout(args: argparse.Namespace) -> Any:
    from .views import PanelLayout

    return PanelLayout(args.panels, args.panel_width, args.rgb_panel, args.opacity_panel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run", help="evaluate a trial folder or a folder of views; write report.json + report.png"
    )
    p.add_argument("path", help="threestudio trial folder, its save/ folder, or a folder of view images")
    p.add_argument("--step", type=int, default=None, help="use save/it<step>-test (default: the latest)")
    p.add_argument("--out", default=None, help="output folder (default: <views folder>-eval)")
    p.add_argument(
        "--prompt", default=None, help="default: system.prompt_processor.prompt of configs/parsed.yaml"
    )
    p.add_argument("--captions", nargs="+", default=None, help="distractor captions for CLIP R-precision")
    p.add_argument("--captions-file", default=None, help="file with one distractor caption per line")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    p.add_argument(
        "--clip-weights", default=None, help="local open_clip weights file or folder; no CLIP without it"
    )
    p.add_argument("--clip-top-k", type=int, default=5, help="also report R-precision at top-k (default 5)")
    p.add_argument("--device", default="cpu")
    _add_layout_arguments(p)
    g = p.add_argument_group("test cameras (default: configs/parsed.yaml, else threestudio's defaults)")
    g.add_argument("--elevation", type=float, default=None, help="data.eval_elevation_deg")
    g.add_argument("--distance", type=float, default=None, help="data.eval_camera_distance")
    g.add_argument("--fovy", type=float, default=None, help="data.eval_fovy_deg")
    g.add_argument("--n-views", type=int, default=None, help="data.n_test_views")
    p.add_argument("--background", type=_rgb_triple, default=None, help="true renders' background R,G,B")
    p.add_argument(
        "--mask-threshold", type=float, default=0.5, help="opacity threshold of the predicted mask"
    )
    p.add_argument("--mesh", nargs="+", default=None, help="mesh files (default: save/it<step>-export/)")
    p.add_argument("--reference", default=None, help="Chamfer reference: mesh file or shapes caption")
    p.add_argument("--chamfer-points", type=int, default=10000)
    p.add_argument("--turntable", choices=("mp4", "gif"), default=None, help="also write a turntable video")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("fid", help="FID/KID between two image folders (lcss_prior.metrics)")
    p.add_argument("folder_a")
    p.add_argument("folder_b")
    p.add_argument(
        "--features",
        required=True,
        help="local torchvision Inception-v3 weights file, or a feature classifier saved by lcss_prior",
    )
    p.add_argument(
        "--resolution", type=int, default=299, help="images are resized/cropped to this (default 299)"
    )
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")

    p = sub.add_parser("mesh", help="mesh checks and Chamfer distance to a reference")
    p.add_argument("mesh", nargs="+")
    p.add_argument("--reference", default=None, help="mesh file or shapes caption ('a red cube')")
    p.add_argument("--n-points", type=int, default=10000)
    p.add_argument("--backend", choices=("auto", "torch", "pytorch3d"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")

    p = sub.add_parser("video", help="turntable video (mp4 or gif) from a folder of views")
    p.add_argument("views", help="folder of views, or a trial folder (its latest test views)")
    p.add_argument("output", help="OUT.mp4 or OUT.gif")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--step", type=int, default=None)
    _add_layout_arguments(p)
    return parser


def _print_json(result: Any, out: str | None) -> None:
    from .report import jsonable

    text = json.dumps(jsonable(result), indent=2)
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def _run(args: argparse.Namespace) -> int:
    from .report import evaluate_run, write_report

    clip = None
    if args.clip_weights is not None:
        from .clip import load_clip

        clip = load_clip(args.clip_model, args.clip_weights, device=args.device)
    distractors = None
    if args.captions_file is not None:
        lines = Path(args.captions_file).read_text().splitlines()
        distractors = [line.strip() for line in lines if line.strip()]
    if args.captions is not None:
        distractors = (distractors or []) + list(args.captions)
    report, views, truth = evaluate_run(
        args.path,
        step=args.step,
        layout=_layout(args),
        prompt=args.prompt,
        distractors=distractors,
        clip=clip,
        clip_top_k=args.clip_top_k,
        cameras={
            "elevation_deg": args.elevation,
            "distance": args.distance,
            "fovy_deg": args.fovy,
            "n_views": args.n_views,
        },
        background=args.background,
        mask_threshold=args.mask_threshold,
        meshes=args.mesh,
        reference=args.reference,
        chamfer_points=args.chamfer_points,
        progress=not args.no_progress,
    )
    views_dir = Path(report["source"]["views_dir"])
    out = Path(args.out) if args.out is not None else views_dir.with_name(views_dir.name + "-eval")
    paths = write_report(report, views, truth, out, turntable=args.turntable, progress=not args.no_progress)
    for key in ("clip", "shapes", "mesh"):
        if isinstance(report.get(key), dict) and "skipped" in report[key]:
            print(f"ssd-eval: {key} skipped: {report[key]['skipped']}", file=sys.stderr)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _fid(args: argparse.Namespace) -> int:
    from lcss_prior.metrics import fid_kid_between_folders, load_extractor

    result = fid_kid_between_folders(
        args.folder_a,
        args.folder_b,
        load_extractor(args.features),
        resolution=args.resolution,
        channels=args.channels,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        seed=args.seed,
    )
    _print_json({**result, "features": args.features}, args.out)
    return 0


def _mesh(args: argparse.Namespace) -> int:
    from .mesh import load_mesh, mesh_chamfer, mesh_stats, reference_mesh

    ref = reference_mesh(args.reference) if args.reference is not None else None
    results = []
    for path in args.mesh:
        mesh = load_mesh(path)
        entry = {"path": path, **mesh_stats(mesh)}
        if ref is not None:
            entry["chamfer"] = {
                **mesh_chamfer(mesh, ref, args.n_points, args.seed, args.backend),
                "reference": args.reference,
            }
        results.append(entry)
    _print_json(results, args.out)
    return 0


def _video(args: argparse.Namespace) -> int:
    from .video import make_video
    from .views import find_test_views, load_views

    views = load_views(find_test_views(args.views, args.step), _layout(args))
    print(make_video(list(views.rgb), args.output, fps=args.fps))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": _run, "fid": _fid, "mesh": _mesh, "video": _video}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
