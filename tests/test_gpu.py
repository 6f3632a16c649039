"""GPU backends. CPU part (always runs): TensorRT profiles, the weights-as-inputs graphs (run on onnxruntime CPU),
weight memory, binding and K/V copy plans, tensorrt.json, and that a missing backend is an error, never a fallback.
GPU part: onnxruntime CUDA and TensorRT against onnxruntime CPU; skipped with the reason when they are missing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.polygraphy_check import graph_feeds
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.tensorrt_build import (
    TrtBuildConfig,
    build_plans,
    manifest_weight_memory,
    profile_shapes,
    weight_memory,
    weights_as_inputs,
)
from skipdecode.runtime import contract as C
from skipdecode.runtime.device import (
    DEVICE_ALIGN,
    HostRuntime,
    apply_copies,
    column_copies,
    prefill_copies,
    span_copies,
)
from skipdecode.runtime.errors import BackendError, EngineError
from skipdecode.runtime.kv import KVCache
from skipdecode.runtime.manifest import load_manifest
from skipdecode.runtime.ort_sessions import load_weights, open_session, session_options
from skipdecode.runtime.trt_backend import TrtPlans, decode_bindings, prefill_bindings, weight_layout

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
try:
    import tensorrt  # noqa: F401
    HAS_TRT = True
except ImportError:
    HAS_TRT = False
NO_CUDA = "onnxruntime-gpu (CUDAExecutionProvider) is not installed: see docs/GPU.md"
NO_TRT = "TensorRT is not installed (it comes from NVIDIA's index): see docs/GPU.md"


@pytest.fixture(scope="module")
def matmul_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(root / "ckpt")
    export(ExportConfig(lossless_policy="default",
                        model=str(root / "ckpt"), out=root / "engine", budgets=(2, 4), max_length=32, max_batch=4,
                        attention="matmul"), progress=False)
    return root / "engine", load_manifest(root / "engine")


# -- TensorRT build: profiles, weights as inputs, memory -------------------------------------------------------
def test_profiles_come_from_the_manifest(matmul_engine):
    _, man = matmul_engine
    H, D = man.model.num_heads, man.model.head_dim
    p = profile_shapes(man.prefill(), man, TrtBuildConfig(opt_batch=2, opt_prompt=16))
    assert p[C.INPUT_IDS] == [[1, 1], [2, 16], [4, 31]]  # longest prompt = max_length - 1
    assert set(p) == {C.INPUT_IDS, C.POSITION_IDS, C.ATTENTION_MASK}
    spec = man.decode(2)
    d = profile_shapes(spec, man, TrtBuildConfig())
    assert d[C.past_key(spec.layers[-1])] == [[1, H, 2, D], [4, H, 32, D], [4, H, 32, D]]
    assert d[C.GATE] == [[1, 2], [4, 2], [4, 2]]
    assert d[C.PAST_LENGTH] == [[1], [4], [4]]
    assert not any(name.startswith("model.") for name in d), "weights have static shapes: no profile"


def test_weights_as_inputs_graphs_match_the_exported_ones(matmul_engine, tmp_path):
    directory, man = matmul_engine
    shared = load_weights(directory, man)
    raw = np.fromfile(directory / man.weights_file, dtype=np.uint8)
    for spec in man.graphs:
        moved = weights_as_inputs(directory / spec.file, tmp_path / spec.file, spec.weights)
        assert sorted(moved) == sorted(spec.weights)
        sess = ort.InferenceSession(str(tmp_path / spec.file), session_options(prepack=False),
                                    providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in sess.get_inputs()}
        for name in spec.weights:
            assert inputs[name] == list(man.weights[name].shape)
        feed = graph_feeds(spec, man, iterations=1)[0]
        weights = {n: raw[man.weights[n].offset:][: man.weights[n].nbytes].view(man.weights[n].dtype)
                   .reshape(man.weights[n].shape) for n in spec.weights}
        got = sess.run(None, {**feed, **weights})
        want = open_session(directory, spec, shared, ["CPUExecutionProvider"], session_options(False)).run(None, feed)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_weight_memory_of_each_strategy(matmul_engine):
    _, man = matmul_engine
    report = manifest_weight_memory(man)
    assert report["shared_bytes"] == sum(w.nbytes for w in man.weights.values())
    assert report["embedded_bytes"] == sum(report["per_graph_bytes"].values())
    assert report["embedded_over_shared"] > 2  # prefill + 3 buckets each hold embeddings and their layers
    assert report["inputs_device_bytes"] >= report["shared_bytes"]
    toy = weight_memory({"embed": 100, "l0": 10, "l1": 10}, {"prefill": ["embed", "l0", "l1"], "b1": ["embed", "l1"]})
    assert (toy["shared_bytes"], toy["embedded_bytes"]) == (120, 230)


def test_device_weight_layout_is_aligned_and_disjoint(matmul_engine):
    _, man = matmul_engine
    offsets, total = weight_layout(man)
    spans = sorted((offsets[n], offsets[n] + w.nbytes) for n, w in man.weights.items())
    assert all(start % DEVICE_ALIGN == 0 for start, _ in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] <= total


def test_bindings_cover_every_tensor_once(matmul_engine):
    _, man = matmul_engine
    offsets, _ = weight_layout(man)
    H, D, T = man.model.num_heads, man.model.head_dim, man.max_length
    spec = man.decode(4)
    binds = decode_bindings(spec, list(spec.weights), offsets, 3, H, D, T)
    names = [b.name for b in binds]
    assert sorted(names) == sorted([s.name for s in (*spec.inputs, *spec.outputs)] + list(spec.weights))
    by_name = {b.name: b for b in binds}
    for layer in spec.layers:
        assert (by_name[C.past_key(layer)].buffer, by_name[C.past_key(layer)].shape) == (f"key.{layer}", (3, H, T, D))
        assert by_name[C.new_value(layer)].buffer == f"new_value.{layer}" and by_name[C.new_value(layer)].offset == 0
    assert all(by_name[w].offset == offsets[w] and by_name[w].buffer == "weights" for w in spec.weights)
    pre = prefill_bindings(man.prefill(), [], offsets, 2, 5)
    assert sorted(b.name for b in pre) == sorted(s.name for s in (*man.prefill().inputs, *man.prefill().outputs))
    assert {b.shape for b in pre if b.shape} == {(2, 5)}


# -- K/V copy plans against the layout written out by hand ---------------------------------------------------
def test_prefill_copy_plan_matches_the_layout():
    H, D, T, S, slots = 2, 3, 10, 6, 4
    rng = np.random.default_rng(0)
    present = rng.normal(size=(3, H, S, D)).astype(np.float16)
    lengths, rows_to_slots = [6, 1, 4], [2, 0, 3]
    cache = KVCache(HostRuntime(), 1, H, D, slots, T, "float16", staging=False)
    cache.write_prompts(0, present.ctypes.data, present.ctypes.data, lengths, rows_to_slots, S)
    want = np.zeros((slots, H, T, D), dtype=np.float16)  # the layout written out by hand
    for b, (n, slot) in enumerate(zip(lengths, rows_to_slots, strict=True)):
        want[slot, :, :n] = present[b, :, S - n:]
    dst = np.zeros((slots, H, T, D), dtype=np.float16)
    apply_copies(dst, present, prefill_copies(lengths, rows_to_slots, S, H, D, T, 2))
    np.testing.assert_array_equal(dst, want)
    np.testing.assert_array_equal(cache.read(0)[0], want)


def test_column_copy_plan_matches_the_layout():
    H, D, T, slots = 2, 3, 10, 4
    rng = np.random.default_rng(1)
    memory = HostRuntime()
    cache = KVCache(memory, 1, H, D, slots, T, "float32", staging=True)
    keys = rng.normal(size=(slots, H, T, D)).astype(np.float32)
    new = rng.normal(size=(slots, H, 1, D)).astype(np.float32)
    memory.h2d(cache.keys[0], keys)
    memory.h2d(cache.new_keys[0], new)
    lengths, rows = np.array([4, 0, 9]), np.array([0, 2])  # row 1 gated off: writes nothing
    cache.write_new(0, rows, lengths)
    want = keys.copy()
    for r in rows:
        want[r, :, lengths[r]] = new[r, :, 0]
    np.testing.assert_array_equal(cache.read(0)[0], want)
    dst = keys.copy()
    apply_copies(dst, new[:3], column_copies(rows, lengths, H, D, T, 4))
    np.testing.assert_array_equal(dst, want)
    with pytest.raises(ValueError, match="outside"):
        column_copies([0], [T], H, D, T, 4)


def test_span_copy_plan_writes_each_rows_accepted_columns():
    """The verify pass's staged K/V [n, H, S, D] -> the first counts[r] columns from columns[r] of slot r."""
    H, D, T, slots, S = 2, 3, 10, 4, 3
    rng = np.random.default_rng(2)
    memory = HostRuntime()
    cache = KVCache(memory, 2, H, D, slots, T, "float32", staging=False)
    cache.reserve_span(S)
    keys = rng.normal(size=(slots, H, T, D)).astype(np.float32)
    new = rng.normal(size=(slots, H, S, D)).astype(np.float32)
    memory.h2d(cache.keys[1], keys)
    memory.h2d(cache.span_keys[1], new)
    rows, columns, counts = np.array([0, 3]), np.array([2, 0, 0, 8]), np.array([3, 0, 0, 2])
    cache.write_spans(rows, columns, counts, S)
    want = keys.copy()
    want[0, :, 2:5] = new[0]
    want[3, :, 8:10] = new[3, :, :2]  # only the columns below max_length
    np.testing.assert_array_equal(cache.read(1)[0], want)
    with pytest.raises(ValueError, match="outside"):
        span_copies([0], [8], [3], S, H, D, T, 4)


# -- tensorrt.json -----------------------------------------------------------------------------------------------
def test_trt_plans_round_trip_and_refuse_bad_files(tmp_path):
    plans = TrtPlans(tensorrt_version="11.0.0", weights="inputs", plans={"prefill": "trt/prefill.plan"},
                     onnx={"prefill": "trt/prefill.onnx"},
                     profiles={"prefill": {"input_ids": [[1, 1], [2, 2], [4, 4]]}},
                     weight_inputs={"prefill": ["model.decoder.embed_tokens.weight"]}, activation_bytes={"prefill": 5})
    plans.write(tmp_path)
    assert TrtPlans.read(tmp_path) == plans
    (tmp_path / "tensorrt.json").write_text(plans.__dict__.__repr__())
    with pytest.raises(EngineError, match="corrupted"):
        TrtPlans.read(tmp_path)
    with pytest.raises(EngineError, match="missing"):
        TrtPlans.read(tmp_path / "nowhere")
    with pytest.raises(EngineError, match="weights="):
        TrtBuildConfig(weights="streamed")


# -- a requested backend that cannot load is an error ------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA_EP, reason="CUDAExecutionProvider is installed: the missing-provider path cannot run")
def test_cuda_backend_without_provider_is_an_error(matmul_engine):
    from skipdecode.runtime.cuda_backend import CudaBackend
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        CudaBackend(*matmul_engine)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-package path cannot run")
def test_tensorrt_without_package_is_an_error(matmul_engine):
    from skipdecode.runtime.trt_backend import TrtBackend
    with pytest.raises(BackendError, match="NVIDIA's package index"):
        TrtBackend(*matmul_engine)
    with pytest.raises(BackendError, match="NVIDIA's package index"):
        build_plans(*matmul_engine)


# -- the onnxruntime CUDA backend's plumbing, on host memory ---------------------------------------------------
@pytest.fixture(scope="module")
def gqa_engine(matmul_engine):
    root = matmul_engine[0].parent
    export(ExportConfig(lossless_policy="default",
                        model=str(root / "ckpt"), out=root / "gqa", budgets=(2, 4), max_length=32, max_batch=4),
           progress=False)
    return root / "gqa", load_manifest(root / "gqa")


@pytest.mark.parametrize("flavour", ["gqa", "matmul"])
def test_cuda_backend_plumbing_matches_ort_backend(flavour, gqa_engine, matmul_engine):
    """CudaBackend with host placement: the same bindings, slot copies and staging as on a GPU, under the CPU
    provider, must reproduce OrtBackend exactly (static batch and slot API, mixed gates)."""
    from skipdecode.runtime.cuda_backend import HOST_EMULATION, CudaBackend
    from skipdecode.runtime.ort_backend import OrtBackend
    directory, man = gqa_engine if flavour == "gqa" else matmul_engine
    emulated = CudaBackend(directory, man, placement=HOST_EMULATION)
    reference = OrtBackend(directory, man, ["CPUExecutionProvider"])
    got, want = _generate(emulated, man, PROMPTS, 3.0), _generate(reference, man, PROMPTS, 3.0)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    prompts, slots = [[2, 9, 8, 7], [2, 5], [2, 3, 4, 5, 6]], [2, 0, 1]
    first = []
    for backend in (emulated, reference):
        assert backend.slots.allocate(3) == [0, 1, 2]
        first.append(backend.prefill_rows(prompts, slots))
    np.testing.assert_array_equal(first[0], first[1])
    gates = np.array([[True, True, True, True], [True, False, True, False], [True, True, False, True]])
    step = [b.decode_rows([0, 1, 2], np.array([11, 12, 13]), 4, gates).copy() for b in (emulated, reference)]
    np.testing.assert_allclose(step[0], step[1], rtol=0, atol=1e-6)
    for layer in range(man.num_layers):
        for got, want in zip(emulated.kv.read(layer), reference.kv.read(layer), strict=True):
            np.testing.assert_array_equal(got, want)


# -- on a GPU ----------------------------------------------------------------------------------------------------
def _generate(backend, man, prompts, speedup=2.0):
    from skipdecode.runtime.generator import Generator
    from skipdecode.runtime.request import GenerateOptions
    m = man.model
    gen = Generator(backend, None, m.pad_token_id, m.eos_token_id, m.vocab_size)
    return gen.generate(prompts, GenerateOptions(max_new_tokens=12, speedup=speedup))


PROMPTS = [[2, 17, 29, 41, 53], [2, 101, 5], [2, 7]]


@pytest.mark.skipif(not HAS_CUDA_EP, reason=NO_CUDA)
def test_cuda_backend_matches_cpu(tmp_path):
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (gpu extra)")
    from skipdecode.export.polygraphy_check import check_backend_parity
    from skipdecode.runtime.cuda_backend import CudaBackend
    from skipdecode.runtime.ort_backend import OrtBackend
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "engine"
    export(ExportConfig(lossless_policy="default",
                        model=str(tmp_path / "ckpt"), out=out, budgets=(2, 4), max_length=32, max_batch=4,
                        dtype="fp16"), progress=False)
    man = load_manifest(out)
    check_backend_parity(out, "cuda")
    got = _generate(CudaBackend(out, man), man, PROMPTS)
    want = _generate(OrtBackend(out, man, ["CPUExecutionProvider"]), man, PROMPTS)
    assert [r.budgets for r in got] == [r.budgets for r in want]
    same = np.mean([a == b for g, w in zip(got, want, strict=True) for a, b in zip(g.tokens, w.tokens, strict=True)])
    assert same > 0.9  # fp16 on two devices: an occasional near-tie may flip


@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_plans_match_onnxruntime(matmul_engine):
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (gpu extra)")
    from skipdecode.export.polygraphy_check import check_backend_parity
    from skipdecode.runtime.ort_backend import OrtBackend
    from skipdecode.runtime.trt_backend import TrtBackend
    directory, man = matmul_engine
    plans = build_plans(directory, man, TrtBuildConfig(), progress=False)
    assert set(plans.plans) == {g.name for g in man.graphs} and all(plans.activation_bytes.values())
    check_backend_parity(directory, "tensorrt")
    got = _generate(TrtBackend(directory, man), man, PROMPTS)
    want = _generate(OrtBackend(directory, man, ["CPUExecutionProvider"]), man, PROMPTS)
    assert [r.tokens for r in got] == [r.tokens for r in want]
