"""Copy a trained model folder into ``models/<name>`` with its ``MANIFEST.json``.

    python scripts/ship_model.py depth-shapes-64 runs/depth-shapes-64 \\
        --command "ssd-train-depth ..." --commit SHA --started ISO --finished ISO
    python scripts/ship_model.py shapes-lcss-32 runs/shapes-lcss/prior --eval runs/prior-eval.json \\
        --command "lcss-prior train ..." --commit SHA --started ISO --finished ISO

The manifest records the command and commit that trained the model, when and how long, the data
seed, the measured quality (the depth model's held-out metrics from its ``training.json``; the
prior's ``lcss-prior eval`` report given with ``--eval``) and the size and SHA-256 of every file,
which the loaders verify (``lcss_prior.manifest``). ``scripts/make_models.sh`` runs all of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcss_prior.manifest import write_manifest  # noqa: E402
from threestudio_ssd.shipped import MODELS_DIR, PRIOR, SHIPPED  # noqa: E402


def depth_quality(folder: Path) -> dict:
    record = json.loads((folder / "training.json").read_text())
    after, before = record["held_out"]["after"], record["held_out"]["before"]
    return {
        "held_out_foreground_pearson": after["pearson"],
        "held_out_aligned_mae": after["mae"],
        "held_out_abs_rel": after["abs_rel"],
        "untrained_foreground_pearson": before["pearson"],
        "held_out": {k: record["held_out"][k] for k in ("split", "seed", "size")},
        "train_seconds_excluding_rendering": record["train_seconds"],
        "note": "signed Pearson over the object (positive: relief the right way round); MAE/AbsRel in "
        "disparity after least-squares scale (>= 0) and shift alignment",
    }


def prior_quality(report: dict) -> dict:
    """The headline numbers of an ``lcss-prior eval`` report, and the report itself."""
    m = report["metrics"]
    return {
        "caption_accuracy": m.get("accuracy"),
        "caption_accuracy_worst_caption": m.get("accuracy_min_caption"),
        "caption_accuracy_real_renders": m.get("accuracy_real"),
        "fid_in_domain": m.get("fid"),
        "kid_in_domain": m.get("kid_mean"),
        "bits_per_dim": m.get("bpd"),
        "bits_per_dim_stderr": m.get("bpd_stderr"),
        "note": "in-domain classifier features (trained on the shapes train split), 20 captions "
        "(chance 0.05); bits/dim on held-out test renders",
        "eval_report": report,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=SHIPPED)
    p.add_argument("source", help="the trained folder (an exported prior, or a depth checkpoint)")
    p.add_argument("--command", required=True, help="the exact command that trained it")
    p.add_argument("--commit", required=True, help="the commit whose code trained it")
    p.add_argument("--started", required=True, help="ISO time training started")
    p.add_argument("--finished", required=True, help="ISO time the model was written")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval", default=None, help="prior: the JSON report of lcss-prior eval")
    p.add_argument("--eval-command", default=None, help="prior: the command that made --eval")
    p.add_argument("--machine", default="CPU, 2 cores shared, one torch thread")
    args = p.parse_args(argv)
    source, dest = Path(args.source), MODELS_DIR / args.name
    if args.name == PRIOR:
        if args.eval is None:
            p.error("the prior needs --eval (its lcss-prior eval report)")
        quality = prior_quality(json.loads(Path(args.eval).read_text()))
        quality["eval_command"] = args.eval_command
    else:
        quality = depth_quality(source)
    started = datetime.fromisoformat(args.started.replace("Z", "+00:00"))
    finished = datetime.fromisoformat(args.finished.replace("Z", "+00:00"))
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest = write_manifest(
        dest,
        {
            "name": args.name,
            "kind": "lcss-prior" if args.name == PRIOR else "depth-estimator",
            "command": args.command,
            "commit": args.commit,
            "remake": "bash scripts/make_models.sh",
            "trained": {
                "started": args.started,
                "finished": args.finished,
                "wall_seconds": round((finished - started).total_seconds()),
                "data_seed": args.data_seed,
                "machine": args.machine,
            },
            "quality": quality,
        },
    )
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"wrote {dest} ({len(manifest['files'])} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
