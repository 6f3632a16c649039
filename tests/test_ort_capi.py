"""runtime/ort_capi.py: the ctypes wrapper over onnxruntime's C API (shared initializers + prepacked container)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from skipdecode.runtime import ort_capi as oc  # noqa: E402

if not oc.available():
    pytest.skip("onnxruntime C library not available", allow_module_level=True)

K, M = 64, 48


def _save_model(directory, name: str, w_file: np.ndarray, relu: bool):
    """Y = [Relu](X @ W + B); W is an external-data initializer in w.bin (the file the graph names)."""
    (directory / "w.bin").write_bytes(w_file.tobytes())
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[K, M])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(w_file.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    b = helper.make_tensor("B", TensorProto.FLOAT, [M], np.linspace(-1, 1, M, dtype=np.float32))
    nodes = [helper.make_node("MatMul", ["X", "W"], ["XW"]),
             helper.make_node("Add", ["XW", "B"], ["Z" if relu else "Y"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["Z"], ["Y"]))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", M])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    return path, np.linspace(-1, 1, M, dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("capi")
    rng = np.random.default_rng(0)
    w_file = rng.standard_normal((K, M), dtype=np.float32)
    plain, bias = _save_model(d, "plain", w_file, relu=False)
    relu, _ = _save_model(d, "relu", w_file, relu=True)
    w_shared = rng.standard_normal((K, M), dtype=np.float32)  # differs from the file: proves AddInitializer wins
    return dict(plain=plain, relu=relu, bias=bias, w_file=w_file, w_shared=w_shared, dir=d)


@pytest.fixture(scope="module")
def env():
    # onnxruntime has one environment per process: use the pool size engines of this test process use
    from skipdecode.runtime.ort_sessions import capi_threads
    with oc.Env(threads=capi_threads(None)) as e:
        yield e


def test_shared_initializer_prepacked_sessions(env, models):
    w = env.value(models["w_shared"])
    a = env.session(models["plain"], {"W": w})
    b = env.session(models["relu"], {"W": w})  # same container: re-uses the packed W of session a
    x = np.random.default_rng(1).standard_normal((5, K), dtype=np.float32)
    want = x @ models["w_shared"] + models["bias"]
    np.testing.assert_allclose(a.run({"X": x})[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.run({"X": x})[0], np.maximum(want, 0), rtol=1e-5, atol=1e-5)
    assert (a.input_names, a.output_names) == (["X"], ["Y"])
    a.close()  # b still runs: the packed weight lives in the Env's container, not in session a
    np.testing.assert_allclose(b.run({"X": x}, ["Y"])[0], np.maximum(want, 0), rtol=1e-5, atol=1e-5)
    b.close()


def test_negative_control_file_weights(env, models):
    """Without AddInitializer the graph's own external data is used, so the outputs above really came from the
    shared buffer (and the two weight sets give different results)."""
    s = env.session(models["plain"], prepacked=False, config={"session.disable_prepacking": "1"})
    x = np.ones((2, K), dtype=np.float32)
    got = s.run({"X": x})[0]
    np.testing.assert_allclose(got, x @ models["w_file"] + models["bias"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, x @ models["w_shared"] + models["bias"], atol=1e-2)
    s.close()


def test_binding_reruns_over_changed_buffers(env, models):
    s = env.session(models["plain"], {"W": env.value(models["w_shared"])})
    x, y = np.zeros((3, K), dtype=np.float32), np.zeros((3, M), dtype=np.float32)
    binding = s.binding()
    binding.bind_input("X", x)
    binding.bind_output("Y", y)
    for seed in (2, 3):
        x[:] = np.random.default_rng(seed).standard_normal((3, K), dtype=np.float32)  # contents only
        binding.run()
        np.testing.assert_allclose(y, x @ models["w_shared"] + models["bias"], rtol=1e-5, atol=1e-5)
    raw = oc.Value(x.ctypes.data, x.shape, x.dtype, keep=x)  # binding by raw host pointer
    binding.bind_input("X", raw)
    binding.run()
    np.testing.assert_allclose(y, x @ models["w_shared"] + models["bias"], rtol=1e-5, atol=1e-5)
    s.close()  # closes the binding too
    assert not binding.handle
    raw.close()


def test_errors_carry_ort_message(env, models):
    with pytest.raises(oc.OrtCapiError, match="no_such_model.onnx") as info:
        env.session(models["dir"] / "no_such_model.onnx")
    assert info.value.code != 0
    s = env.session(models["plain"], {"W": env.value(models["w_shared"])})
    with pytest.raises(oc.OrtCapiError, match="Invalid input name: nope"):
        s.run({"nope": np.zeros((1, K), dtype=np.float32)})
    with pytest.raises(oc.OrtCapiError, match="Invalid Output Name|Y_missing"):
        s.run({"X": np.zeros((1, K), dtype=np.float32)}, ["Y_missing"])
    binding = s.binding()
    with pytest.raises(oc.OrtCapiError):
        binding.bind_input("nope", np.zeros((1, K), dtype=np.float32))
    s.close()


def test_misuse_is_refused(env):
    with pytest.raises(oc.OrtCapiError, match="one environment per process"):
        oc.Env(threads=env.threads + 1)  # ORT would silently keep the first env's thread settings
    with pytest.raises(oc.OrtCapiError, match="C-contiguous"):
        oc.Value.over(np.zeros((4, 4), dtype=np.float32)[:, ::2])
    with pytest.raises(oc.OrtCapiUnavailable) as info:
        oc.Api("/nonexistent/libonnxruntime.so")
    assert isinstance(info.value, ImportError)


def test_released_weight_pages_are_not_read_by_packed_sessions(env, models, tmp_path):
    """Weights read into private memory; after releasing the pages of a pre-packed weight the session still computes
    the same (it reads its packed copy), the released bytes read as zeros, and restore_pages brings them back."""
    w = models["w_shared"]
    path = tmp_path / "w_shared.bin"
    path.write_bytes(bytes(8192) + w.tobytes())  # the weight starts on a page boundary
    buf = oc.read_private(path)
    np.testing.assert_array_equal(buf[8192:].view(np.float32).reshape(K, M), w)
    s = env.session(models["plain"], {"W": env.value(buf[8192:].view(np.float32).reshape(K, M))})
    path.write_bytes(b"")  # the file no longer matters
    released = oc.release_pages(buf, [(8192, 8192 + w.nbytes)])
    assert released == w.nbytes // mmap.PAGESIZE * mmap.PAGESIZE > 0
    assert not buf[8192: 8192 + released].any()
    x = np.ones((2, K), dtype=np.float32)
    np.testing.assert_allclose(s.run({"X": x})[0], x @ w + models["bias"], rtol=1e-5, atol=1e-5)
    path.write_bytes(bytes(8192) + w.tobytes())
    oc.restore_pages(buf, path, [(8192, 8192 + w.nbytes)])
    np.testing.assert_array_equal(buf[8192:].view(np.float32).reshape(K, M), w)
    with pytest.raises(oc.OrtCapiError, match="private buffer"):
        oc.release_pages(np.zeros(8, dtype=np.uint8), [(0, 8)])  # memory of another allocator: refused
    s.close()
