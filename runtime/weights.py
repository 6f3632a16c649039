"""The shared weights file: written once by the exporter (float or quantized tensors), read once per engine, every
tensor a view of the one buffer (no copy).

Every backend starts here: the onnxruntime CPU backend wraps the views as OrtValues handed to all sessions, the CUDA
backend copies each to the device once, TensorRT lays them out in one device allocation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import WEIGHTS_ALIGN, Manifest, WeightEntry


def read_weights(directory: str | Path, man: Manifest, buf: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """weights.bin (or `buf`, e.g. a memory mapping of it) -> {name: array view} with the manifest's dtype and shape."""
    if buf is None:
        buf = np.fromfile(Path(directory) / man.weights_file, dtype=np.uint8)
    return views(buf, man.weights)


def views(buf: np.ndarray, index: dict[str, WeightEntry]) -> dict[str, np.ndarray]:
    """{name: array view of `buf` (the bytes of a weights file)} with each entry's dtype and shape."""
    return {name: buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape) for name, w in index.items()}


def write_weights(arrays: dict[str, np.ndarray], path: str | Path) -> dict[str, WeightEntry]:
    """Every array as raw little-endian bytes in one file, each starting on a WEIGHTS_ALIGN boundary -> the
    manifest's index {name: WeightEntry}."""
    index: dict[str, WeightEntry] = {}
    offset = 0
    with open(path, "wb") as f:
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            pad = (-offset) % WEIGHTS_ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(arr.tobytes())
            index[name] = WeightEntry(str(arr.dtype), tuple(arr.shape), offset, arr.nbytes)
            offset += arr.nbytes
    return index
