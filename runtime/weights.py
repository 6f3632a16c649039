"""The shared weights file: read once per engine, every tensor a view of the one buffer (no copy).

Every backend starts here: the onnxruntime CPU backend wraps the views as OrtValues handed to all sessions, the CUDA
backend copies each to the device once, TensorRT lays them out in one device allocation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import Manifest


def read_weights(directory: str | Path, man: Manifest, buf: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """weights.bin (or `buf`, e.g. a memory mapping of it) -> {name: array view} with the manifest's dtype and shape."""
    if buf is None:
        buf = np.fromfile(Path(directory) / man.weights_file, dtype=np.uint8)
    return {name: buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape) for name, w in man.weights.items()}
