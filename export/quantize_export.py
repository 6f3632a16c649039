"""`skipdecode export --quantize`: weight-only quantization of a freshly traced engine, and the PyTorch reference
that parity compares it with.

Scheme names users give: `int8` (8-bit `MatMulNBits`, symmetric, the largest block in 128/64/32 that divides every
quantized input dimension, accuracy level 4 so MLAS runs int8 dot products, LM head and the tied embedding gather
included) and `int4` (the same at 4 bits); anything else is a full scheme string of export/quantize.py
(`int8-b64-a4`, `dyn8`, ...). int8 against fp32 steps, tokens/s and memory: docs/bench/2026-11-30/quick/bench.md
(and the opt-1.3b report beside it); the weights are 3.7x smaller. From a one-off scheme sweep on
the same shape (a script not kept in the repo): leaving the head in float cost 1.3-1.5x, and round-to-nearest int4
logits drift (cosine 0.94-0.97 vs fp32), so int4 needs a quality check on the real checkpoint first.

Parity: the graphs are checked against the PyTorch model carrying the dequantized weights (what the quantized
graphs effectively multiply with); activations are quantized per block at run time (accuracy level 4), so the
tolerance is wider than fp32's (export/parity.py, per bit width).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from ..runtime.errors import EngineError
from ..runtime.manifest import WEIGHTS_FILE, GraphSpec, OPTShape, WeightEntry
from .onnx_export import IR_VERSION
from .quantize import attach_external, dequantize, parse_scheme, quantize_graphs, write_weights_file

SHORT_SCHEMES = ("int8", "int4")


def resolve_scheme(name: str, shape: OPTShape, dtype: str) -> str:
    """A user's --quantize value -> a full scheme string; bad values are refused before any tracing."""
    if dtype != "float32":
        raise EngineError(f"--quantize {name} needs --dtype fp32 (quantized {dtype} graphs are not supported)")
    if name in SHORT_SCHEMES:
        dims = (shape.hidden_size, shape.ffn_dim, shape.word_embed_proj_dim)
        block = next((b for b in (128, 64, 32, 16) if all(d % b == 0 for d in dims)), None)
        if block is None:
            raise EngineError(f"--quantize {name}: the input dimensions {dims} share no block size in 16..128")
        name = f"{name}-b{block}"
    try:
        parse_scheme(name)
    except ValueError as exc:
        raise EngineError(f"--quantize: {exc}") from exc
    return name


def quantize_files(tmp: Path, graphs: list[GraphSpec], index: dict[str, WeightEntry], scheme: str
                   ) -> tuple[dict[str, WeightEntry], list[GraphSpec], dict]:
    """Quantize the traced graphs in `tmp` in place: every shared weight once, weights.bin rewritten, the graphs
    re-pointed at it. -> (new weights index, graphs with their new weight lists, the manifest's quantization)."""
    protos = {g.name: onnx.load(str(tmp / g.file), load_external_data=False) for g in graphs}
    buf = np.fromfile(tmp / WEIGHTS_FILE, dtype=np.uint8)  # in memory: the file is rewritten below
    weights = {k: buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape) for k, w in index.items()}
    q_protos, q_weights, info = quantize_graphs(protos, weights, scheme)
    raw = write_weights_file(q_weights, tmp / WEIGHTS_FILE)
    out = []
    for g in graphs:
        model = q_protos[g.name]
        used = attach_external(model, raw)
        model.ir_version = IR_VERSION
        onnx.save(model, str(tmp / g.file))
        out.append(replace(g, weights=tuple(used)))
    new_index = {k: WeightEntry(v["dtype"], tuple(v["shape"]), v["offset"], v["nbytes"]) for k, v in raw.items()}
    return new_index, out, info


def dequantized_model(model, directory: Path, index: dict[str, WeightEntry], info: dict):
    """A copy of `model` whose parameters are the weights the quantized graphs effectively use."""
    buf = np.fromfile(Path(directory) / WEIGHTS_FILE, dtype=np.uint8)
    q = {k: buf[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape) for k, w in index.items()}
    effective = dequantize(q, info)
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    tied_kept = set(info.get("tied_float_kept", ()))  # the gather reads the float table, only the head is quantized
    with torch.no_grad():
        for name in info["tensors"]:
            if name in tied_kept:
                ref.lm_head.weight = torch.nn.Parameter(torch.from_numpy(effective[name]).clone())  # untie
            else:
                params[name].copy_(torch.from_numpy(effective[name]))
    return ref
