"""The project's device check: what must hold on a GPU, in one run of about ten minutes.

Run by ``scripts/gpu_check.sh`` (which installs the carried wheels and threestudio first; see its
header). Steps, most important first, each a subprocess with its share of ``--budget`` seconds, its
output in ``<out>/<step>.log``; a failed or timed-out step is recorded and the next one runs:

1. ``environment``: the card (name, memory, driver), CUDA, torch and package versions;
2. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py tests/test_half_precision.py``: an SSD step
   with a tiny random SD + DPT in float16 and float32, zero mean of the depth control variate
   through the device's decoder, SSD mean = SDS mean, float16 vs float32 ``grad phi``;
3. ``system_50_steps``: ``steindreamer-system`` for 50 steps on CUDA through threestudio's own
   ``launch.py`` (the CPU config's NeRF, plugin renderer, shipped LCSS prior and depth model):
   finite losses, validation and test images written;
4. ``phi_precision``: ``benchmarks/phi_precision.py`` at 512 px on SD 2.1's VAE: the float16
   decode with the scaled backward vs a float32 decoder (time, memory, agreement);
5. ``cost_real_scale``: ``benchmarks/cost_real_scale.py --device cuda --fp16`` at 512 px with
   random SD 2.1-base and DPT-Hybrid: per-step time of SDS, SSD (full and preview decoder) and VSD
   measured side by side, and each arm's peak GPU memory.

Writes ``<out>/gpu_check.json`` (every step's status, seconds and numbers) and
``<out>/summary.txt``. ``--dry-run`` runs the same steps on the CPU with tiny models (``--quick``
benchmarks, 3 system steps, the CUDA tests with ``CUDA_TESTS_DEVICE=cpu``), to check the script
where there is no GPU; its numbers are not GPU numbers and the summary says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: (step, share of the budget it may use at most)
STEPS = (
    ("environment", 0.05),
    ("cuda_tests", 0.25),
    ("system_50_steps", 0.3),
    ("phi_precision", 0.2),
    ("cost_real_scale", 1.0),
)


def run_step(
    name: str, command: list[str], out: Path, timeout: float, env: dict[str, str], cwd: Path = REPO
) -> dict:
    """Run ``command``; its output goes to ``<out>/<name>.log``."""
    start = time.monotonic()
    log = out / f"{name}.log"
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        try:
            proc = subprocess.run(
                command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    record = {"status": status, "seconds": round(time.monotonic() - start, 1), "log": log.name}
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
    print(
        f"[gpu_check] {name}: {status} in {record['seconds']} s"
        + ("" if status == "passed" else f" | {tail}")
    )
    return record


def environment(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "dry_run": dry_run}
    for name in ("diffusers", "transformers", "pytorch_lightning", "omegaconf", "nerfacc"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # recorded, the steps that need it will fail with the reason
            info[name] = f"unavailable: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_name=props.name,
            device_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            multiprocessors=props.multi_processor_count,
        )
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown"
    else:
        info["device_name"] = "no CUDA device"
    return info


def junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def system_metrics(trial: Path) -> dict[str, Any]:
    """Finite-loss check and image counts of a threestudio trial folder."""
    metrics = sorted(trial.glob("csv_logs/version_*/metrics.csv"))
    out: dict[str, Any] = {"trial": trial.name}
    if not metrics:
        return {**out, "error": "no metrics.csv"}
    with open(metrics[-1], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_ssd"]) for r in rows if r.get("train/loss_ssd")]
    out.update(
        logged_steps=len(losses),
        all_losses_finite=bool(losses) and all(math.isfinite(v) for v in losses),
        last_loss_ssd=losses[-1] if losses else None,
        validation_images=len(list((trial / "save").glob("it*-*.png"))),
        test_images=len(list((trial / "save").glob("it*-test/*.png"))),
        checkpoint=(trial / "ckpts" / "last.ckpt").is_file(),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script itself")
    p.add_argument("--steps", default=",".join(s for s, _ in STEPS), help="comma-separated subset")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]
    )
    py, dry = sys.executable, args.dry_run
    deadline = time.monotonic() + args.budget
    result: dict[str, Any] = {"check": "gpu_check", "dry_run": dry, "budget_s": args.budget, "steps": {}}
    wanted = [s for s in args.steps.split(",") if s]

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    for name, share in STEPS:
        if name not in wanted:
            continue
        timeout = max(10.0, min(args.budget * share, deadline - time.monotonic()))
        if name == "environment":
            result["environment"] = environment(dry)
            result["steps"][name] = {"status": "passed"}
        elif name == "cuda_tests":
            junit = out / "cuda_tests.xml"
            step_env = {**env, "CUDA_TESTS_DEVICE": "cpu"} if dry else env
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={junit}"]
            cmd += ["tests/test_cuda.py", "tests/test_half_precision.py"]
            rec = run_step(name, cmd, out, timeout, step_env)
            rec["tests"] = junit_counts(junit)
            result["steps"][name] = rec
        elif name == "system_50_steps":
            from threestudio_ssd.checkout import get_threestudio, make_extension_root

            root = make_extension_root(
                get_threestudio(), Path(tempfile.mkdtemp(prefix="gpu_check_root_")), REPO
            )
            steps = 3 if dry else 50
            cmd = [
                py,
                "-m",
                "threestudio_ssd.launch",
                "--config",
                "custom/threestudio-ssd/configs/steindreamer-cpu-shapes.yaml",
            ]
            cmd += ["--train", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
            cmd += [
                "data.n_test_views=4",
                "use_timestamp=false",
                "tag=gpu_check",
                "trainer.log_every_n_steps=1",
            ]
            if not dry:
                cmd.insert(cmd.index("--train") + 1, "--gpu")
                cmd.insert(cmd.index("--gpu") + 1, "0")
            rec = run_step(name, cmd, out, timeout, env, cwd=root)
            rec.update(system_metrics(root / "outputs" / "steindreamer-cpu-shapes" / "gpu_check"))
            ok = (
                rec.get("all_losses_finite")
                and rec.get("logged_steps") == steps
                and rec.get("test_images", 0) > 0
            )
            if rec["status"] == "passed" and not ok:
                rec["status"] = "failed (ran, but the losses, logged steps or images are not as expected)"
            result["steps"][name] = rec
        elif name == "phi_precision":
            cmd = [py, "benchmarks/phi_precision.py", "--out", str(out), "--tag", "phi_precision"]
            cmd += ["--quick", "--rounds", "2"] if dry else ["--device", "cuda", "--rounds", "10"]
            rec = run_step(name, cmd, out, timeout, env)
            if (out / "phi_precision.json").is_file():
                rec["arms"] = json.loads((out / "phi_precision.json").read_text())["arms"]
            result["steps"][name] = rec
        elif name == "cost_real_scale":
            cmd = [py, "benchmarks/cost_real_scale.py", "--out", str(out), "--tag", "cost_real_scale"]
            cmd += ["--arms", "sds,ssd,ssd-preview,vsd", "--no-progress"]
            if dry:
                cmd += ["--quick", "--rounds", "2"]
            else:
                cmd += ["--device", "cuda", "--fp16", "--rounds", "10", "--warmup", "2", "--threads", "0"]
            rec = run_step(name, cmd, out, timeout, env)
            if (out / "cost_real_scale.json").is_file():
                cost = json.loads((out / "cost_real_scale.json").read_text())
                rec["median_step_s"] = {a: v["median_s"] for a, v in cost.get("arms", {}).items()}
                rec["ratios"] = cost.get("ratios")
                rec["memory"] = cost.get("memory")
            result["steps"][name] = rec
        save()
    write_summary(result, out)
    save()
    return 0 if all(r["status"] == "passed" for r in result["steps"].values()) else 1


def write_summary(result: dict[str, Any], out: Path) -> None:
    env = result.get("environment", {})
    lines = [
        f"gpu_check on {env.get('device_name', '?')} (torch {env.get('torch')}, CUDA {env.get('cuda', '-')})"
        + ("  -- DRY RUN ON THE CPU WITH TINY RANDOM MODELS: NOT GPU NUMBERS" if result["dry_run"] else ""),
    ]
    for name, rec in result["steps"].items():
        lines.append(f"{name}: {rec['status']} ({rec.get('seconds', 0)} s)")
        if "tests" in rec:
            lines.append(f"  tests: {rec['tests']}")
        if "logged_steps" in rec:
            lines.append(
                f"  steps logged {rec['logged_steps']}, losses finite {rec['all_losses_finite']}, "
                f"images: {rec['validation_images']} validation, {rec['test_images']} test"
            )
        for arm, v in (rec.get("arms") or {}).items():
            lines.append(
                f"  {arm}: {v.get('step_s', float('nan')) * 1e3:.1f} ms, peak {v.get('peak_memory_gib', 0):.2f} GiB, "
                f"cosine {v.get('cosine', float('nan')):.6f}, rel. error {v.get('relative_error', float('nan')):.2e}"
            )
        for arm, v in (rec.get("median_step_s") or {}).items():
            lines.append(f"  {arm}: median step {v * 1e3:.1f} ms")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
