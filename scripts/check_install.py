"""Does ``pip install -e custom/threestudio-ssd`` keep a threestudio user's torch? (asks the index)

A threestudio GPU environment has a torch that tiny-cuda-nn and nerfacc were compiled against;
replacing it breaks ``import tinycudann``. This script builds a scratch virtualenv holding a torch
other than the one the tests pin (default ``torch==2.13.0`` with its ``torchvision==0.28.0``, as
threestudio's install puts torch and torchvision first), then asks pip to resolve, without
installing anything (``pip install --dry-run --report``):

A. threestudio's own ``requirements.txt`` (the pinned commit's, from ``threestudio_ssd.checkout``);
B. the same plus this repository (``-e .``), i.e. the user's next step;
C. this repository alone.

It prints what each would install and FAILS (exit 1) if B or C would install torch or torchvision
(replace the user's) where A does not, or if pip finds no set of versions that satisfies them. Lines of ``requirements.txt`` that pip cannot resolve from a
package index (``git+https://...``: tiny-cuda-nn, nerfacc, nvdiffrast, envlight, CLIP, all built
against the user's torch) are left out and listed. Not a test: it needs the package index.

    python scripts/check_install.py [--torch "torch==2.13.0 torchvision==0.28.0"] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WATCH = ("torch", "torchvision")


def run(cmd: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def split_requirements(text: str) -> tuple[list[str], list[str]]:
    """(lines pip can resolve from an index, VCS/URL lines left out)."""
    keep, left_out = [], []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        (left_out if ("git+" in line or "://" in line) else keep).append(line)
    return keep, left_out


def dry_run(pip: list[str], args: list[str], env: dict[str, str], report: Path, cwd: Path) -> dict[str, str] | str:
    """``{name: version}`` that ``pip install --dry-run`` would install, or pip's reason when the
    requirements cannot be installed together."""
    cmd = [*pip, "install", "--dry-run", "--quiet", "--report", str(report), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        if any("ResolutionImpossible" in line for line in errors):
            return " ".join(errors[:2])
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in data["install"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch", default="torch==2.13.0 torchvision==0.28.0", help="the user's torch (pip specs)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the scratch venv")
    p.add_argument("--keep", action="store_true", help="keep the scratch venv (its path is printed)")
    p.add_argument("--project", default=str(REPO), help="the threestudio-ssd checkout to judge (default: this one)")
    args = p.parse_args(argv)

    from threestudio_ssd.checkout import THREESTUDIO_COMMIT, get_threestudio

    requirements = (get_threestudio() / "requirements.txt").read_text()
    keep, left_out = split_requirements(requirements)
    scratch = Path(tempfile.mkdtemp(prefix="check_install_"))
    env = dict(os.environ)
    # judge our requirements, not a machine-wide cap: no global constraints file in the scratch env
    env["PIP_CONSTRAINT"] = ""
    env.pop("PYTHONPATH", None)
    try:
        run([args.python, "-m", "venv", str(scratch / "venv")], env)
        pip = [str(scratch / "venv" / "bin" / "python"), "-m", "pip"]
        print(f"scratch venv {scratch / 'venv'}: installing the user's {args.torch} ...", flush=True)
        run([*pip, "install", "--quiet", *args.torch.split()], env)
        listing = json.loads(run([*pip, "list", "--format", "json"], env).stdout)
        have = {d["name"].lower(): d["version"] for d in listing if d["name"].lower() in WATCH}
        print(f"  the user's environment has {have}")
        req_file = scratch / "threestudio-requirements.txt"
        req_file.write_text("\n".join(keep) + "\n")
        print(f"threestudio {THREESTUDIO_COMMIT[:7]} requirements.txt: {len(keep)} resolvable lines; left out "
              f"(not on a package index, built against the user's torch): {left_out}")
        results = {}
        for label, extra in (
            ("A threestudio", ["-r", str(req_file)]),
            ("B threestudio + threestudio-ssd", ["-r", str(req_file), "-e", "."]),
            ("C threestudio-ssd alone", ["-e", "."]),
        ):
            print(f"resolving {label} ...", flush=True)
            results[label] = dry_run(pip, extra, env, scratch / f"{label[0]}.json", Path(args.project))
        failed = False
        for label, installs in results.items():
            if isinstance(installs, str):
                print(f"  {label}: CANNOT be installed: {installs}")
                failed = True
                continue
            touched = {n: installs[n] for n in WATCH if n in installs}
            print(f"  {label}: would install {len(installs)} packages; torch/torchvision: "
                  f"{touched or 'kept (' + ', '.join(f'{k} {v}' for k, v in have.items()) + ')'}")
        baseline = {n for n in WATCH if n in results["A threestudio"]}
        for label in ("B threestudio + threestudio-ssd", "C threestudio-ssd alone"):
            if isinstance(results[label], str):
                continue
            replaced = {n for n in WATCH if n in results[label]} - baseline
            if replaced:
                failed = True
                print(f"FAIL: {label} would replace the user's {sorted(replaced)}")
        if not failed:
            print("OK: installing threestudio-ssd next to threestudio keeps the user's torch and torchvision")
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
