"""Weight-only quantization of an engine's graphs (all graphs at once, every shared weight quantized once).

Schemes (`parse_scheme`): a base name plus optional `-` separated options.

* ``int8`` / ``int4``: onnxruntime ``com.microsoft::MatMulNBits``, blockwise along K (the input dimension), round to
  nearest. Options: ``b<N>`` block size (16..256, power of two; default 32), ``a<N>`` accuracy_level (default 4: MLAS
  quantizes the activations per block to int8 and runs an int8 dot-product kernel; 0/1 dequantize to fp32 first),
  ``sym`` / ``asym`` (default sym for int8, asym for int4; sym stores no zero points: MatMulNBits then uses
  2^(bits-1)), ``nohead`` (leave the LM head in float), ``floatembed`` (keep the float embedding table for the
  token Gather even though the tied head is quantized).
* ``dyn8``: ``com.microsoft::DynamicQuantizeMatMul``: 7-bit weights (int8 storage, |q| <= 63) [K, N] with one
  symmetric scale per output column; the activations are quantized to uint8 per tensor at run time. Option
  ``nohead``. Why 7 bits: on x86-64 CPUs without VNNI, MLAS multiplies uint8 activations by int8 weights with
  ``vpmaddubsw``, which adds two u8 x s8 products into an int16 with saturation; 255 * (63 + 63) = 32130 stays
  below 2^15 - 1 = 32767, while 8-bit weights (255 * 254 = 64770) saturate and silently corrupt the result
  (onnxruntime's own quantization tools reduce the weight range for the same reason). `u8s8_pair_bound` states
  the bound; VNNI CPUs accumulate in int32 and would not need it, but one engine file must be right on every CPU.

Exact and fast paths: with ``accuracy_level`` 4 MatMulNBits rounds each block of activations to int8, so its
output differs from the dequantized float model by that rounding (the fast path every user gets by default).
`exact_graph` rewrites a graph for a check only (never saved into an engine) so that it multiplies by the
dequantized weights in float32: MatMulNBits at accuracy level 1, DynamicQuantizeMatMul as Cast * scale -> MatMul.

Example: ``int8``, ``int8-b64-a1``, ``int4-b32-a4-sym``, ``dyn8-nohead``.

What is rewritten: every ``Gemm(A, W[, bias])`` with ``transB=1`` (our Linears, weight [N, K]), ``alpha = beta = 1``,
``transA = 0`` and every ``MatMul(A, W)`` (weight [K, N]) whose W is a 2-D float entry of `weights`. The output keeps
its name, so nothing downstream changes. The LM head of OPT is tied to ``embed_tokens``: with MatMulNBits the
token ``Gather`` becomes ``com.microsoft::GatherBlockQuantized`` over the very same packed tensor (plus a [V, blocks,
1] view of the scales, which that op wants at the data's rank), so the float table disappears from the weights
file. Where that is not possible (dyn8, 4-bit asym, K not a multiple of the block, ``floatembed``) the Gather keeps
the float table and the head reads a quantized copy; ``info["tied_float_kept"]`` lists such weights.

Graph forms: a weight referenced as a graph *input* (the exporter's traced graphs before ``attach_weights``) is
replaced by inputs for the quantized tensors, so ``attach_weights`` turns them into external initializers exactly
as it does for float weights. A weight referenced as an *initializer* is replaced by external-data initializers
that point at ``weights.bin`` with no offset yet: ``attach_external`` (or ``save_engine_files``) assigns them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..runtime.manifest import WEIGHTS_FILE, WeightEntry, load_manifest
from ..runtime.weights import read_weights, write_weights

MS_DOMAIN = "com.microsoft"

_NP_TO_ONNX = {np.dtype(k): v for k, v in (("float32", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16),
                                            ("uint8", TensorProto.UINT8), ("int8", TensorProto.INT8),
                                            ("int64", TensorProto.INT64), ("int32", TensorProto.INT32))}


# ---------------------------------------------------------------------------------------------------------- scheme

@dataclass(frozen=True)
class QuantScheme:
    """A parsed weight-quantization scheme. `manifest_fields()` is what an engine's manifest records of it."""

    scheme: str  # as given, e.g. "int8-b64-a4-sym"
    op: str  # "MatMulNBits" | "DynamicQuantizeMatMul"
    bits: int
    symmetric: bool
    lm_head: bool = True  # quantize the LM head too
    block_size: int | None = None  # MatMulNBits: weights per scale
    accuracy_level: int | None = None  # MatMulNBits: 4 = int8 activations per block, 1 = float32 (exact)
    quantized_gather: bool | None = None  # MatMulNBits: the embedding lookup reads the quantized table

    def manifest_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_scheme(scheme: str) -> QuantScheme:
    """'int8-b64-a4-sym' -> QuantScheme(op="MatMulNBits", bits=8, block_size=64, accuracy_level=4, ...)."""
    base, *opts = scheme.strip().lower().split("-")
    if base in ("int8", "int4"):
        bits = int(base[3:])
        fields = {"op": "MatMulNBits", "bits": bits, "block_size": 32, "accuracy_level": 4, "symmetric": bits == 8,
                  "quantized_gather": True}
    elif base == "dyn8":
        fields = {"op": "DynamicQuantizeMatMul", "bits": 8, "symmetric": True}
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r}: base must be int8, int4 or dyn8")
    nbits = fields["op"] == "MatMulNBits"
    for opt in opts:
        if opt == "nohead":
            fields["lm_head"] = False
        elif opt in ("sym", "asym") and nbits:
            fields["symmetric"] = opt == "sym"
        elif re.fullmatch(r"b\d+", opt) and nbits:
            bs = int(opt[1:])
            if bs < 16 or bs > 256 or bs & (bs - 1):
                raise ValueError(f"block size {bs} in {scheme!r}: MatMulNBits needs a power of two in [16, 256]")
            fields["block_size"] = bs
        elif opt == "floatembed" and nbits:
            fields["quantized_gather"] = False
        elif re.fullmatch(r"a[0-4]", opt) and nbits:
            fields["accuracy_level"] = int(opt[1:])
        else:
            raise ValueError(f"unknown option {opt!r} in quantization scheme {scheme!r}")
    return QuantScheme(scheme=scheme, **fields)


# ------------------------------------------------------------------------------------------- quantize / dequantize

def quantize_nbits(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """W [N, K] float -> (packed uint8 [N, k_blocks, block_size*bits/8], scales [N, k_blocks] (W's dtype),
    zero points uint8 [N, ceil(k_blocks*bits/8)] or None). MatMulNBits layout: blocks run along K; 4-bit values
    (and 4-bit zero points) are packed two per byte, the lower index in the low nibble."""
    w = np.asarray(w_nk, dtype=np.float32)
    n, k = w.shape
    kb = -(-k // block_size)
    if kb * block_size != k:
        w = np.pad(w, ((0, 0), (0, kb * block_size - k)))
    blocks = w.reshape(n, kb, block_size)
    mid = 1 << (bits - 1)
    qmax = (1 << bits) - 1
    if symmetric:
        amax = np.abs(blocks).max(axis=-1)
        scale = amax / (mid - 1)
        zp = None
        zp_full = np.full((n, kb), mid, dtype=np.int32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / qmax
        safe = np.where(scale > 0, scale, 1.0)
        zp_full = np.clip(np.rint(-lo / safe), 0, qmax).astype(np.int32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(blocks / safe[..., None]) + zp_full[..., None], 0, qmax).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if not symmetric:
        zp = zp_full.astype(np.uint8)
        if bits == 4:
            if kb % 2:
                zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=0)
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), scale.astype(w_nk.dtype), zp


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                     block_size: int, k: int) -> np.ndarray:
    """Inverse of `quantize_nbits` as MatMulNBits computes it: (q - zp) * scale -> W [N, K] float32."""
    n, kb = scales.shape
    q = packed.astype(np.int32)
    if bits == 4:
        q = np.stack([q & 0xF, q >> 4], axis=-1).reshape(n, kb, block_size)
    if zero_points is None:
        zp = np.full((n, kb), 1 << (bits - 1), dtype=np.int32)
    else:
        zp = zero_points.astype(np.int32)
        if bits == 4:
            zp = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :kb]
    w = (q - zp[..., None]).astype(np.float32) * scales.astype(np.float32)[..., None]
    return w.reshape(n, kb * block_size)[:, :k]


DYN8_QMAX = 63  # 7-bit weights: see the module docstring (u8 x s8 pairs must fit an int16 on AVX2)
INT16_MAX = (1 << 15) - 1


def quantize_dyn8(w_nk: np.ndarray, qmax: int = DYN8_QMAX):
    """W [N, K] -> (int8 [K, N] in [-qmax, qmax], scales [N]): symmetric, one scale per output column
    (DynamicQuantizeMatMul B)."""
    w = np.asarray(w_nk, dtype=np.float32)
    scale = np.abs(w).max(axis=1) / float(qmax)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / safe[:, None]), -qmax, qmax).astype(np.int8)
    return np.ascontiguousarray(q.T), scale.astype(np.float32)


def u8s8_pair_bound(q_kn: np.ndarray) -> int:
    """The largest |a0 * w0 + a1 * w1| any uint8 activations can produce over two weights adjacent along K (the pair
    `vpmaddubsw` adds into one int16) of int8 weights [K, N]: 255 x the larger of the positive and the negative
    part of each pair. Above 32767 the AVX2 kernel saturates."""
    q = np.asarray(q_kn, dtype=np.int64)
    if q.shape[0] % 2:
        q = np.concatenate([q, np.zeros((1, q.shape[1]), dtype=np.int64)])
    pos = np.maximum(q, 0)[0::2] + np.maximum(q, 0)[1::2]
    neg = np.minimum(q, 0)[0::2] + np.minimum(q, 0)[1::2]
    return int(255 * max(pos.max(initial=0), -neg.min(initial=0)))


# ------------------------------------------------------------------------------------------------- graph rewrite

def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _candidates(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> dict[str, tuple[str, list]]:
    """weight name -> (layout "NK" | "KN", [node indices]) for the Gemm/MatMul nodes this module can rewrite."""
    out: dict[str, tuple[str, list]] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        if w.ndim != 2 or w.dtype.kind != "f":
            continue
        if node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transB", 0) != 1 or a.get("transA", 0) != 0 or a.get("alpha", 1.0) != 1.0 \
                    or a.get("beta", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2] and (node.input[2] not in weights
                                                          or weights[node.input[2]].ndim != 1):
                continue
            layout = "NK"
        elif node.op_type == "MatMul":
            layout = "KN"
        else:
            continue
        prev = out.get(node.input[1])
        if prev is not None and prev[0] != layout:
            continue  # used both as [N, K] and [K, N]: leave it
        out.setdefault(node.input[1], (layout, []))[1].append(index)
    return out


def _gathered(graphs: Iterable[onnx.ModelProto]) -> set[str]:
    """Weights read by a Gather (embeddings): the LM head tied to one of them is the `lm_head`."""
    return {n.input[0] for m in graphs for n in m.graph.node if n.op_type == "Gather"}


def quantize_graphs(graphs: dict[str, onnx.ModelProto], weights: dict[str, np.ndarray], scheme: str,
                    tag: str = "") -> tuple[dict[str, onnx.ModelProto], dict[str, np.ndarray], dict]:
    """Rewrite every eligible Gemm/MatMul of `graphs` to the quantized op of `scheme`. The quantized tensors of
    weight W are named `W<tag>.qweight`, `W<tag>.qscale`, ...: a `tag` keeps a second weight set of the same model
    apart from the first inside one weights file.

    Returns (new graphs (copies; inputs untouched), new weights dict (float weights no graph needs any more are
    dropped; each quantized tensor appears once, under one name, whichever graphs use it), info for the
    manifest: {"scheme", "op", "bits", ..., "lm_head", "quantized": [names], "tensors": {name: {...}},
    "tied_float_kept": [names]}).
    """
    cfg = parse_scheme(scheme)
    graphs = {k: _copy(m) for k, m in graphs.items()}
    gathered = _gathered(graphs.values())
    per_graph = {k: _candidates(m.graph, weights) for k, m in graphs.items()}
    layouts: dict[str, str] = {}
    for cands in per_graph.values():
        for name, (layout, _) in cands.items():
            layouts.setdefault(name, layout)
    head = sorted(n for n in layouts if n in gathered)  # a Linear on an embedding table = tied LM head
    chosen = sorted(n for n in layouts if cfg.lm_head or n not in gathered)

    new_weights = dict(weights)
    tensors: dict[str, dict] = {}
    for name in chosen:  # each shared weight once
        w = weights[name]
        w_nk = w if layouts[name] == "NK" else w.T
        n, k = w_nk.shape
        entry = {"layout": layouts[name], "N": int(n), "K": int(k), "dtype": str(w.dtype)}
        if cfg.op == "MatMulNBits":
            packed, scales, zp = quantize_nbits(w_nk, cfg.bits, cfg.block_size, cfg.symmetric)
            entry.update(weight=f"{name}{tag}.qweight", scales=f"{name}{tag}.qscale",
                         zero_points=f"{name}{tag}.qzero" if zp is not None else None)
            new_weights[entry["weight"]] = packed
            new_weights[entry["scales"]] = scales
            if zp is not None:
                new_weights[entry["zero_points"]] = zp
            if name in gathered and cfg.quantized_gather and k % cfg.block_size == 0 \
                    and (cfg.bits == 8 or zp is None):
                entry["gather_scales"] = f"{name}{tag}.qscale_g"
                new_weights[entry["gather_scales"]] = np.ascontiguousarray(scales[..., None])
                if zp is not None:
                    entry["gather_zero_points"] = f"{name}{tag}.qzero_g"
                    new_weights[entry["gather_zero_points"]] = np.ascontiguousarray(zp[..., None])
        else:
            if w.dtype != np.float32:
                raise ValueError(f"{scheme!r}: DynamicQuantizeMatMul takes float32 only; {name} is {w.dtype}")
            q, scales = quantize_dyn8(w_nk)
            if u8s8_pair_bound(q) > INT16_MAX:  # cannot happen at 7 bits; a guard for changes to quantize_dyn8
                raise ValueError(f"{scheme!r}: {name} would saturate int16 u8 x s8 pairs on CPUs without VNNI")
            entry.update(weight=f"{name}{tag}.qweight", scales=f"{name}{tag}.qscale", zero_points=None)
            new_weights[entry["weight"]] = q
            new_weights[entry["scales"]] = scales
        tensors[name] = entry

    for key, model in graphs.items():
        _rewrite(model, per_graph[key], tensors, new_weights, cfg)

    still_used = {i for m in graphs.values() for n in m.graph.node for i in n.input}
    for name in chosen:
        if name not in still_used:
            del new_weights[name]
        for key in ("gather_scales", "gather_zero_points"):  # no Gather could be rewritten: drop its tensors
            if tensors[name].get(key) and tensors[name][key] not in still_used:
                del new_weights[tensors[name].pop(key)]
    info = cfg.manifest_fields()
    info.update(quantized=chosen, lm_head_weights=[n for n in head if n in chosen],
                tied_float_kept=[n for n in chosen if n in new_weights], tensors=tensors)
    return graphs, new_weights, info


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


_TENSOR_KEYS = ("weight", "scales", "zero_points", "gather_scales", "gather_zero_points")


def _rank(graph: onnx.GraphProto, name: str) -> int | None:
    for vi in (*graph.input, *graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _gather_node(node, t: dict, cfg: QuantScheme, graph: onnx.GraphProto) -> list | None:
    """Gather(table, ids) -> GatherBlockQuantized(packed, ids, scales_g[, zp_g]) [..., blocks, block] + Reshape."""
    if not t.get("gather_scales") or _attrs(node).get("axis", 0) != 0:
        return None
    rank = _rank(graph, node.input[1])
    if rank is None:
        return None
    ins = [t["weight"], node.input[1], t["gather_scales"]] + ([t["gather_zero_points"]] if t.get("gather_zero_points")
                                                              else [])
    blocks, shape = node.output[0] + "_blocks", node.output[0] + "_shape"
    return [helper.make_node("GatherBlockQuantized", ins, [blocks], name=node.name + "_q", domain=MS_DOMAIN,
                             bits=cfg.bits, block_size=cfg.block_size, gather_axis=0, quantize_axis=2),
            helper.make_node("Constant", [], [shape], name=node.name + "_shape",
                             value=onnx.numpy_helper.from_array(np.array([0] * rank + [t["K"]], dtype=np.int64))),
            helper.make_node("Reshape", [blocks, shape], list(node.output), name=node.name + "_reshape")]


def _rewrite(model: onnx.ModelProto, cands: dict, tensors: dict, new_weights: dict, cfg: QuantScheme) -> None:
    graph = model.graph
    replaced: dict[int, list] = {}  # node index -> replacement nodes
    for name, (_, indices) in cands.items():
        if name not in tensors:
            continue
        t = tensors[name]
        for index in indices:
            node = graph.node[index]
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
            if cfg.op == "MatMulNBits":
                ins = [node.input[0], t["weight"], t["scales"], t["zero_points"] or "", "", bias]
                while ins and not ins[-1]:
                    ins.pop()
                new = helper.make_node("MatMulNBits", ins, list(node.output), name=node.name + "_q", domain=MS_DOMAIN,
                                       K=t["K"], N=t["N"], bits=cfg.bits, block_size=cfg.block_size,
                                       accuracy_level=cfg.accuracy_level)
            else:
                ins = [node.input[0], t["weight"], t["scales"], "", bias]
                while ins and not ins[-1]:
                    ins.pop()
                new = helper.make_node("DynamicQuantizeMatMul", ins, list(node.output), name=node.name + "_q",
                                       domain=MS_DOMAIN)
            replaced[index] = [new]
    shapes = None  # the indices' rank: from the graph's inputs, else from shape inference (a flattened id tensor)
    for index, node in enumerate(graph.node):  # token embeddings tied to a quantized head
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] in tensors:
            if shapes is None:
                shapes = onnx.shape_inference.infer_shapes(model).graph
            new_nodes = _gather_node(node, tensors[node.input[0]], cfg, shapes)
            if new_nodes:
                replaced[index] = new_nodes
    if not replaced:
        return
    nodes = []
    for index, node in enumerate(graph.node):
        nodes.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    # the quantized tensors this graph now reads, in the form (input / initializer) its float weight had
    used = {i for n in graph.node for i in n.input}
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    for name, t in tensors.items():
        for nn in (t[k] for k in _TENSOR_KEYS if t.get(k)):
            if nn not in used:
                continue
            arr = new_weights[nn]
            if name in inputs:
                graph.input.append(helper.make_tensor_value_info(nn, _NP_TO_ONNX[arr.dtype], list(arr.shape)))
            elif name in inits:
                graph.initializer.append(_initializer(nn, arr, _location(inits[name])))
    keep_inits = [t for t in graph.initializer if t.name in used or t.name not in tensors]
    keep_inputs = [i for i in graph.input if i.name in used or i.name not in tensors]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.input[:]
    graph.input.extend(keep_inputs)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def share_quantized_gather(model: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """Make `model` (a graph quantized by a scheme that keeps the float embedding table for its token Gather, such
    as dyn8) look tokens up as `quantized` (the same traced graph under a MatMulNBits scheme) does: each Gather that
    `quantized` replaced by GatherBlockQuantized (+ its shape Constant and Reshape, see `_gather_node`) is replaced
    by those nodes in `model`, reading the same packed tensors, so two weight sets of one engine share one table.
    In place. -> the float tables `model` no longer reads (their initializers or inputs are removed)."""
    q_nodes = {n.name: n for n in quantized.graph.node if n.name}
    by_name = {n.name: i for i, n in enumerate(model.graph.node) if n.name}
    replaced: dict[int, list] = {}
    borrowed: set[str] = set()
    for node in quantized.graph.node:
        if node.op_type != "GatherBlockQuantized" or not node.name.endswith("_q"):
            continue
        base = node.name.removesuffix("_q")
        index = by_name.get(base)
        parts = [q_nodes.get(base + "_shape"), q_nodes.get(base + "_reshape")]
        if index is None or model.graph.node[index].op_type != "Gather" or None in parts:
            raise ValueError(f"graph {model.graph.name!r} has no token Gather {base!r} matching {node.name!r}")
        replaced[index] = [node, *parts]
        borrowed.update(i for i in node.input[:1] + node.input[2:] if i)
    if not replaced:
        return []
    tables = {model.graph.node[i].input[0] for i in replaced}
    nodes = []
    for index, n in enumerate(model.graph.node):
        nodes.extend(replaced.get(index, [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    have = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    model.graph.initializer.extend(t for t in quantized.graph.initializer if t.name in borrowed - have)
    model.graph.input.extend(i for i in quantized.graph.input if i.name in borrowed - have)
    read = {i for n in model.graph.node for i in n.input}
    dropped = sorted(tables - read)
    keep_inits = [t for t in model.graph.initializer if t.name not in dropped]
    keep_inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_inits)
    del model.graph.input[:]
    model.graph.input.extend(keep_inputs)
    return dropped


def _location(t: TensorProto) -> str | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return next((e.value for e in t.external_data if e.key == "location"), WEIGHTS_FILE)


def _initializer(name: str, arr: np.ndarray, location: str | None) -> TensorProto:
    """Embedded data when the float weight was embedded, else an external-data stub (offset set by attach_external)."""
    if location is None:
        return onnx.numpy_helper.from_array(arr, name)
    t = TensorProto(name=name, data_type=_NP_TO_ONNX[arr.dtype], dims=list(arr.shape))
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", location
    return t


def exact_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a quantized graph that multiplies by the dequantized weights in float32 (for parity checks only):
    MatMulNBits at accuracy level 1 (MLAS dequantizes each block and runs an fp32 GEMM), DynamicQuantizeMatMul as
    MatMul(A, Cast(B) * scale) [+ bias]. The weights stay the engine's own tensors, so a wrong scale still shows."""
    model = _copy(model)
    nodes = []
    for node in model.graph.node:
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 1
            nodes.append(node)
        elif node.domain == MS_DOMAIN and node.op_type == "DynamicQuantizeMatMul":
            a, b, scale = node.input[0], node.input[1], node.input[2]
            bias = node.input[4] if len(node.input) > 4 else ""
            wf, w, mm = (f"{node.name}_exact_{x}" for x in ("cast", "weight", "matmul"))
            nodes += [helper.make_node("Cast", [b], [wf], name=wf, to=TensorProto.FLOAT),
                      helper.make_node("Mul", [wf, scale], [w], name=w),
                      helper.make_node("MatMul", [a, w], [mm if bias else node.output[0]], name=mm)]
            if bias:
                nodes.append(helper.make_node("Add", [mm, bias], [node.output[0]], name=f"{node.name}_exact_bias"))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def dequantize(weights_q: dict[str, np.ndarray], info: dict) -> dict[str, np.ndarray]:
    """The float weights the quantized graphs effectively use (quantized names -> their original names, in the
    original shape and layout); every other entry of `weights_q` that is not a quantized tensor passes through."""
    quant_names = {t[k] for t in info["tensors"].values() for k in _TENSOR_KEYS if t.get(k)}
    out = {k: v for k, v in weights_q.items() if k not in quant_names}
    for name, t in info["tensors"].items():
        if info["op"] == "MatMulNBits":
            zp = weights_q[t["zero_points"]] if t["zero_points"] else None
            w_nk = dequantize_nbits(weights_q[t["weight"]], weights_q[t["scales"]], zp, info["bits"],
                                    info["block_size"], t["K"])
        else:
            w_nk = (weights_q[t["weight"]].astype(np.float32) * weights_q[t["scales"]][None, :]).T
        w = w_nk if t["layout"] == "NK" else w_nk.T
        out[name] = np.ascontiguousarray(w.astype(t["dtype"]))
    return out


# ---------------------------------------------------------------------------------------------- files (helpers)

def attach_external(model: onnx.ModelProto, index: dict[str, WeightEntry], location: str = WEIGHTS_FILE
                    ) -> list[str]:
    """Point every weight of `model` (initializer or graph input named in `index`) at its offset in `location`.
    Returns the weight names the graph uses."""
    graph = model.graph
    used = []
    keep_inputs = [i for i in graph.input if i.name not in index]
    names = [i.name for i in graph.input if i.name in index] + [t.name for t in graph.initializer if t.name in index]
    others = [t for t in graph.initializer if t.name not in index]
    del graph.initializer[:]
    graph.initializer.extend(others)
    for name in dict.fromkeys(names):
        w = index[name]
        t = TensorProto(name=name, data_type=_NP_TO_ONNX[np.dtype(w.dtype)], dims=list(w.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(w.offset)), ("length", str(w.nbytes))):
            e = t.external_data.add()
            e.key, e.value = key, value
        graph.initializer.append(t)
        used.append(name)
    del graph.input[:]
    graph.input.extend(keep_inputs)
    return used


def save_engine_files(graphs: dict[str, onnx.ModelProto], weights: dict[str, np.ndarray], directory: Path
                      ) -> dict[str, WeightEntry]:
    """Write `weights` once as directory/weights.bin and every graph as directory/<key>.onnx pointing at it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = write_weights(weights, directory / WEIGHTS_FILE)
    for key, model in graphs.items():
        model = _copy(model)
        attach_external(model, index)
        onnx.save(model, str(directory / f"{key}.onnx"))
    return index


def load_engine_graphs(directory: Path) -> tuple[dict[str, onnx.ModelProto], dict[str, np.ndarray]]:
    """An exported engine directory -> (graphs by graph name, weights by name) as `quantize_graphs` takes them."""
    directory = Path(directory)
    full = load_manifest(directory)
    man = full.without_drafts()  # lossless mode's draft graphs are quantized already: left out with their weights
    drafts_only = {w for g in full.graphs if g.kind == "draft" for w in g.weights} - \
        {w for g in man.graphs for w in g.weights}
    graphs = {g.name: onnx.load(str(directory / g.file), load_external_data=False) for g in man.graphs}
    return graphs, {k: v for k, v in read_weights(directory, man).items() if k not in drafts_only}
