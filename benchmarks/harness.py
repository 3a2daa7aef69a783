"""What every benchmark here measures the same way: interleaved timing, peak memory, the machine.

* :func:`interleaved_rounds` / :func:`summarize_rounds`: functions timed in rounds, in an order
  shuffled per round (seeded), the first round a warm-up; a ratio is the median over rounds of the
  ratio within a round, so every function sees the same machine load (these machines are shared).
* :func:`peak_memory_during`: the peak memory a call adds (CUDA: allocated bytes; CPU: the peak
  resident set, reset through ``/proc/self/clear_refs``).
* :class:`PhaseTimer`: seconds per named part of a call (``ScoreDistillation.phase``).
* :func:`markdown_table` and :func:`write_report`: the reports' tables, and a report file whose
  hand-written reading below :data:`KEEP_MARKER` survives when the script rewrites it.
* :func:`machine`: which machine and software produced a number (device name with the card, CPU
  model, threads, versions, load average).

Benchmarks import it as ``benchmarks.harness`` (the repository root on ``sys.path``, as each
script arranges for itself).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

GIB = 1024**3


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> Callable[[], dict[str, float]]:
    """``fn`` as a timing function of :func:`interleaved_rounds`: one call, ``{"step": seconds}``,
    the device synchronised before and after."""

    def run() -> dict[str, float]:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return {"step": time.perf_counter() - start}

    return run


def interleaved_rounds(
    fns: dict[str, Callable[[], dict[str, float]]],
    rounds: int,
    steps_per_round: int,
    seed: int,
    progress: bool = False,
    desc: str = "timing",
    warmup: int = 1,
) -> dict[str, list[dict[str, float]]]:
    """Per round and function, the mean seconds per call of each phase.

    ``fns[name]()`` runs one call and returns its seconds per phase (:func:`timed` wraps a plain
    call). In each of ``warmup + rounds`` rounds the functions run ``steps_per_round`` times each,
    in an order shuffled per round (seeded); the first ``warmup`` rounds are dropped. Interleaving
    gives every function the same machine load on average, and functions of one round are adjacent
    in time, so their ratio is robust to load drift."""
    from tqdm.auto import tqdm

    order_rng = random.Random(seed)
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    for r in tqdm(range(warmup + rounds), desc=desc, disable=not progress, leave=False):
        order = list(fns)
        order_rng.shuffle(order)
        for name in order:
            calls = [fns[name]() for _ in range(steps_per_round)]
            if r >= warmup:
                per_round[name].append({p: sum(c[p] for c in calls) / steps_per_round for p in calls[0]})
    return per_round


class PhaseTimer:
    """Seconds per named part of one call: ``timer.phase(name)`` is a context manager (nested
    phases are timed each on their own), the device synchronised at both ends. Set as
    ``ScoreDistillation.phase`` it splits the real step without re-implementing it."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def summarize_rounds(
    per_round: dict[str, list[dict[str, float]]], reference: str
) -> dict[str, dict[str, Any]]:
    """Median seconds per call (``step_s``), per phase (``phases_s``), and the median and
    inter-quartile range over rounds of the ratio to ``reference`` within the same round."""
    totals = {name: [sum(d.values()) for d in rounds] for name, rounds in per_round.items()}
    out = {}
    for name, rounds in per_round.items():
        q1, med, q3 = quartiles([a / b for a, b in zip(totals[name], totals[reference])])
        out[name] = {
            "step_s": statistics.median(totals[name]),
            "step_s_all": totals[name],
            "phases_s": {p: statistics.median(d[p] for d in rounds) for p in rounds[0]},
            "ratio_to_" + reference: med,
            "ratio_to_" + reference + "_iqr": [q1, q3],
        }
    return out


def proc_status_kib() -> dict[str, int]:
    """This process's ``Vm*`` lines of ``/proc/self/status`` in KiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return {k: int(v) for k, v in re.findall(r"^(Vm\w+):\s+(\d+) kB", f.read(), flags=re.M)}


def release_memory() -> None:
    """Collect garbage and hand freed C-heap pages back to the OS (glibc), so that the resident set
    is a fair baseline."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-resident-set mark (``VmHWM``) of this process to the current resident
    set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_during(fn: Callable[[], Any], device: str = "cpu") -> tuple[int, int]:
    """``(peak - base, base)`` in bytes of the memory used while ``fn()`` runs.

    CPU: the process's peak resident set ``VmHWM`` (reset to the current resident set first) minus
    the resident set ``VmRSS`` before, after :func:`release_memory` (Linux only). Memory that ``fn``
    frees but the C allocator keeps is invisible to the next call's baseline only if it returns to
    the OS. CUDA: ``max_memory_allocated - memory_allocated``."""
    release_memory()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, base
    base = proc_status_kib()["VmRSS"] * 1024
    if not reset_peak_rss():
        raise OSError("cannot reset the peak resident set (/proc/self/clear_refs): no CPU peak memory")
    fn()
    return proc_status_kib()["VmHWM"] * 1024 - base, base


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Which machine and software produced the numbers: ``device_name`` is the GPU's name on CUDA
    (with its memory, CUDA and cuDNN versions) and the CPU model otherwise."""
    device = str(device)
    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_start": list(os.getloadavg()),
    }
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            info[name] = __import__(name).__version__
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            device_memory_gib=props.total_memory / GIB,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["device_name"] = info["cpu_model"]
    return info


KEEP_MARKER = "<!-- hand-written reading below this line is kept when the script rewrites the file -->"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """The lines of a markdown table: ``header`` cells, then one line per row (cells formatted by
    the caller; ``None`` is an empty cell). ``align``: one letter per column, ``l`` or ``r``
    (default all left)."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {row}")
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return lines


def write_report(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` followed by :data:`KEEP_MARKER` and whatever followed the marker in
    the file already there (a person's reading of the numbers, kept across regenerations)."""
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if KEEP_MARKER in old:
            kept = old.split(KEEP_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n" + KEEP_MARKER + (kept if kept else "\n"), encoding="utf-8")
    return path


def json_from_subprocess(
    command: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``command`` (a fresh process: what a memory probe needs) and return the JSON object its
    last stdout line holds; raises :class:`RuntimeError` with the exit status and the end of its
    stderr when it fails or times out."""
    try:
        proc = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from err
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"exit status {proc.returncode}: {tail[0]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
