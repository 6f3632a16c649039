"""Tracing to ONNX with one shared weights file.

Graphs are traced with `export_params=False`, so parameters become graph inputs named by their PyTorch names
and nothing is written per graph. `attach_weights` then turns those inputs into initializers stored as ONNX
external data at offsets of the one `weights.bin` (written once by `write_weights`). Every graph of an engine
thus references the same file, and the runtime can hand each session the same in-memory buffers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from ..runtime.contract import TensorSpec, dynamic_axes
from ..runtime.errors import EngineError
from ..runtime.manifest import WEIGHTS_FILE, WeightEntry
from ..runtime.weights import write_weights as write_arrays

OPSET = 17
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 loads at most IR 13

_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}


def write_weights(module: torch.nn.Module, path: Path) -> dict[str, WeightEntry]:
    """Every (deduplicated) parameter of `module` into the shared weights file (runtime/weights.py)."""
    # tied weights appear once, under their first name
    return write_arrays({name: p.detach().cpu().numpy() for name, p in module.named_parameters()}, path)


def trace(module: torch.nn.Module, args: Sequence[torch.Tensor], inputs: Sequence[TensorSpec],
          outputs: Sequence[TensorSpec], path: Path, contrib_ops: bool = False) -> None:
    """Legacy (TorchScript) exporter: faster to run and gave faster ORT graphs than dynamo here (DESIGN §4).
    Constant folding is off so parameter names survive. `contrib_ops`: the graph uses com.microsoft ops."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python ints in shapes are expected
        torch.onnx.export(module, tuple(args), str(path), input_names=[s.name for s in inputs],
                          output_names=[s.name for s in outputs], dynamic_axes=dynamic_axes([*inputs, *outputs]),
                          opset_version=OPSET, do_constant_folding=False, export_params=False, dynamo=False,
                          custom_opsets={"com.microsoft": 1} if contrib_ops else None)


def attach_weights(path: Path, index: dict[str, WeightEntry], io_names: Sequence[str]) -> list[str]:
    """Replace parameter inputs of the graph at `path` by external-data initializers in WEIGHTS_FILE.

    Returns the weight names the graph uses. Fails if the graph has an input that is neither part of the I/O
    contract nor a known weight.
    """
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    keep, used = [], []
    for inp in graph.input:
        if inp.name in io_names:
            keep.append(inp)
            continue
        if inp.name not in index:
            raise EngineError(f"graph {path.name} has input {inp.name!r} that is neither I/O nor a weight")
        w = index[inp.name]
        t = TensorProto(name=inp.name, data_type=_ONNX_DTYPES[w.dtype], dims=list(w.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(w.offset)), ("length", str(w.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        graph.initializer.append(t)
        used.append(inp.name)
    del graph.input[:]
    graph.input.extend(keep)
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return used


# Operators whose weight operand (input 1) onnxruntime's CPU kernels pre-pack into their own layout at session
# creation; once packed, the kernel never reads the original tensor again.
PREPACKING_OPS = {("", "MatMul"), ("", "Gemm"), ("com.microsoft", "MatMulNBits"),
                  ("com.microsoft", "DynamicQuantizeMatMul")}


def prepacked_weights(directory: Path, files: Sequence[str], weights: Sequence[str]) -> tuple[str, ...]:
    """The weights that every node of every graph in `files` reads only as input 1 of a `PREPACKING_OPS` operator
    (the manifest's `prepacked`). A weight with any other reader (the token embedding's Gather, a bias, a norm, the
    scales of a quantized matrix) is left out: its bytes must stay readable for the engine's lifetime."""
    names, uses = set(weights), {}
    for file in files:
        for node in onnx.load(str(Path(directory) / file), load_external_data=False).graph.node:
            for i, name in enumerate(node.input):
                if name in names:
                    uses.setdefault(name, set()).add((node.domain or "", node.op_type, i))
    return tuple(sorted(n for n, u in uses.items() if all(i == 1 and (d, op) in PREPACKING_OPS for d, op, i in u)))
