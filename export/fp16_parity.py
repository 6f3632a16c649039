"""fp16 engines against the fp32 reference, graph by graph, with a tolerance table per output. Fails hard.

`skipdecode export --dtype fp16` already checks the fp16 engine against the fp16 PyTorch reference (parity.py).
That proves the export is faithful, not that fp16 is accurate enough: both sides share the fp16 rounding. This
check compares the fp16 engine with an fp32 engine of the same model and buckets (the fp32 reference) on identical
inputs (export/polygraphy_check.py): left-padded prefill batches with a single-token row (where OPT's additive
mask overflows in naive fp16 attention), ragged decode lengths and mixed gates. Every output of every graph must
be finite and within `FP16_VS_FP32`; the candidate side can be onnxruntime CPU (default), onnxruntime CUDA or a
TensorRT runner, so the same table judges GPU fp16 engines.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..runtime.errors import EngineError
from ..runtime.manifest import GraphSpec, Manifest, load_manifest
from .polygraphy_check import TOLERANCES, CrossBackendError, OrtRunners, compare_engine

FP16_VS_FP32 = TOLERANCES["fp16-vs-fp32"]


class Fp16ParityError(CrossBackendError):
    """An fp16 engine differs from the fp32 reference beyond `FP16_VS_FP32`, or produced non-finite values."""


def _check_twins(fp16: Manifest, fp32: Manifest) -> None:
    if (fp16.dtype, fp32.dtype) != ("float16", "float32"):
        raise EngineError(f"fp16 parity compares a float16 engine with a float32 one; got {fp16.dtype} and "
                          f"{fp32.dtype}")
    mine = [(g.name, g.layers) for g in fp16.graphs]
    theirs = [(g.name, g.layers) for g in fp32.graphs]
    shape = [replace(m.model, name="", source="") for m in (fp16, fp32)]
    if mine != theirs or fp16.attention != fp32.attention or shape[0] != shape[1]:
        raise EngineError("the fp16 and fp32 engines are not exports of the same model, attention and buckets: "
                          f"{mine} ({fp16.attention}) vs {theirs} ({fp32.attention})")


def check_fp16_parity(fp16_dir: str | Path, fp32_dir: str | Path,
                      candidate: Callable[[GraphSpec], object] | None = None, iterations: int = 2,
                      seed: int = 0) -> dict:
    """-> {graph: {output: {max_abs_diff, limit, finite, passed}}}; raises Fp16ParityError naming each failure.
    `candidate` maps a graph to a polygraphy runner of the fp16 engine (default: onnxruntime CPU)."""
    reference = OrtRunners(fp32_dir, label="fp32")
    fp16 = load_manifest(fp16_dir)
    fp32 = reference.manifest.without_drafts()  # lossless mode's int8 drafts have no fp16 twin
    _check_twins(fp16, fp32)
    candidate = candidate or OrtRunners(fp16_dir, label="fp16")
    try:
        return compare_engine(fp32, reference, candidate, FP16_VS_FP32, iterations=iterations, seed=seed)
    except CrossBackendError as exc:
        raise Fp16ParityError(f"fp16 engine {Path(fp16_dir).name} vs the fp32 reference: {exc}") from exc


def check_fp16_export(fp32_cfg, fp16_dir: str | Path, progress: bool = False) -> dict:
    """For the exporter: export the fp32 twin described by `fp32_cfg` (the fp16 export's ExportConfig with
    dtype="fp32" and the onnxruntime backend; its `out` is ignored) into a temporary directory next to `fp16_dir`,
    run `check_fp16_parity` against it, and remove it."""
    from .exporter import export  # the exporter calls this module: import here, not at module level
    if fp32_cfg.dtype != "fp32":
        raise EngineError(f"the reference export must be fp32, got dtype={fp32_cfg.dtype!r}")
    tmp = Path(tempfile.mkdtemp(prefix=".fp32-reference-", dir=Path(fp16_dir).parent))
    try:
        export(replace(fp32_cfg, out=tmp / "engine", force=True), progress=progress)
        return check_fp16_parity(fp16_dir, tmp / "engine")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
