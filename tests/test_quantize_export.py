"""`skipdecode export --quantize`: quantized engines pass both parity checks against the dequantized reference (the
weights exactly, the fast path within its activation rounding), a 2% scale error fails the gate, and the engines
load and run with no extra flag, keep their perplexity, and store every quantized tensor once."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.models import load_model
from skipdecode.export.parity import ParityError, check_parity
from skipdecode.export.quantize_export import dequantized_model
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError
from skipdecode.runtime.request import GenerateOptions
from skipdecode.training.engine_eval import backend_perplexity

from .conftest import PROMPTS


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    _, ckpt = tiny_checkpoint
    root = tmp_path_factory.mktemp("quant")
    float_man = export(ExportConfig(lossless_policy="default",
                                    model=str(ckpt), out=root / "fp32", speedups=(2.0,), max_batch=4), progress=False)
    int8_man = export(ExportConfig(lossless_policy="default",
                                   model=str(ckpt), out=root / "int8", speedups=(2.0,), max_batch=4, quantize="int8"),
                      progress=False)
    return ckpt, root, float_man, int8_man


def test_quantized_engine_is_described_and_smaller(engines):
    _, root, float_man, man = engines
    q = man.quantization
    assert q["bits"] == 8 and q["op"] == "MatMulNBits" and q["lm_head"] and q["scheme"].startswith("int8-b")
    assert {w.dtype for w in man.weights.values()} >= {"uint8", "float32"}
    assert man.weights_size < 0.6 * float_man.weights_size
    spans = sorted((w.offset, w.offset + w.nbytes) for w in man.weights.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # every tensor once, no overlap
    _assert_both_checks(man)


def _assert_both_checks(man) -> None:
    """The exact check ran on every output at the float32 bound, the fast one within a limit that its emulated
    rounding widened (rounding_diff > 0: the emulation rounds where the engine does)."""
    exact = {k[len("exact."):]: v for k, v in man.parity.items() if k.startswith("exact.")}
    fast = {k: v for k, v in man.parity.items() if not k.startswith("exact.")}
    assert exact and set(exact) == set(fast)
    for key, v in exact.items():
        assert v["finite"] and v["max_abs_diff"] <= v["limit"] < 1e-3, key
    for key, v in fast.items():
        assert v["finite"] and 0 < v["rounding_diff"] and v["max_abs_diff"] <= v["limit"], key


@pytest.mark.parametrize("scheme", ["int4", "dyn8"])
def test_other_schemes_pass_both_checks(tiny_checkpoint, tmp_path, scheme):
    _, ckpt = tiny_checkpoint
    man = export(ExportConfig(lossless_policy="default",
                              model=str(ckpt), out=tmp_path / scheme, speedups=(2.0,), max_batch=4, quantize=scheme),
                 progress=False)
    assert man.quantization["scheme"].startswith(scheme)
    _assert_both_checks(man)


def test_negative_control_two_percent_scale_error_in_one_layer_fails_parity(engines, tmp_path):
    """The gate checks the weights: one layer's scales 2% off (in weights.bin, as a corrupted file or a quantizer
    bug would leave them) fail the exact check against the reference built from the right weights."""
    ckpt, root, _, man = engines
    bad = tmp_path / "int8-bad"
    shutil.copytree(root / "int8", bad)
    name = man.quantization["tensors"]["model.decoder.layers.1.fc2.weight"]["scales"]
    w = man.weights[name]
    raw = np.fromfile(bad / "weights.bin", dtype=np.uint8)
    scales = raw[w.offset: w.offset + w.nbytes].view(w.dtype)
    scales *= 1.02
    raw.tofile(bad / "weights.bin")
    model, _ = load_model(str(ckpt))
    reference = dequantized_model(model, root / "int8", man.weights, man.quantization)  # the right weights
    with pytest.raises(ParityError, match=r"exact\.") as err:
        check_parity(bad, reference)
    print(err.value)
    check_parity(root / "int8", reference)  # the same check passes on the engine as exported


def test_quantized_engine_runs_with_no_extra_flag(engines):
    _, root, _, _ = engines
    opts = GenerateOptions(max_new_tokens=12, speedup=2.0)
    with Engine.load(root / "int8") as q, Engine.load(root / "fp32") as f:
        assert q.backend.prepack == "shared"  # MatMulNBits needs its packed form to be fast
        got, want = q.generate(PROMPTS, opts), f.generate(PROMPTS, opts)
    assert [r.budgets for r in got] == [r.budgets for r in want]
    same = np.mean([a == b for g, w in zip(got, want, strict=True) for a, b in zip(g.tokens, w.tokens, strict=True)])
    assert same > 0.5  # random tiny weights: near ties flip, most tokens agree


def test_quantized_perplexity_stays_close(engines):
    _, root, _, _ = engines
    rng = np.random.default_rng(0)
    chunks = rng.integers(3, 200, size=(4, 24))
    with Engine.load(root / "int8") as q, Engine.load(root / "fp32") as f:
        pq = backend_perplexity(q.backend, chunks, 8, 2.0)
        pf = backend_perplexity(f.backend, chunks, 8, 2.0)
    assert abs(pq / pf - 1) < 0.02


def test_negative_control_quantized_weights_fail_against_the_float_model(engines):
    """The exact check sees quantization itself: against the float model (not the dequantized one), it fails."""
    ckpt, root, _, _ = engines
    model, _ = load_model(str(ckpt))
    with pytest.raises(ParityError, match=r"exact\.prefill\.logits"):
        check_parity(root / "int8", model)


def test_bad_quantize_values_are_refused_before_tracing(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    with pytest.raises(EngineError, match="unknown quantization scheme 'int3'"):
        export(ExportConfig(lossless_policy="default",
                            model=str(ckpt), out=tmp_path / "e", quantize="int3"), progress=False)
    with pytest.raises(EngineError, match="needs --dtype fp32"):
        export(ExportConfig(lossless_policy="default",
                            model=str(ckpt), out=tmp_path / "e", quantize="int8", dtype="fp16"), progress=False)
    assert not (tmp_path / "e").exists()
