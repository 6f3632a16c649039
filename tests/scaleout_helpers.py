"""Helpers of the scale-out tests (test_engine_source.py, test_ray_serve.py; their engine is conftest's
`tiny_engine`): tar archives of an engine."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def make_archive(engine: Path, dest: Path, top_dir: bool = True, corrupt: str | None = None) -> Path:
    """A tar.gz of the engine (in one top-level directory, or its files at the top); `corrupt` flips a byte of
    that file inside the archive only."""
    with tarfile.open(dest, "w:gz") as tar:
        for f in sorted(engine.iterdir()):
            data = f.read_bytes()
            if f.name == corrupt:
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            info = tarfile.TarInfo(f"{engine.name}/{f.name}" if top_dir else f.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest
