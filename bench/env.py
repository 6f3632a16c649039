"""The benchmark's view of the machine: what it is (recorded next to every result), how much memory is free, and
the resident memory an `Engine.load` costs, measured in a fresh subprocess."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_PACKAGES = ("skipdecode", "numpy", "onnxruntime", "onnx", "torch", "transformers")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                              check=False, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def machine_info(threads: int | None) -> dict:
    from ..runtime.kernels import cpu_info, isa

    return {"cpu": _cpu_model(), "isa": isa(cpu_info()["flags"]), "cores": os.cpu_count(), "threads": threads,
            "platform": platform.platform(),
            "memory_bytes": _meminfo("MemTotal"), "load_average": load_average(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "git": _git_commit()}


def memory_read_gbps(nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Weight-streaming bandwidth (GB/s): the fastest of `rounds` float32 matrix-vector products over a matrix far
    larger than the caches, with numpy's BLAS threads (every core). At batch 1 a decode step is such a product over
    every weight of its graph, so weights / this bandwidth is the step's floor (its roofline); the bench reports
    each row's fraction of it. (A plain numpy reduction is compute-bound here: 4-5 GB/s vs ~10 under load.)"""
    import time

    import numpy as np
    m = np.ones((nbytes // 4 // 1024, 1024), dtype=np.float32)
    v = np.ones(1024, dtype=np.float32)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        m @ v
        best = min(best, time.perf_counter() - t0)
    return m.nbytes / best / 1e9


def load_average() -> list[float] | None:
    """1/5/15-minute load: other processes on a small shared machine show up in every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def memory_available() -> int:
    """Bytes the kernel reports as available (MemAvailable); a large number where /proc is missing."""
    return _meminfo("MemAvailable") or 1 << 50


_LOAD_PROBE = r"""
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
from skipdecode.runtime.engine import Engine
before = rss()
engine = Engine.load(sys.argv[1], max_batch=1, max_length=2, prepack=sys.argv[2] or None)
print(json.dumps({"rss_bytes": rss() - before}))
"""


def probe_load_rss(engine_dir: str | Path, prepack: str | None) -> int:
    """RSS growth of `Engine.load` (every graph, KV cache of 1 x 2) in a fresh process, as runtime/memory.py does
    for the default load; this one also covers the other pre-packing modes."""
    proc = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(engine_dir), prepack or ""],
                          capture_output=True, text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe (prepack={prepack}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["rss_bytes"])
