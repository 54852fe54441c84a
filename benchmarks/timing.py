"""Interleaved timing for the benchmarks: every variant once per round, medians and their spread over the rounds.

Rounds interleave the variants, so a machine that slows down or speeds up mid-run (other jobs, clocks) moves every
variant alike. Each variant's time is reported as the median over rounds with its spread (the lowest and highest
round), and as a ratio against the baseline: the median of the per-round ratios, with their lowest and highest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, waiting for the GPU when there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call in each of `rounds` rounds, after one warm-up round that is not kept."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, call in calls.items():
                s = seconds(call, device)
                if r:
                    times[name].append(s)
    return times


def report(times: dict[str, list[float]], baseline: str, width: int = 36) -> list[str]:
    """One line per variant: median ms [lowest-highest], then x(median ratio to `baseline`) [lowest-highest]."""
    lines = []
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times[baseline], strict=True)]
        ms = [1000 * v for v in values]
        lines.append(
            f"{name:{width}s} {statistics.median(ms):9.1f} ms [{min(ms):.1f}-{max(ms):.1f}]   "
            f"x{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] of {baseline}"
        )
    return lines
