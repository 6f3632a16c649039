"""`skipdecode export --quantize`: weight-only quantization of a freshly traced engine, and the PyTorch reference
that parity compares it with.

Scheme names users give: `int8` (8-bit `MatMulNBits`, symmetric, the largest block in 128/64/32 that divides every
quantized input dimension, accuracy level 4 so MLAS runs int8 dot products, LM head and the tied embedding gather
included) and `int4` (the same at 4 bits); anything else is a full scheme string of export/quantize.py
(`int8-b64-a4`, `dyn8`, ...). int8 against fp32 steps, tokens/s and memory: docs/bench/2026-11-30/quick/bench.md
(and the opt-1.3b report beside it); the weights are 3.7x smaller. From a one-off scheme sweep on
the same shape (a script not kept in the repo): leaving the head in float cost 1.3-1.5x, and round-to-nearest int4
logits drift (cosine 0.94-0.97 vs fp32), so int4 needs a quality check on the real checkpoint first.

Parity (export/parity.py) checks two things. The weights, exactly: session-only copies of the graphs that multiply
by the dequantized weights in float32 (`exact_graph`) against the PyTorch model carrying the same dequantized weights
(`dequantized_model`), at the float32 tolerance. The fast path the user runs (accuracy level 4: each block of
activations rounded to int8; dyn8: each activation tensor rounded to uint8), against the same model, within a stated
multiple of the deviation that rounding causes in PyTorch (`fast_path_rounding` emulates it), so the bound follows
from the arithmetic and not from what one CPU happened to produce.
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
from ..runtime.weights import views, write_weights
from .onnx_export import IR_VERSION
from .quantize import attach_external, dequantize, exact_graph, parse_scheme, quantize_graphs, share_quantized_gather

SHORT_SCHEMES = ("int8", "int4")


def resolve_scheme(name: str, shape: OPTShape, dtype: str, flag: str = "--quantize") -> str:
    """A user's --quantize (or --drafts: `flag`) value -> a full scheme string; bad values are refused before any
    tracing."""
    if dtype != "float32":
        raise EngineError(f"{flag} {name} needs --dtype fp32 (quantized {dtype} graphs are not supported)")
    if name in SHORT_SCHEMES:
        dims = (shape.hidden_size, shape.ffn_dim, shape.word_embed_proj_dim)
        block = next((b for b in (128, 64, 32, 16) if all(d % b == 0 for d in dims)), None)
        if block is None:
            raise EngineError(f"{flag} {name}: the input dimensions {dims} share no block size in 16..128")
        name = f"{name}-b{block}"
    try:
        parse_scheme(name)
    except ValueError as exc:
        raise EngineError(f"{flag}: {exc}") from exc
    return name


def resolve_kernels(value: str, scheme: str, flag: str = "--kernel-candidates") -> tuple[str, ...]:
    """A user's --kernel-candidates -> the extra kernel forms to write (`KERNEL_FORMS`). "auto": `dyn8` for 8-bit
    MatMulNBits engines at accuracy level 4 (on CPUs without VNNI its u8 x s8 kernels beat MatMulNBits' int8 path
    at batch 8: docs/quantization.md), nothing for the others; "none": nothing; else a comma-separated list."""
    cfg = parse_scheme(scheme)
    int8_a4 = cfg.op == "MatMulNBits" and cfg.bits == 8 and cfg.accuracy_level == 4
    if value == "auto":
        return ("dyn8",) if int8_a4 else ()
    if value == "none":
        return ()
    forms = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    unknown = [f for f in forms if f not in KERNEL_FORMS]
    if unknown or not forms:
        raise EngineError(f"{flag} {value!r}: expected auto, none or a list of {', '.join(KERNEL_FORMS)}")
    if cfg.op != "MatMulNBits" or cfg.accuracy_level != 4:
        raise EngineError(f"{flag} {value}: only MatMulNBits engines at accuracy level 4 have other kernel forms "
                          f"(--quantize {scheme})")
    if "dyn8" in forms and cfg.bits != 8:
        raise EngineError(f"{flag} dyn8: only 8-bit engines carry a dyn8 form (--quantize {scheme} is "
                          f"{cfg.bits}-bit; dyn8 would read twice its weight bytes)")
    return forms


KERNEL_FORMS = ("a1", "dyn8")
DYN8_TAG = ".dyn8"


def quantize_files(tmp: Path, graphs: list[GraphSpec], index: dict[str, WeightEntry], scheme: str,
                   kernels: tuple[str, ...] = ()) -> tuple[dict[str, WeightEntry], list[GraphSpec], dict]:
    """Quantize the traced graphs in `tmp` in place: every shared weight once, weights.bin rewritten, the graphs
    re-pointed at it, and the graphs of the other kernel forms in `kernels` written beside them (`_a1_form`,
    `_dyn8_form`).
    -> (new weights index, graphs with their new weight lists, the manifest's quantization)."""
    protos = {g.name: onnx.load(str(tmp / g.file), load_external_data=False) for g in graphs}
    weights = views(np.fromfile(tmp / WEIGHTS_FILE, dtype=np.uint8), index)  # in memory: the file is rewritten
    q_protos, q_weights, info = quantize_graphs(protos, weights, scheme)
    dyn8 = _dyn8_graphs(protos, weights, q_protos, q_weights) if "dyn8" in kernels else None
    new_index = write_weights({**q_weights, **(dyn8[1] if dyn8 else {})}, tmp / WEIGHTS_FILE)  # one write
    out = []
    for g in graphs:
        model = q_protos[g.name]
        used = attach_external(model, new_index)
        model.ir_version = IR_VERSION
        onnx.save(model, str(tmp / g.file))
        out.append(replace(g, weights=tuple(used)))
    forms = [{"name": f"a{info['accuracy_level']}" if info["op"] == "MatMulNBits" else "dyn8", "files": {},
              "parity": "engine"}]
    if "a1" in kernels:
        forms.append(_a1_form(tmp, out))
    if dyn8:
        forms.append(_dyn8_form(tmp, out, new_index, dyn8[0], dyn8[2]))
    info["kernels"] = forms
    return new_index, out, info


def _a1_form(tmp: Path, graphs: list[GraphSpec]) -> dict:
    """`<graph>.a1.onnx`: the same weights at accuracy level 1 (MLAS dequantizes each weight block and runs a
    float32 GEMM; the activations are not rounded). That graph is byte for byte what the export's "exact.*" parity
    check loads (`exact_graph`), so it is held to the float32 bound."""
    files = {}
    for g in graphs:
        name = g.file.removesuffix(".onnx") + ".a1.onnx"
        onnx.save(exact_graph(onnx.load(str(tmp / g.file), load_external_data=False)), str(tmp / name))
        files[g.name] = name
    return {"name": "a1", "files": files, "parity": "exact"}


def _dyn8_graphs(float_protos: dict, float_weights: dict, q_protos: dict, q_weights: dict
                 ) -> tuple[dict, dict, dict]:
    """The dyn8 kernel form in memory: every Linear of the float graphs as DynamicQuantizeMatMul over a second
    weight set (7-bit per-column codes, tagged `.dyn8`), its token lookup reading the engine's own quantized table
    (`share_quantized_gather`), so no float embedding is kept. -> (graphs, the weights to add to `q_weights`, the
    form's quantization info)."""
    d_protos, d_weights, d_info = quantize_graphs(float_protos, float_weights, "dyn8", tag=DYN8_TAG)
    for name, model in d_protos.items():
        share_quantized_gather(model, q_protos[name])
    read = {i for m in d_protos.values() for n in m.graph.node for i in n.input}
    return d_protos, {n: a for n, a in d_weights.items() if n not in q_weights and n in read}, d_info


def _dyn8_form(tmp: Path, graphs: list[GraphSpec], index: dict[str, WeightEntry], d_protos: dict, d_info: dict
               ) -> dict:
    """`<graph>.dyn8.onnx` (`_dyn8_graphs`), pointed at `index` (its weights were written with the engine's).
    Only the chosen form's weights stay resident (the runtime gives back the pages no loaded graph reads). Its
    parity part is "kernel.dyn8": checked at export against a model carrying these weights, with the dyn8 rounding
    bound (export/parity.py)."""
    files, used = {}, {}
    for g in graphs:
        model = d_protos[g.name]
        used[g.name] = attach_external(model, index)
        model.ir_version = IR_VERSION
        files[g.name] = g.file.removesuffix(".onnx") + ".dyn8.onnx"
        onnx.save(model, str(tmp / files[g.name]))
    return {"name": "dyn8", "files": files, "parity": "kernel.dyn8", "weights": used, "quantization": d_info}


def _check_unmoved(index: dict[str, WeightEntry], new_index: dict[str, WeightEntry], what: str) -> None:
    moved = [name for name in index if new_index[name] != index[name]]
    if moved:  # write_weights lays tensors out in order, so the earlier ones cannot move; a guard for changes to it
        raise EngineError(f"adding {what} moved the weight {moved[0]!r} inside {WEIGHTS_FILE}")


def add_quantized_drafts(tmp: Path, graphs: list[GraphSpec], index: dict[str, WeightEntry], scheme: str,
                         buckets: tuple[int, ...]) -> tuple[dict[str, WeightEntry], list[GraphSpec], dict]:
    """Lossless mode's draft graphs: a quantized copy of the decode graph of each of `buckets` (`draft_bNNN.onnx`,
    kind "draft"), for a float engine in `tmp`. The weights those copies read are quantized once and appended to
    weights.bin after every float weight; the float weights keep their bytes and offsets, so the float graphs are
    not touched. -> (new weights index, graphs + the draft graphs, the manifest's `drafts`)."""
    decode = {g.budget: g for g in graphs if g.kind == "decode"}
    names = {b: f"draft_b{b:03d}" for b in buckets}
    protos = {names[b]: onnx.load(str(tmp / decode[b].file), load_external_data=False) for b in buckets}
    float_weights = views(np.fromfile(tmp / WEIGHTS_FILE, dtype=np.uint8), index)  # in memory: the file is rewritten
    q_protos, q_weights, info = quantize_graphs(protos, float_weights, scheme)
    added = {name: arr for name, arr in q_weights.items() if name not in index}
    new_index = write_weights({**float_weights, **added}, tmp / WEIGHTS_FILE)
    _check_unmoved(index, new_index, "the draft weights")
    out = list(graphs)
    for b in buckets:
        model = q_protos[names[b]]
        used = attach_external(model, new_index)
        model.ir_version = IR_VERSION
        onnx.save(model, str(tmp / f"{names[b]}.onnx"))
        spec = decode[b]
        out.append(GraphSpec(names[b], "draft", f"{names[b]}.onnx", b, spec.layers, spec.inputs, spec.outputs,
                             tuple(used)))
    drafts = {"scheme": scheme, "graphs": {str(b): names[b] for b in buckets}, "quantization": info}
    return new_index, out, drafts


def dequantized_model(model, directory: Path, index: dict[str, WeightEntry], info: dict):
    """A copy of `model` whose parameters are the weights the quantized graphs effectively use."""
    q = views(np.fromfile(Path(directory) / WEIGHTS_FILE, dtype=np.uint8), index)
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


def fake_quant_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """MatMulNBits' activation rounding at accuracy level 4: each block of `block` values along the last axis
    becomes int8 with a symmetric scale max|block| / 127 (round half to even), then back to float."""
    k = x.shape[-1]
    pad = -k % block
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
    scale = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(xb / safe), -127, 127)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :k]


def fake_quant_tensor_u8(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeMatMul's activation rounding: the whole tensor to uint8 with an asymmetric scale over
    [min(x, 0), max(x, 0)] and a rounded zero point, then back to float."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return x
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


class FastPathRounding:
    """The engine's fast-path activation rounding on the quantized Linears of a model (the one carrying the
    dequantized weights), as forward pre-hooks that round only while this switch is entered: one model serves as
    both the reference and its emulation, with no second copy of the weights. `remove()` takes the hooks off."""

    def __init__(self, model, info: dict) -> None:
        if info["op"] == "MatMulNBits":
            block = info["block_size"]
            self.rounding = lambda x: fake_quant_blocks(x, block)
        else:
            self.rounding = fake_quant_tensor_u8
        self.on = False
        modules = dict(model.named_modules())
        heads = set(info.get("lm_head_weights", ()))
        self.handles = []
        for name in info["tensors"]:
            path = "lm_head" if name in heads else name.removesuffix(".weight")
            module = modules.get(path)
            if not isinstance(module, torch.nn.Linear):
                raise EngineError(f"quantized weight {name!r} belongs to no Linear of the model ({path!r})")
            self.handles.append(module.register_forward_pre_hook(self._hook))

    def _hook(self, _module, args):
        return (self.rounding(args[0]), *args[1:]) if self.on else None

    def __enter__(self) -> FastPathRounding:
        self.on = True
        return self

    def __exit__(self, *exc) -> None:
        self.on = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def fast_path_rounding(model, info: dict) -> FastPathRounding | None:
    """The rounding the engine's kernels apply to activations (per weight block to int8: MatMulNBits at accuracy
    level 4; per tensor to uint8: dyn8) as a switch on `model`; None where they round nothing (level < 4)."""
    if info["op"] == "MatMulNBits" and info.get("accuracy_level", 0) < 4:
        return None
    return FastPathRounding(model, info)
