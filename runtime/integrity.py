"""Content hashes of an engine's files: recorded by the exporter, verified when an engine is loaded.

A flipped exponent byte or a page of NaN in `weights.bin` loads and runs without any error and produces garbage, so
every file the runtime reads (weights, graphs, tokenizer) is hashed at export and checked at load.

Speed: a file is cut into fixed-size chunks, each chunk is hashed on its own in a thread pool (hashlib releases the
GIL on large buffers, and `os.pread` does not hold it), and the file's digest is the hash of the chunk digests in
order. The chunk size is recorded next to the digests, so a verifier computes exactly what the exporter did.
Measured with `python -m skipdecode.runtime.integrity FILE` (a 2 GiB file in the page cache, 2026-12-01) on this
project's 2-core build machine (AMD EPYC with SHA-NI): sha256 1.1-1.3 GB/s per thread, blake2b 0.8 GB/s, hence
sha256. A second thread added nothing there only because the other core was busy (load average 5; two processes
hashing at once got 0.6 GB/s each): hashing is CPU-bound and spreads over whatever cores are free. So opt-1.3b's
5.3 GB of fp32 weights verify in about 5 s on one free core and about 5/n s on n.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import EngineError

ALGORITHM = "sha256"
CHUNK_BYTES = 64 * 2**20  # large enough that per-chunk overhead is noise, small enough to spread over threads


def _chunk_digest(fd: int, offset: int, size: int, algorithm: str) -> bytes:
    h = hashlib.new(algorithm)
    step = 8 * 2**20  # read in pieces so a thread never holds a whole chunk twice
    end = offset + size
    while offset < end:
        data = os.pread(fd, min(step, end - offset), offset)
        if not data:
            raise EngineError(f"file shrank while being hashed (at byte {offset})")
        h.update(data)
        offset += len(data)
    return h.digest()


def file_digest(path: str | Path, chunk_bytes: int = CHUNK_BYTES, algorithm: str = ALGORITHM,
                threads: int | None = None) -> str:
    """Hex digest of `path`: hash over the ordered digests of its `chunk_bytes` chunks, hashed in parallel."""
    size = os.path.getsize(path)
    offsets = range(0, max(size, 1), chunk_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        workers = max(1, min(threads or os.cpu_count() or 1, len(offsets)))
        with ThreadPoolExecutor(workers) as pool:
            digests = pool.map(lambda o: _chunk_digest(fd, o, min(chunk_bytes, size - o), algorithm), offsets)
            top = hashlib.new(algorithm)
            for d in digests:
                top.update(d)
    finally:
        os.close(fd)
    return top.hexdigest()


def hash_files(directory: Path, names: list[str]) -> dict:
    """The manifest's `integrity` section for `names` (files of `directory`)."""
    return {"algorithm": ALGORITHM, "chunk_bytes": CHUNK_BYTES,
            "files": {name: file_digest(Path(directory) / name) for name in names}}


def verify_files(directory: Path, integrity: dict) -> None:
    """Recompute every recorded digest; raise EngineError naming the first file whose content changed."""
    algorithm, chunk = integrity["algorithm"], integrity["chunk_bytes"]
    for name, want in integrity["files"].items():
        got = file_digest(Path(directory) / name, chunk, algorithm)
        if got != want:
            raise EngineError(f"{name} of engine {Path(directory).name} is corrupted: its {algorithm} is "
                              f"{got[:16]}..., the manifest records {want[:16]}... (re-export the engine, or "
                              "load it with verify=False / --no-verify to skip the check)")


def _measure(path: str) -> None:
    """Print hashing speed for each algorithm and thread count (the numbers in the module docstring)."""
    size = os.path.getsize(path)
    file_digest(path)  # warm the page cache: measure hashing, not the disk
    for algorithm in ("sha256", "blake2b"):
        for threads in (1, os.cpu_count() or 1):
            t0 = time.perf_counter()
            file_digest(path, algorithm=algorithm, threads=threads)
            dt = time.perf_counter() - t0
            print(f"{algorithm:8} threads={threads:<3} {size / dt / 1e9:.2f} GB/s")


if __name__ == "__main__":
    _measure(sys.argv[1])
