"""Latency measured the one way every comparison here uses: interleaved rounds with a settle pause.

On a shared machine a busy or a quiet moment hits whatever runs then; timing model A for a minute and model B
the next minute compares two moments as much as two models. So every comparison (export's choice of the INT8
CPU runtime, benchmarks/deploy.py, benchmarks/prune.py, benchmarks/compress.py) runs in rounds: each round
calls every candidate once, the first round is a warm-up, and the median over rounds is reported.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Pause after each timed call when runtimes alternate: ONNX Runtime's worker threads spin-wait after a run (its
# default), taking the cores from whatever runs next; on 2 cores OpenVINO timed right after ONNX Runtime ran
# 1.3-1.6x slower than after a 50 ms pause (docs/deploy.md). A deployed process runs one runtime, so the paused
# timing is the one that predicts it.
SETTLE_SECONDS = 0.05

Job = Callable[[int], Mapping[str, float]]  # round number -> milliseconds of each stage it timed


def timed_ms(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the milliseconds it took."""
    start = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - start) * 1e3


def interleaved_rounds(jobs: Mapping[str, Job], runs: int, settle: float = SETTLE_SECONDS
                       ) -> dict[str, dict[str, list[float]]]:
    """Call every job once per round, ``runs`` rounds after one warm-up round, pausing ``settle`` seconds after
    each call; returns job -> stage -> the milliseconds of every kept round (a job times its own stages)."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in jobs}
    for number in range(runs + 1):
        for name, job in jobs.items():
            stages = job(number)
            time.sleep(settle)
            if number:  # the first round is a warm-up
                for stage, ms in stages.items():
                    samples[name].setdefault(stage, []).append(ms)
    return samples


def median_call_ms(calls: Mapping[str, Callable[[], Any]], runs: int, settle: float = SETTLE_SECONDS
                   ) -> dict[str, dict[str, float]]:
    """Median and fastest milliseconds of each call (e.g. one backend on one batch) over interleaved rounds."""
    jobs = {name: _whole_call(call) for name, call in calls.items()}
    samples = interleaved_rounds(jobs, runs, settle)
    return {name: {"median": statistics.median(stages["call"]), "min": min(stages["call"])}
            for name, stages in samples.items()}


def _whole_call(call: Callable[[], Any]) -> Job:
    def job(_number: int) -> dict[str, float]:
        return {"call": timed_ms(call)[1]}
    return job


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
