"""benchmarks/harness.py: the timing, memory and machine measurements every benchmark shares."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from threestudio_ssd.testing import load_script

harness = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py")


def test_peak_memory_sees_a_freed_allocation():
    """64 MiB allocated, touched and freed inside ``fn``: the peak measure sees it; the resident-set
    difference (the wrong measure) does not."""
    size = 64 * 2**20

    def fn():
        x = torch.ones(size // 4, dtype=torch.float32)
        assert float(x[-1]) == 1.0
        del x

    delta, base = harness.peak_memory_during(fn)
    assert base > 0
    assert 0.85 * size < delta < 1.3 * size, delta / 2**20
    before = harness.proc_status_kib()["VmRSS"] * 1024
    fn()
    wrong = harness.proc_status_kib()["VmRSS"] * 1024 - before
    assert wrong < 0.25 * size, wrong / 2**20


def test_interleaved_rounds_measure_ratios_in_shuffled_order():
    calls: list[str] = []

    def sleeper(name: str, seconds: float):
        def fn():
            calls.append(name)
            start = time.perf_counter()
            time.sleep(seconds)
            return {"work": time.perf_counter() - start}

        return fn

    fns = {"slow": sleeper("slow", 0.02), "fast": sleeper("fast", 0.01)}
    per_round = harness.interleaved_rounds(fns, rounds=6, steps_per_round=2, seed=0)
    assert all(len(v) == 6 for v in per_round.values())  # the warm-up round is dropped
    summary = harness.summarize_rounds(per_round, "fast")
    assert 1.6 < summary["slow"]["ratio_to_fast"] < 2.6
    assert summary["fast"]["ratio_to_fast"] == 1.0
    # a swapped reference would report the inverse; the labels follow the functions
    assert harness.summarize_rounds(per_round, "slow")["fast"]["ratio_to_slow"] < 0.65
    firsts = {tuple(calls[i : i + 4]) for i in range(0, len(calls), 4)}
    assert len(firsts) > 1, "the order of the methods must be shuffled between rounds"


def test_peak_rss_reset_isolates_a_later_allocation():
    if not harness.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable on this kernel")
    size = 256 * 1024**2
    before = harness.proc_status_kib()["VmHWM"] * 1024
    block = torch.ones(size // 4)  # touched: resident
    peak = harness.proc_status_kib()["VmHWM"] * 1024
    del block
    assert peak - before >= 0.9 * size
    assert harness.reset_peak_rss()
    after_reset = harness.proc_status_kib()["VmHWM"] * 1024
    assert after_reset <= peak - 0.9 * size  # the reset forgets the earlier peak


def test_timed_calls_and_machine_description():
    calls = []
    seconds = harness.timed(lambda: calls.append(time.sleep(0.01)))()
    assert calls == [None] and set(seconds) == {"step"} and seconds["step"] >= 0.01
    info = harness.machine("cpu")
    assert info["device_name"] == info["cpu_model"] and info["torch"] == torch.__version__
    assert len(info["load_average_start"]) == 3


def test_markdown_table_and_a_report_that_keeps_the_reading(tmp_path):
    lines = harness.markdown_table(["arm", "ms"], [["sds", "1.0"], ["ssd", None]], align="lr")
    assert lines == ["| arm | ms |", "|---|---:|", "| sds | 1.0 |", "| ssd |  |"]
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        harness.markdown_table(["arm", "ms"], [["sds"]])
    path = tmp_path / "report.md"
    harness.write_report(path, "numbers v1\n")
    path.write_text(path.read_text() + "My reading.\n")
    harness.write_report(path, "numbers v2\n")
    text = path.read_text()
    assert text.startswith("numbers v2\n") and text.count(harness.KEEP_MARKER) == 1 and text.endswith("My reading.\n")


def test_json_from_a_fresh_process_and_its_failures_named():
    import sys

    command = [sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"]
    ok = harness.json_from_subprocess(command, timeout=60)
    assert ok == {"a": 1}
    with pytest.raises(RuntimeError, match="exit status 3: ValueError: bad probe"):
        harness.json_from_subprocess(
            [sys.executable, "-c", "import sys; print('ValueError: bad probe', file=sys.stderr); exit(3)"],
            timeout=60,
        )
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        harness.json_from_subprocess([sys.executable, "-c", "import time; time.sleep(5)"], timeout=1)
