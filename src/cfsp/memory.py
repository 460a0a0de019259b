"""How much memory and time a step takes: the probes that calibration's progress bar and the
benchmarks share."""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def return_freed_memory() -> None:
    """Hand the memory freed by a finished block back to the system. glibc keeps the freed chunks
    of a fragmented heap: an in-memory prune of SmolLM2 grew ~25 MB per block per pass (peak 2.8 GB
    against 1.6 GB with this after each block), a streamed 1B model ~50 MB per block."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """The process's peak RSS so far.

    Linux's VmHWM first: ``ru_maxrss`` survives ``exec``, so a process started from a large parent
    would report the parent's peak. Else ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _RssSampler:
    """Polls RSS in a thread, because ru_maxrss only rises past the process's earlier peak."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


def pruning_cost(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, dict]:
    """Call ``fn(*args, **kwargs)`` and return its result with its wall time and peak memory.

    ``rss_increase_bytes`` is the peak RSS during the call minus the RSS at its start (sampled
    every 10 ms, so very short spikes can be missed); ``peak_rss_bytes`` is the process's
    high-water mark afterwards. On CUDA, ``cuda_peak_bytes`` is ``torch.cuda.max_memory_allocated``.
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_rss, start_max = _rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    with _RssSampler() as sampler:
        result = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    end_max = peak_rss_bytes()
    increase = sampler.peak - start_rss if start_rss is not None else end_max - start_max
    cost = {"seconds": seconds, "peak_rss_bytes": end_max, "rss_increase_bytes": max(0, increase)}
    if cuda:
        cost["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return result, cost


@torch.inference_mode()
def peak_memory_text() -> str:
    """Peak memory so far, for the progress bar: the GPU's when one is in use, else the process's."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G gpu"
    return f"{peak_rss_bytes() / 2**30:.1f}G rss"
