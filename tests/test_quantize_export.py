"""`skipdecode export --quantize`: quantized engines pass parity against the dequantized reference, load and run
with no extra flag, keep their perplexity, and store every quantized tensor once."""

from __future__ import annotations

import numpy as np
import pytest
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.parity import ParityError, check_parity
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError
from skipdecode.runtime.generation import GenerateOptions
from skipdecode.training.engine_eval import backend_perplexity

from .conftest import PROMPTS


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    _, ckpt = tiny_checkpoint
    root = tmp_path_factory.mktemp("quant")
    float_man = export(ExportConfig(model=str(ckpt), out=root / "fp32", speedups=(2.0,), max_batch=4), progress=False)
    int8_man = export(ExportConfig(model=str(ckpt), out=root / "int8", speedups=(2.0,), max_batch=4, quantize="int8"),
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
    assert 0 < max(v["max_abs_diff"] for v in man.parity.values()) <= max(v["limit"] for v in man.parity.values())


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


def test_negative_control_quantized_graphs_fail_float_tolerances(engines, monkeypatch):
    """Parity can fail: against the float model with fp32 tolerances, the quantized graphs are out of bounds."""
    import skipdecode.export.parity as parity
    ckpt, root, _, _ = engines
    from skipdecode.export.models import load_model
    model, _ = load_model(str(ckpt))
    monkeypatch.setattr(parity, "tolerances", lambda man: parity.TOLERANCES["float32"])
    with pytest.raises(ParityError, match="logits"):
        check_parity(root / "int8", model)


def test_bad_quantize_values_are_refused_before_tracing(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    with pytest.raises(EngineError, match="unknown quantization scheme 'int3'"):
        export(ExportConfig(model=str(ckpt), out=tmp_path / "e", quantize="int3"), progress=False)
    with pytest.raises(EngineError, match="needs --dtype fp32"):
        export(ExportConfig(model=str(ckpt), out=tmp_path / "e", quantize="int8", dtype="fp16"), progress=False)
    assert not (tmp_path / "e").exists()
