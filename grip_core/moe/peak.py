"""Peak anonymous memory of a child process, sampled: what a model really costs, mapped files excluded.

`run_measured(argv)` runs a command and samples its `RssAnon` (/proc/PID/status) every
`interval` seconds. Linux keeps no high-water mark of anonymous memory alone (`VmHWM` counts
the safetensors pages mapped from disk, which are page cache, not the model's cost), so the
peak is sampled; a spike shorter than `interval` can be missed, which makes the figure a
lower bound to within one sampling period. Used by the memory tests and benchmarks.
"""
from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

from .memory import process_anon_bytes


@dataclass
class MeasuredRun:
    returncode: int
    stdout: str
    stderr: str
    peak_anon_bytes: int
    seconds: float
    samples: int


def run_measured(argv: list[str], interval: float = 0.02, timeout: float | None = None, **popen) -> MeasuredRun:
    """Run `argv`, return its output, exit code and sampled peak RssAnon (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    peak, n, stop = [0], [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], process_anon_bytes(proc.pid))
                n[0] += 1
            except (OSError, ValueError):
                pass
            stop.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        t.join()
        if proc.poll() is None:
            proc.kill()
    return MeasuredRun(proc.returncode, out, err, peak[0], time.perf_counter() - t0, n[0])
