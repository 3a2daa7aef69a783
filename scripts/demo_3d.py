"""The main demo: a 3-D object from a text prompt on a CPU, with SteinDreamer (SSD) and with SDS.

    bash scripts/demo.sh [OUT]                         # = python scripts/demo_3d.py [OUT]
    python scripts/demo_3d.py OUT --prompt "a blue torus" --steps 1000
    python scripts/demo_3d.py OUT --quick              # smoke mode: 40 steps, few views

What it does (every step through the real threestudio of ``python -m threestudio_ssd.checkout``):

1. gets the pinned threestudio and builds a threestudio root in ``OUT/threestudio`` with this
   repository in ``custom/threestudio-ssd`` (symlinks: how a user installs the extension);
2. trains ``steindreamer-system`` twice from the same seed with ``python -m threestudio_ssd.launch``:
   ``configs/steindreamer-cpu-shapes.yaml`` (SSD, baselines ``[constant, depth]``) and its twin
   ``configs/sds-cpu-shapes.yaml`` (SDS), both on the shipped LCSS shapes prior and (SSD) the
   shipped shapes depth model (``models/``), the two runs side by side, one CPU thread each, with
   a progress bar per run;
3. exports each result as a mesh (``--export``: marching cubes + vertex colours);
4. evaluates each against the true object of the prompt (``ssd-eval``'s ``evaluate_run``: mask IoU
   and PSNR on 30 turntable views, Chamfer distance of the mesh to the true shape) and writes a
   turntable video;
5. draws ``side_by_side.png`` (true object, SDS, SSD from the same cameras, with the numbers) and
   copies the SSD run's variance monitor (SSD's and SDS's gradient variance on the same draws);
6. writes ``summary.json`` / ``summary.md`` and prints what it wrote and how to open it.

Run it again with the same OUT to resume: finished stages are kept, an interrupted training
continues from its last checkpoint. Delete OUT (or pass another) to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARMS = {"ssd": "steindreamer-cpu-shapes.yaml", "sds": "sds-cpu-shapes.yaml"}
LABELS = {"ssd": "SSD (SteinDreamer)", "sds": "SDS (DreamFusion)"}
DEFAULT_PROMPT = "a red cone"
QUICK_NOTE = "QUICK MODE (smoke test): a few steps only - these are not results"
_PROGRESS = re.compile(r"Epoch \d+:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/demo_3d.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"a shapes caption (default {DEFAULT_PROMPT!r})")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; quick: 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the two runs are parallel)")
    p.add_argument("--quick", action="store_true", help="smoke mode: few steps, few and small test views")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def stage(k: int, n: int, text: str) -> None:
    print(f"\n== [{k}/{n}] {text}", flush=True)


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps if args.steps is not None else (40 if args.quick else 1000)
    if steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {steps}")
    return {
        "prompt": args.prompt,
        "steps": steps,
        "seed": args.seed,
        "quick": bool(args.quick),
        "test_views": 6 if args.quick else 30,
        "eval_resolution": 32 if args.quick else 64,
        "monitor_every": max(1, steps // (2 if args.quick else 20)),
        "monitor_draws": 4 if args.quick else 16,
    }


def overrides(settings: dict[str, Any], runs: Path) -> list[str]:
    steps = settings["steps"]
    return [
        f"system.prompt_processor.prompt={settings['prompt']}",
        f"seed={settings['seed']}",
        f"exp_root_dir={runs}",
        "use_timestamp=false",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={min(200, steps)}",
        f"checkpoint.every_n_train_steps={max(1, steps // 5)}",
        f"system.variance_monitor.every={settings['monitor_every']}",
        f"system.variance_monitor.n_draws={settings['monitor_draws']}",
        f"data.n_test_views={settings['test_views']}",
        f"data.eval_width={settings['eval_resolution']}",
        f"data.eval_height={settings['eval_resolution']}",
    ]


def trial_dir(runs: Path, arm: str, prompt: str) -> Path:
    """threestudio's ``<exp_root_dir>/<name>/<tag>`` for the config of ``arm`` (tag: the prompt with
    spaces as underscores, the configs' ``${rmspace:...}``)."""
    return runs / Path(ARMS[arm]).stem / prompt.replace(" ", "_")


def _pump(proc: subprocess.Popen, log: Path, bar: Any) -> None:
    """Copy the run's output to its log; move its progress bar along threestudio's own."""
    with open(log, "a", encoding="utf-8") as f:
        buffer = ""
        while True:
            chunk = proc.stdout.read(256)
            if not chunk:
                proc.finished_at = time.time()
                break
            f.write(chunk)
            buffer = (buffer + chunk)[-4096:]
            found = _PROGRESS.findall(buffer)
            if found and bar is not None:
                done, total = map(int, found[-1])
                bar.total = total
                bar.n = done
                bar.refresh()


def launch(args: list[str], cwd: Path, log: Path, threads: int, bar: Any = None) -> subprocess.Popen:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [sys.executable, "-m", "threestudio_ssd.launch", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    proc.pump = threading.Thread(target=_pump, args=(proc, log, bar), daemon=True)
    proc.pump.start()
    return proc


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], what: str) -> None:
    failed = []
    for arm, proc in procs.items():
        proc.wait()
        proc.pump.join()
        if proc.returncode != 0:
            failed.append(arm)
    if failed:
        for arm in failed:
            tail = logs[arm].read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
            print(f"\n--- {what} of {arm} failed; last lines of {logs[arm]} ---", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{what} failed for {failed}; see the logs above. Re-run the same command to resume.")


def train_all(settings, root: Path, runs: Path, logs_dir: Path, threads: int, progress: bool) -> dict[str, float]:
    """Train the arms in parallel (resuming where a checkpoint exists); returns wall seconds."""
    from tqdm.auto import tqdm

    todo, bars, procs, logs = {}, {}, {}, {}
    for arm in ARMS:
        trial = trial_dir(runs, arm, settings["prompt"])
        if (trial / "save" / f"it{settings['steps']}-test.mp4").is_file():
            print(f"  {arm}: already trained ({trial}); kept")
            continue
        extra = []
        last = trial / "ckpts" / "last.ckpt"
        if last.is_file():
            print(f"  {arm}: resuming from {last}")
            extra.append(f"resume={last}")
        todo[arm] = extra
    start = time.time()
    for i, (arm, extra) in enumerate(todo.items()):
        logs[arm] = logs_dir / f"train-{arm}.log"
        bars[arm] = tqdm(total=settings["steps"], desc=f"training {arm}", position=i, disable=not progress)
        cmd = ["--config", str(REPO / "configs" / ARMS[arm]), "--train", "--threestudio-root", str(root)]
        procs[arm] = launch(cmd + overrides(settings, runs) + extra, runs.parent, logs[arm], threads, bars[arm])
    try:
        wait_all(procs, logs, "training")
    finally:
        for bar in bars.values():
            bar.close()
    return {arm: proc.finished_at - start for arm, proc in procs.items()}


def export_all(settings, root: Path, runs: Path, logs_dir: Path, threads: int) -> dict[str, Path]:
    meshes, procs, logs = {}, {}, {}
    for arm in ARMS:
        trial = trial_dir(runs, arm, settings["prompt"])
        mesh = trial / "save" / f"it{settings['steps']}-export" / "model.obj"
        meshes[arm] = mesh
        if mesh.is_file():
            print(f"  {arm}: mesh exists ({mesh}); kept")
            continue
        logs[arm] = logs_dir / f"export-{arm}.log"
        cmd = ["--config", str(REPO / "configs" / ARMS[arm]), "--export", "--threestudio-root", str(root)]
        cmd += overrides(settings, runs) + [f"resume={trial / 'ckpts' / 'last.ckpt'}"]
        procs[arm] = launch(cmd, runs.parent, logs[arm], threads)
    wait_all(procs, logs, "mesh export")
    return meshes


def evaluate_all(settings, runs: Path, out: Path, meshes: dict[str, Path], progress: bool) -> dict[str, Any]:
    from threestudio_ssd.evaluation.report import evaluate_run, write_report

    results = {}
    for arm in ARMS:
        trial = trial_dir(runs, arm, settings["prompt"])
        report, views, truth = evaluate_run(
            trial, step=settings["steps"], meshes=[meshes[arm]], progress=progress
        )
        if settings["quick"]:
            report["note"] = QUICK_NOTE
        paths = write_report(report, views, truth, out / arm, turntable="mp4", progress=progress)
        shutil.copyfile(meshes[arm], out / arm / "model.obj")
        results[arm] = {"report": report, "views": views, "truth": truth, "paths": paths}
    return results


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    shapes, mesh = report.get("shapes", {}), report.get("mesh")
    chamfer = None
    if isinstance(mesh, list) and mesh and "chamfer" in mesh[0]:
        chamfer = mesh[0]["chamfer"]["chamfer"]
    return {
        "iou": shapes.get("iou_mean"),
        "psnr_foreground_db": shapes.get("psnr_foreground_mean"),
        "chamfer": chamfer,
    }


def variance_summary(trial: Path) -> dict[str, Any] | None:
    path = trial / "save" / "variance_monitor.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text())["history"]
    ratios = [r["var_estimator"] / r["var_sds"] for r in history if r["var_sds"] > 0]
    if not ratios:
        return None
    return {"n_estimates": len(ratios), "mean_ratio_ssd_to_sds": sum(ratios) / len(ratios)}


def side_by_side(results: dict[str, Any], settings: dict[str, Any], path: Path, n: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    ssd = results["ssd"]
    n = min(n, len(ssd["views"]))
    picks = np.linspace(0, len(ssd["views"]) - 1, n, endpoint=False).round().astype(int)
    rows = [("true object", ssd["truth"]["rgb"] if ssd["truth"] is not None else None)]
    rows += [(LABELS[arm], results[arm]["views"].rgb) for arm in ("sds", "ssd")]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 1.5, 1.75 * len(rows) + 0.9), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if images is not None:
                ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            if c == 0:
                text = label
                if r > 0:
                    arm = ("sds", "ssd")[r - 1]
                    h = headline(results[arm]["report"])
                    text += f"\nIoU {_fmt(h['iou'])}\nPSNR {_fmt(h['psnr_foreground_db'])} dB"
                    text += f"\nChamfer {_fmt(h['chamfer'], 4)}"
                ax.set_ylabel(text, fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    title = f"'{settings['prompt']}': {settings['steps']} steps, seed {settings['seed']}, same views"
    if settings["quick"]:
        title = QUICK_NOTE + "\n" + title
    fig.suptitle(title, fontsize=10, color="red" if settings["quick"] else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def model_info() -> dict[str, Any]:
    from lcss_prior.manifest import read_manifest
    from threestudio_ssd.shipped import SHIPPED, shipped_model

    info = {}
    for name in SHIPPED:
        manifest = read_manifest(shipped_model(name)) or {}
        info[name] = {"path": f"models/{name}", "commit": manifest.get("commit"), "quality": manifest.get("quality")}
    return info


def write_summary(out: Path, settings, results, times, runs: Path, threestudio_commit: str) -> dict[str, Any]:
    arms = {}
    for arm in ARMS:
        arms[arm] = {
            "label": LABELS[arm],
            **headline(results[arm]["report"]),
            "train_wall_seconds": round(times[arm], 1) if arm in times else None,
            "files": {k: str(Path(v).relative_to(out)) for k, v in results[arm]["paths"].items()},
        }
    summary = {
        "note": QUICK_NOTE if settings["quick"] else None,
        "settings": settings,
        "threestudio_commit": threestudio_commit,
        "models": model_info(),
        "arms": arms,
        "variance_monitor": variance_summary(trial_dir(runs, "ssd", settings["prompt"])),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# threestudio-ssd demo: '{settings['prompt']}'", ""]
    if settings["quick"]:
        lines += [f"**{QUICK_NOTE}**", ""]
    lines += [
        f"{settings['steps']} steps per run, seed {settings['seed']}, 32 px renders, threestudio "
        f"{threestudio_commit[:7]}; metrics against the true object on {settings['test_views']} turntable views.",
        "",
        "| run | IoU | PSNR fg (dB) | Chamfer | training wall time (s, runs in parallel) |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a = arms[arm]
        lines.append(
            f"| {a['label']} | {_fmt(a['iou'])} | {_fmt(a['psnr_foreground_db'])} | {_fmt(a['chamfer'], 4)} "
            f"| {_fmt(a['train_wall_seconds'], 4)} |"
        )
    v = summary["variance_monitor"]
    if v:
        lines += [
            "",
            f"Gradient variance, SSD / SDS on the same draws at the SSD run's renders: "
            f"{v['mean_ratio_ssd_to_sds']:.3f} (mean of {v['n_estimates']} estimates; "
            "`variance_ssd_vs_sds.png`).",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_for(args)
    from lcss_prior.data.shapes import CAPTIONS

    if settings["prompt"] not in CAPTIONS:
        raise SystemExit(f"--prompt must be a shapes caption (the shipped prior's vocabulary): {CAPTIONS}")
    out = Path(args.out).resolve()
    runs, logs = out / "runs", out / "logs"
    for folder in (runs, logs):
        folder.mkdir(parents=True, exist_ok=True)
    settings_file = out / "settings.json"
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        if before != settings:
            raise SystemExit(
                f"{out} holds a demo with other settings ({before}); pass another folder or delete it to start over"
            )
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    progress = not args.no_progress
    n = 6
    start = time.time()
    if settings["quick"]:
        print(QUICK_NOTE)

    stage(1, n, "threestudio (pinned) and a threestudio root with this extension in custom/")
    from threestudio_ssd.checkout import THREESTUDIO_COMMIT, get_threestudio, make_extension_root

    src = get_threestudio()
    root = out / "threestudio"
    if not (root / "custom" / "threestudio-ssd").exists():
        if root.exists():
            shutil.rmtree(root)
        make_extension_root(src, root)
    print(f"  threestudio {THREESTUDIO_COMMIT[:7]} at {src}\n  root: {root}")

    stage(2, n, f"training '{settings['prompt']}' with SSD and with SDS, {settings['steps']} steps each (parallel)")
    times = train_all(settings, root, runs, logs, args.threads, progress)

    stage(3, n, "exporting meshes (marching cubes, vertex colours)")
    meshes = export_all(settings, root, runs, logs, args.threads)

    stage(4, n, "evaluating against the true object (IoU, PSNR, Chamfer) and writing turntables")
    results = evaluate_all(settings, runs, out, meshes, progress)

    stage(5, n, "side-by-side image and variance monitor")
    side_by_side(results, settings, out / "side_by_side.png")
    monitor = trial_dir(runs, "ssd", settings["prompt"]) / "save" / "variance_monitor.png"
    if monitor.is_file():
        shutil.copyfile(monitor, out / "variance_ssd_vs_sds.png")

    stage(6, n, "summary")
    summary = write_summary(out, settings, results, times, runs, THREESTUDIO_COMMIT)
    print((out / "summary.md").read_text())
    print(f"Done in {time.time() - start:.0f} s. Wrote, in {out}:")
    print("  side_by_side.png          true object, SDS and SSD from the same cameras (any image viewer)")
    for arm in ARMS:
        print(f"  {arm}/turntable.mp4         {LABELS[arm]}: 360-degree turntable (any video player)")
        print(f"  {arm}/model.obj             exported mesh with vertex colours (MeshLab, Blender, trimesh)")
        print(f"  {arm}/report.json, .png     ssd-eval report: IoU/PSNR per view, mesh checks, Chamfer")
    if (out / "variance_ssd_vs_sds.png").is_file():
        print("  variance_ssd_vs_sds.png   gradient variance of SSD and SDS on the same draws, by step")
    print("  summary.json, summary.md  the numbers above; runs/ holds the threestudio trials, logs/ their logs")
    if summary["note"]:
        print(summary["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
