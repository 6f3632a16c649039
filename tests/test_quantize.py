"""Weight-only quantization (export/quantize.py): the quantized graphs compute exactly what the float graphs compute
on the dequantized weights once their activation rounding is taken out, the rounding stays within a bound derived
from an emulation of it, every quantized tensor is stored once, a 2% scale error is caught, and no integer dot
product can saturate on CPUs without VNNI."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402
from skipdecode.export import quantize as Q  # noqa: E402
from skipdecode.export.exporter import ExportConfig, export  # noqa: E402
from skipdecode.export.parity import FAST_ROUNDING, FLOAT32  # noqa: E402
from skipdecode.runtime.ort_sessions import session_options  # noqa: E402

# Every scheme the tests cover: accuracy level 4 (the default: activations rounded to int8 per block), level 1 (fp32
# compute), symmetric and asymmetric, 4 and 8 bits, blocks of 32 and 64, and dyn8 (activations rounded per tensor).
SCHEMES = ("int8", "int8-b64-asym", "int4", "int4-sym-b64", "int8-a1", "int4-sym-a1", "dyn8")
B, T = 2, 24


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    """(graphs, weights, engine dir) of a tiny export: prefill, full depth, one 3-layer bucket."""
    style, ckpt = tiny_checkpoint
    out = tmp_path_factory.mktemp(f"q-{style}") / "engine"
    export(ExportConfig(lossless_policy="default", model=str(ckpt), out=out, budgets=(3,)), progress=False)
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


def _limit(reference: np.ndarray) -> float:
    """parity.py's float32 bound."""
    return FLOAT32.atol + FLOAT32.rtol * float(np.abs(reference).max())


def _emulated_graph(model, info: dict):
    """`exact_graph` with the fast path's activation rounding in front of each quantized product, in plain ONNX ops:
    per block of `block_size` to int8 with scale max|block| / 127 (MatMulNBits at accuracy level 4), per tensor to
    uint8 (DynamicQuantizeMatMul: DynamicQuantizeLinear -> DequantizeLinear). An independent statement of the
    rounding export/quantize_export.py emulates in PyTorch."""
    exact = Q.exact_graph(model)
    nodes, consts = [], []
    for node in exact.graph.node:
        quantized = node.op_type == "MatMulNBits" or node.name.endswith("_exact_matmul")
        if not quantized or (node.op_type == "MatMulNBits" and info["accuracy_level"] < 4):
            nodes.append(node)
            continue
        x, p = node.input[0], node.name + "_round"
        if node.op_type == "MatMulNBits":
            k, bs = _attr(node, "K"), info["block_size"]
            kb = -(-k // bs)  # a last partial block is zero-padded, as MLAS pads it
            const = {"_rows": np.array([-1, k], dtype=np.int64), "_pads": np.array([0, 0, 0, kb * bs - k]),
                     "_blocks": np.array([-1, kb, bs], dtype=np.int64), "_flat": np.array([-1, kb * bs]),
                     "_start": np.array([0]), "_end": np.array([k]), "_axis": np.array([1]),
                     "_127": np.array(127.0, dtype=np.float32), "_one": np.array(1.0, dtype=np.float32),
                     "_zero": np.array(0.0, dtype=np.float32)}
            consts += [onnx.numpy_helper.from_array(v.astype(np.int64) if v.dtype.kind == "i" else v, p + key)
                       for key, v in const.items()]
            nodes += [helper.make_node("Shape", [x], [p + "_shape"]),
                      helper.make_node("Reshape", [x, p + "_rows"], [p + "_x2"]),
                      helper.make_node("Pad", [p + "_x2", p + "_pads"], [p + "_xp"]),
                      helper.make_node("Reshape", [p + "_xp", p + "_blocks"], [p + "_xb"]),
                      helper.make_node("Abs", [p + "_xb"], [p + "_abs"]),
                      helper.make_node("ReduceMax", [p + "_abs"], [p + "_amax"], axes=[-1], keepdims=1),
                      helper.make_node("Div", [p + "_amax", p + "_127"], [p + "_scale"]),
                      helper.make_node("Greater", [p + "_scale", p + "_zero"], [p + "_pos"]),
                      helper.make_node("Where", [p + "_pos", p + "_scale", p + "_one"], [p + "_safe"]),
                      helper.make_node("Div", [p + "_xb", p + "_safe"], [p + "_r"]),
                      helper.make_node("Round", [p + "_r"], [p + "_q"]),
                      helper.make_node("Mul", [p + "_q", p + "_scale"], [p + "_yb"]),
                      helper.make_node("Reshape", [p + "_yb", p + "_flat"], [p + "_yp"]),
                      helper.make_node("Slice", [p + "_yp", p + "_start", p + "_end", p + "_axis"], [p + "_y2"]),
                      helper.make_node("Reshape", [p + "_y2", p + "_shape"], [p + "_x"])]
        else:
            nodes += [helper.make_node("DynamicQuantizeLinear", [x], [p + "_q", p + "_s", p + "_z"]),
                      helper.make_node("DequantizeLinear", [p + "_q", p + "_s", p + "_z"], [p + "_x"])]
        node.input[0] = p + "_x"
        nodes.append(node)
    del exact.graph.node[:]
    exact.graph.node.extend(nodes)
    exact.graph.initializer.extend(consts)
    return exact


def _attr(node, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _outputs(graphs, weights, directory, name: str, feeds=None):
    Q.save_engine_files(graphs, weights, directory)
    return _run(directory, name, feeds)


def _prefill_feeds() -> dict[str, np.ndarray]:
    ids = np.array([[2, 17, 29, 41, 53, 67], [1, 1, 2, 101, 5, 9]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    return {"input_ids": ids, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0), "attention_mask": mask}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_exact_graph_matches_float_graph_on_dequantized_weights(engine, scheme, tmp_path):
    """The weights, exactly: with the activation rounding taken out, a quantized graph is the float graph on the
    dequantized weights up to fp32 operation order (the float32 bound), on every CPU."""
    graphs, weights, _ = engine
    qgraphs, qweights, info = Q.quantize_graphs(graphs, weights, scheme)
    assert set(Q.dequantize(qweights, info)) == set(weights)
    ref_graphs, deq = _reference(graphs, qweights, info)
    exact = {k: Q.exact_graph(m) for k, m in qgraphs.items()}
    for name in (_decode_name(graphs), "prefill"):
        feeds = _prefill_feeds() if name == "prefill" else None
        q_out, feeds = _outputs(exact, qweights, tmp_path / "q", name, feeds)
        f_out, _ = _outputs(ref_graphs, deq, tmp_path / "f", name, feeds)
        for q, f in zip(q_out, f_out, strict=True):
            assert np.abs(q - f).max() <= _limit(f), (name, scheme, float(np.abs(q - f).max()))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fast_graph_stays_within_its_activation_rounding(engine, scheme, tmp_path):
    """The fast path (the graph as users run it) differs from the float graph on the dequantized weights by at most
    parity.py's multiple of what the emulated activation rounding does: a bound from the arithmetic, the same on
    AVX2 and on VNNI CPUs (the integer products are exact on both, see the saturation tests below)."""
    graphs, weights, _ = engine
    qgraphs, qweights, info = Q.quantize_graphs(graphs, weights, scheme)
    ref_graphs, deq = _reference(graphs, qweights, info)
    emulated = {k: _emulated_graph(m, info) for k, m in qgraphs.items()}
    rounds = scheme == "dyn8" or info["accuracy_level"] == 4
    for name in (_decode_name(graphs), "prefill"):
        feeds = _prefill_feeds() if name == "prefill" else None
        q_out, feeds = _outputs(qgraphs, qweights, tmp_path / "q", name, feeds)
        f_out, _ = _outputs(ref_graphs, deq, tmp_path / "f", name, feeds)
        e_out, _ = _outputs(emulated, qweights, tmp_path / "e", name, feeds)
        devs = [float(np.abs(e - f).max()) for e, f in zip(e_out, f_out, strict=True)]
        kinds = (devs[:1], devs[1:])  # logits, then every K/V output: parity.py takes the worst of a kind
        for i, (q, f) in enumerate(zip(q_out, f_out, strict=True)):
            worst = max(kinds[min(i, 1)])
            print(f"{scheme} {name} output {i}: fast {float(np.abs(q - f).max()):.3g} emulated {devs[i]:.3g} "
                  f"(worst of its kind {worst:.3g}) fast-emulated {float(np.abs(q - e_out[i]).max()):.3g}")
            assert (devs[i] > _limit(f)) == rounds, (name, scheme, devs[i])  # the emulation rounds where the op does
            limit = _limit(f) + FAST_ROUNDING[info["op"]] * worst
            assert np.abs(q - f).max() <= limit, (name, scheme, i)


@pytest.mark.parametrize("scheme", ["int8", "int4", "dyn8"])
def test_negative_control_two_percent_scale_error_fails_the_exact_check(engine, scheme, tmp_path):
    """A 2% error in one layer's scales fails the exact check, with room: the check that catches weights errors
    is the exact one, at the float32 bound."""
    graphs, weights, _ = engine
    qgraphs, qweights, info = Q.quantize_graphs(graphs, weights, scheme)
    ref_graphs, deq = _reference(graphs, qweights, info)
    exact = {k: Q.exact_graph(m) for k, m in qgraphs.items()}
    scale = info["tensors"]["model.decoder.layers.0.fc1.weight"]["scales"]
    bad = dict(qweights)
    bad[scale] = qweights[scale] * 1.02  # the graph sees a wrong scale; the reference the right one
    name = _decode_name(graphs)
    f_out, feeds = _outputs(ref_graphs, deq, tmp_path / "f", name)
    good_out, _ = _outputs(exact, qweights, tmp_path / "good", name, feeds)
    bad_out, _ = _outputs(exact, bad, tmp_path / "bad", name, feeds)
    good, wrong, limit = (float(np.abs(good_out[0] - f_out[0]).max()), float(np.abs(bad_out[0] - f_out[0]).max()),
                          _limit(f_out[0]))
    assert good <= limit < wrong / 10, (good, limit, wrong)


def _u8s8_gemm_avx2(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """What `vpmaddubsw` + `vpmaddwd` compute for uint8 rows a [M, K] times int8 weights q [K, N]: each pair of
    products adjacent along K is added into an int16 with saturation, the pairs then summed exactly in int32."""
    a, q = a.astype(np.int64), q.astype(np.int64)
    if a.shape[1] % 2:
        a, q = np.pad(a, ((0, 0), (0, 1))), np.pad(q, ((0, 1), (0, 0)))
    prod = a[:, :, None] * q[None, :, :]
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -(1 << 15), Q.INT16_MAX)
    return pairs.sum(axis=1)


def _saturated_columns(q: np.ndarray, rng) -> int:
    """Columns of q [K, N] whose emulated AVX2 result differs from the exact integer product for some activations:
    the worst case of each column (255 where its weight is positive, else 0, and the mirror) plus random rows."""
    worst = np.concatenate([255 * (q.T > 0), 255 * (q.T < 0)]).astype(np.uint8)  # [2N, K]: row i aims at column i % N
    n = q.shape[1]
    rows = np.arange(2 * n) % n
    exact_w = np.einsum("mk,km->m", worst.astype(np.int64), q[:, rows].astype(np.int64))
    emul_w = np.array([_u8s8_gemm_avx2(worst[i: i + 1], q[:, rows[i]: rows[i] + 1])[0, 0] for i in range(2 * n)])
    bad = set(rows[exact_w != emul_w].tolist())
    rand = rng.integers(0, 256, size=(8, q.shape[0])).astype(np.uint8)
    exact_r = rand.astype(np.int64) @ q.astype(np.int64)
    bad |= set(np.nonzero((exact_r != _u8s8_gemm_avx2(rand, q)).any(axis=0))[0].tolist())
    return len(bad)


def test_dyn8_weights_cannot_saturate_the_avx2_u8s8_kernel(engine):
    """dyn8 on CPUs without VNNI: the emulated `vpmaddubsw` product equals the exact integer product for worst-case
    and random uint8 activations on every exported weight (7-bit weights: 255 * 126 < 2^15). Negative control: the
    same weights at 8 bits (what dyn8 stored before) saturate on every layer."""
    graphs, weights, _ = engine
    _, qweights, info = Q.quantize_graphs(graphs, weights, "dyn8")
    rng = np.random.default_rng(0)
    for name, t in info["tensors"].items():
        q = qweights[t["weight"]]
        assert np.abs(q.astype(np.int32)).max() == Q.DYN8_QMAX, name
        assert Q.u8s8_pair_bound(q) <= Q.INT16_MAX, name
        assert _saturated_columns(q, rng) == 0, name
        w = weights[name] if t["layout"] == "NK" else weights[name].T
        q8, _ = Q.quantize_dyn8(w, qmax=127)
        assert Q.u8s8_pair_bound(q8) > Q.INT16_MAX, name
        assert _saturated_columns(q8, rng) > 0, name


def test_int8_nbits_codes_fit_the_avx2_sign_trick():
    """MatMulNBits' int8 kernels on AVX2 multiply |w| (uint8) by sign(w) * a (int8) with `vpmaddubsw`, w = code -
    zero point: symmetric 8-bit codes give |w| <= 127 and activations are rounded to [-127, 127], so a pair is at
    most 2 * 127 * 127 = 32258 < 2^15 whatever the scales (here spread over three orders of magnitude)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 256)).astype(np.float32) * rng.uniform(0.01, 10, size=(16, 1)).astype(np.float32)
    packed, _, zp = Q.quantize_nbits(w, 8, 32, symmetric=True)
    assert zp is None  # MatMulNBits then subtracts 128
    codes = packed.astype(np.int32) - 128
    assert codes.min() == -127 and codes.max() == 127
    assert 2 * 127 * np.abs(codes).max() <= Q.INT16_MAX


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
    spans = sorted((w.offset, w.offset + w.nbytes) for w in index.values())
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
            assert int(ext["offset"]) == index[t.name].offset
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
    assert (cfg.bits, cfg.block_size, cfg.accuracy_level, cfg.symmetric, cfg.lm_head) == (4, 64, 1, True, False)
    assert cfg.manifest_fields()["op"] == "MatMulNBits" and "block_size" not in Q.parse_scheme("dyn8").manifest_fields()
    for bad in ("int3", "int8-b48", "int8-a7", "dyn8-b32", "int8-foo"):
        with pytest.raises(ValueError):
            Q.parse_scheme(bad)
