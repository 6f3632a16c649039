"""Weight-only quantization (export/quantize.py): the quantized graphs compute what the float graphs compute on the
dequantized weights, every quantized tensor is stored once, and a corrupted scale is caught."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from skipdecode.export import quantize as Q  # noqa: E402
from skipdecode.export.exporter import ExportConfig, export  # noqa: E402
from skipdecode.runtime.ort_sessions import session_options  # noqa: E402

# Max |quantized logits - float logits on dequantized weights| / max |float logits|. accuracy_level 4 also quantizes
# the activations (int8 per block) and dyn8 quantizes them per tensor, so those differ by more than rounding.
# Measured on these tiny models (init std 0.15): 1.5e-2..6e-2 with quantized activations (accuracy_level 4, dyn8),
# 0 without (MLAS dequantizes the weights and runs the same fp32 GEMM; the Gather is exact).
TOLERANCE = {"int8-a1": 1e-4, "int4-sym-a1": 1e-4, "int8": 0.12, "int8-b64-asym": 0.12, "int4": 0.12,
             "int4-sym-b64": 0.12, "dyn8": 0.12}
B, T = 2, 24


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    """(graphs, weights, engine dir) of a tiny export: prefill, full depth, one 3-layer bucket."""
    style, ckpt = tiny_checkpoint
    out = tmp_path_factory.mktemp(f"q-{style}") / "engine"
    export(ExportConfig(model=str(ckpt), out=out, budgets=(3,)), progress=False)
    graphs, weights = Q.load_engine_graphs(out)
    return graphs, {k: np.array(v) for k, v in weights.items()}, out


def _decode_inputs(sess, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, 200, (B, 1)).astype(np.int64)
        elif i.name == "past_length":
            feeds[i.name] = np.array([5, 11], dtype=np.int32)
        elif i.name == "kv_length":
            feeds[i.name] = np.array(12, dtype=np.int32)
        elif i.name == "gate":
            g = np.ones((B, i.shape[1]), dtype=bool)
            g[1, -1] = False  # one row skips its last layer
            feeds[i.name] = g
        else:  # past.<l>.key / value [batch, heads, max_length, head_dim]
            feeds[i.name] = rng.standard_normal((B, i.shape[1], T, i.shape[3])).astype(np.float32)
    return feeds


def _run(directory, name: str, feeds=None, seed: int = 0):
    # the runtime's options: valid whether or not an earlier test gave the process a shared thread pool
    sess = ort.InferenceSession(str(directory / f"{name}.onnx"), session_options(prepack=True),
                                providers=["CPUExecutionProvider"])
    feeds = feeds or _decode_inputs(sess, np.random.default_rng(seed))
    return sess.run(None, feeds), feeds


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _reference(graphs, weights_q, info):
    """Float graphs + the weights they must get to compute what the quantized graphs compute. Where the tied
    embedding stayed float (`tied_float_kept`), the head's Gemm is pointed at a separate dequantized copy."""
    deq = Q.dequantize(weights_q, info)
    graphs = {k: _copy(m) for k, m in graphs.items()}
    for name in info["tied_float_kept"]:
        deq[name + ".dequantized"] = deq[name]
        deq[name] = weights_q[name]
        for model in graphs.values():
            for node in model.graph.node:
                if node.op_type in ("Gemm", "MatMul") and node.input[1] == name:
                    node.input[1] = name + ".dequantized"
            inits = [t for t in model.graph.initializer if t.name == name]
            ins = [i for i in model.graph.input if i.name == name]
            if inits:
                t = onnx.TensorProto()
                t.CopyFrom(inits[0])
                t.name = name + ".dequantized"
                model.graph.initializer.append(t)
            elif ins:
                model.graph.input.append(onnx.helper.make_tensor_value_info(
                    name + ".dequantized", onnx.TensorProto.FLOAT, list(deq[name].shape)))
    return graphs, deq


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _decode_name(graphs) -> str:
    return max((k for k in graphs if k.startswith("decode_")), key=lambda k: int(k.split("_b")[1]))


@pytest.mark.parametrize("scheme", sorted(TOLERANCE))
def test_quantized_graph_matches_float_graph_on_dequantized_weights(engine, scheme, tmp_path):
    graphs, weights, _ = engine
    qgraphs, qweights, info = Q.quantize_graphs(graphs, weights, scheme)
    assert set(Q.dequantize(qweights, info)) == set(weights)
    ref_graphs, deq = _reference(graphs, qweights, info)
    Q.save_engine_files(qgraphs, qweights, tmp_path / "q")
    Q.save_engine_files(ref_graphs, deq, tmp_path / "f")
    for name in (_decode_name(graphs), "prefill"):
        feeds = None
        if name == "prefill":
            ids = np.array([[2, 17, 29, 41, 53, 67], [1, 1, 2, 101, 5, 9]], dtype=np.int64)
            mask = (ids != 1).astype(np.int64)
            feeds = {"input_ids": ids, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0), "attention_mask": mask}
        q_out, feeds = _run(tmp_path / "q", name, feeds)
        f_out, _ = _run(tmp_path / "f", name, feeds)
        kv = max(_rel_diff(q, f) for q, f in zip(q_out[1:], f_out[1:], strict=True))
        print(f"{scheme} {name}: logits {_rel_diff(q_out[0], f_out[0]):.2e} kv {kv:.2e}")
        assert _rel_diff(q_out[0], f_out[0]) < TOLERANCE[scheme], (name, scheme)
        assert kv < TOLERANCE[scheme], (name, scheme, kv)


def test_negative_control_corrupted_scale_fails_the_check(engine, tmp_path):
    graphs, weights, _ = engine
    scheme = "int8-a1"  # fp32 compute: the check is tight, so a corrupted scale must show
    qgraphs, qweights, info = Q.quantize_graphs(graphs, weights, scheme)
    ref_graphs, deq = _reference(graphs, qweights, info)
    scale = info["tensors"]["model.decoder.layers.0.fc1.weight"]["scales"]
    bad = dict(qweights)
    bad[scale] = qweights[scale] * 1.5  # the graph sees a wrong scale; the reference the right one
    Q.save_engine_files(ref_graphs, deq, tmp_path / "f")
    name = _decode_name(graphs)
    diffs = []
    for label, w in (("good", qweights), ("bad", bad)):
        Q.save_engine_files(qgraphs, w, tmp_path / label)
        q_out, feeds = _run(tmp_path / label, name)
        f_out, _ = _run(tmp_path / "f", name, feeds)
        diffs.append(_rel_diff(q_out[0], f_out[0]))
    assert diffs[0] < TOLERANCE[scheme] < diffs[1], diffs


@pytest.mark.parametrize("scheme", ["int8", "int4", "dyn8", "int8-nohead"])
def test_every_quantized_weight_is_stored_once(engine, scheme, tmp_path):
    graphs, weights, _ = engine
    qgraphs, qweights, info = Q.quantize_graphs(graphs, weights, scheme)
    json.dumps({k: v for k, v in info.items()})  # manifest-serialisable
    head = "model.decoder.embed_tokens.weight"
    assert info["lm_head"] == (scheme != "int8-nohead")
    assert (head in info["quantized"]) == info["lm_head"]
    shared_gather = info["lm_head"] and "gather_scales" in info["tensors"][head]
    assert shared_gather == (scheme == "int8")  # int8: GatherBlockQuantized reads the head's packed tensor
    # otherwise the embedding Gather still reads the float table
    assert info["tied_float_kept"] == ([head] if info["lm_head"] and not shared_gather else [])
    op = info["op"]
    for key, model in qgraphs.items():
        gemm_weights = [n.input[1] for n in model.graph.node if n.op_type == "Gemm"]
        assert not set(gemm_weights) & set(info["quantized"]), key
        assert sum(n.op_type == op for n in model.graph.node) > 0
        gathers = [n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")]
        assert (head in gathers) == (head in info["tied_float_kept"] or not info["lm_head"])
    for name in info["quantized"]:
        t = info["tensors"][name]
        assert t["weight"] in qweights and t["scales"] in qweights
        assert (name in qweights) == (name in info["tied_float_kept"])  # else the float copy is gone
    index = Q.save_engine_files(qgraphs, qweights, tmp_path)
    spans = sorted((w["offset"], w["offset"] + w["nbytes"]) for w in index.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no tensor stored twice/overlapping
    # every graph that uses a quantized tensor points at the same single copy in weights.bin
    seen: dict[str, tuple[str, str]] = {}
    for key in qgraphs:
        model = onnx.load(str(tmp_path / f"{key}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            assert ext["location"] == Q.WEIGHTS_FILE
            loc = (ext["offset"], ext["length"])
            assert seen.setdefault(t.name, loc) == loc
            assert int(ext["offset"]) == index[t.name]["offset"]
    quant_tensors = {info["tensors"][n]["weight"] for n in info["quantized"]}
    assert quant_tensors <= set(seen)
    qsize = (tmp_path / Q.WEIGHTS_FILE).stat().st_size
    assert qsize < sum(w.nbytes for w in weights.values())


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_nbits_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 80)).astype(np.float32)  # K=80: not a multiple of the block (padding)
    w[3, :32] = 0.0  # an all-zero block
    packed, scales, zp = Q.quantize_nbits(w, bits, 32, symmetric)
    back = Q.dequantize_nbits(packed, scales, zp, bits, 32, w.shape[1])
    step = np.repeat(scales, 32, axis=1)[:, : w.shape[1]]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    assert np.all(back[3, :32] == 0.0)


def test_scheme_parsing():
    cfg = Q.parse_scheme("int4-b64-a1-sym-nohead")
    assert (cfg["bits"], cfg["block_size"], cfg["accuracy_level"], cfg["symmetric"], cfg["lm_head"]) == \
        (4, 64, 1, True, False)
    for bad in ("int3", "int8-b48", "int8-a7", "dyn8-b32", "int8-foo"):
        with pytest.raises(ValueError):
            Q.parse_scheme(bad)
