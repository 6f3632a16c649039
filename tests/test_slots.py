"""The ragged slot KV layout and the slot API (`prefill_rows` / `decode_rows`) continuous batching relies on:
rows of one call with different lengths and layer sets give exactly what each row gives alone, for both decode
attention flavours."""

from __future__ import annotations

import numpy as np
import pytest
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.torch_generator import TorchGenerator
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import InputError
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.schedule import layers_for_budget

from .conftest import PROMPTS


@pytest.fixture(scope="module", params=["gqa", "matmul"])
def flavour_engine(request, tmp_path_factory):
    from skipdecode.export.random_models import build_random_opt
    ckpt = tmp_path_factory.mktemp("ckpt")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(ckpt)
    out = tmp_path_factory.mktemp("engines") / request.param
    export(ExportConfig(lossless_policy="default",
                        model=str(ckpt), out=out, speedups=(2.0, 3.0), max_batch=4, attention=request.param),
           progress=False)
    return request.param, ckpt, out


def test_flavour_matches_reference(flavour_engine):
    attention, ckpt, out = flavour_engine
    engine = Engine.load(out)
    assert engine.manifest.attention == attention
    assert (len(engine.backend.kv.new_keys) == 0) == (attention == "gqa")  # gqa stages nothing
    opts = GenerateOptions(max_new_tokens=24, speedup=3.0)
    got, want = engine.generate(PROMPTS, opts), TorchGenerator.load(str(ckpt)).generate(PROMPTS, opts)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.budgets for r in got] == [r.budgets for r in want]


def _solo_logits(out, prompt, bucket, tokens):
    """Logits of `prompt` followed by `tokens`, alone in slot 0 of a fresh engine, every step in `bucket`."""
    be = Engine.load(out).backend
    slots = be.slots.allocate(1)
    first = be.prefill_rows([prompt], slots)
    logits = [first[0]]
    for tok in tokens:
        row = be.decode_rows(slots, np.array([tok]), bucket, np.ones((1, bucket), bool))
        logits.append(row[0].copy())
    return logits


def test_mixed_rows_equal_solo_runs(flavour_engine):
    """Two sequences of different lengths share calls; the shallow one is gated to its own bucket's layers."""
    attention, _, out = flavour_engine
    be = Engine.load(out).backend
    L, w = be.num_layers, be.warmup_layers
    deep, shallow = L, min(be.buckets)
    a, b = PROMPTS[0], PROMPTS[1]  # 7 and 3 tokens: different columns in every call
    assert be.slots.allocate(2) == [0, 1]
    first = be.prefill_rows([b, a], [1, 0])  # slots out of order on purpose
    graph_layers = layers_for_budget(L, deep, w)
    gates = np.ones((2, deep), dtype=bool)
    gates[1] = [layer in layers_for_budget(L, shallow, w) for layer in graph_layers]
    toks_a, toks_b = [5, 9, 13, 17], [4, 8, 12, 16]
    got_a, got_b = [first[1]], [first[0]]
    for i in range(len(toks_a)):
        logits = be.decode_rows([0, 1], np.array([toks_a[i], toks_b[i]]), deep, gates)
        assert list(be.slots.lengths[:2]) == [len(a) + i + 1, len(b) + i + 1]
        got_a.append(logits[0].copy())
        got_b.append(logits[1].copy())
    for got, want in ((got_a, _solo_logits(out, a, deep, toks_a)), (got_b, _solo_logits(out, b, shallow, toks_b))):
        for g, s in zip(got, want, strict=True):
            np.testing.assert_allclose(g, s, atol=1e-5, rtol=0)
    if attention == "matmul":  # gated-off layers wrote no K/V for the shallow row
        skipped = [layer for layer, on in zip(graph_layers, gates[1], strict=True) if not on]
        assert skipped and all(not be.kv.read(layer)[0][1, :, len(b):].any() for layer in skipped)


def test_negative_control_wrong_gates_differ(flavour_engine):
    """The comparison above can fail: running the shallow row at full depth changes its logits."""
    _, _, out = flavour_engine
    be = Engine.load(out).backend
    L = be.num_layers
    slots = be.slots.allocate(1)
    be.prefill_rows([PROMPTS[1]], slots)
    full = be.decode_rows(slots, np.array([4]), L, np.ones((1, L), bool))[0].copy()
    shallow = _solo_logits(out, PROMPTS[1], min(be.buckets), [4])[1]
    assert np.abs(full - shallow).max() > 1e-3


def _full(be):
    """A slot holding max_length tokens: no column is left for a new one."""
    slots = be.slots.allocate(1)
    be.slots.lengths[slots] = be.max_length
    return slots


@pytest.mark.parametrize("call, message", [
    (lambda be: be.prefill_rows([[2, 3], [2]], [0, 0]), "distinct slots"),
    (lambda be: be.prefill_rows([[2, 3]], [4]), "slot 4 is outside 0..3"),
    (lambda be: be.prefill_rows([[2, 3]], [0]), "slot 0 is not allocated"),
    (lambda be: be.prefill_rows([[2] * 200], be.slots.allocate(1)), "prompt length=200 is above the maximum"),
    (lambda be: be.decode_rows(be.slots.allocate(1), np.array([2]), 9, np.ones((1, 9), bool)),
     "bucket 9 is not exported"),
    (lambda be: be.decode_rows(be.slots.allocate(1), np.array([2]), 6, np.ones((1, 4), bool)), "gates have shape"),
    (lambda be: be.decode_rows(_full(be), np.array([2]), 6, np.ones((1, 6), bool)),
     "needs a column below max_length"),
    (lambda be: be.decode_rows(be.slots.allocate(4) + [4], np.array([2] * 5), 6, np.ones((5, 6), bool)),
     "slot 4 is outside 0..3"),
    (lambda be: be.decode_rows([0], np.array([2]), 6, np.ones((1, 6), bool)), "slot 0 is not allocated"),
])
def test_slot_api_rejects_bad_input(flavour_engine, call, message):
    be = Engine.load(flavour_engine[2]).backend
    with pytest.raises(InputError, match=message):
        call(be)


@pytest.mark.parametrize("attention", ["gqa", "matmul"])
def test_fp16_export_passes_parity(tiny_checkpoint, tmp_path, attention):
    """fp16 graphs (both flavours) against the fp16 PyTorch reference; the export's parity check fails hard."""
    _, ckpt = tiny_checkpoint
    man = export(ExportConfig(lossless_policy="default",
                              model=str(ckpt), out=tmp_path / "e", speedups=(2.0,), dtype="fp16",
                              attention=attention), progress=False)
    assert man.dtype == "float16"
    assert 0 < max(v["max_abs_diff"] for v in man.parity.values()) < 2e-2
    res = Engine.load(tmp_path / "e").generate(PROMPTS, GenerateOptions(max_new_tokens=8, speedup=2.0))
    assert all(len(r.tokens) == 8 for r in res)


def test_generation_emits_nvtx_ranges(flavour_engine):
    """Each step is one `step` range (payload: step number, deepest bucket, rows) around one graph-call range."""
    from skipdecode.runtime.profiling import use_domain

    from .recorders import RecordingDomain
    engine = Engine.load(flavour_engine[2])
    rec = RecordingDomain()
    with use_domain(rec):
        res = engine.generate(PROMPTS, GenerateOptions(max_new_tokens=4, speedup=2.0))
    pushes = [e[1] for e in rec.events if e[0] == "push"]
    assert len(rec.events) == 2 * len(pushes) == 2 * 2 * 4  # 4 steps, each a step range around a graph range
    steps, graphs = pushes[0::2], pushes[1::2]
    assert [s["message"] for s in steps] == ["step"] * 4
    assert graphs[0]["message"] == "prefill"
    # one call per step: the deepest row's graph (rows have their own schedules), shallower rows gated
    deepest = [max(r.budgets[k] for r in res) for k in range(1, 4)]
    assert [g["message"] for g in graphs[1:]] == [f"decode_b{b:03d}" for b in deepest]
    assert [int(s["payload"]["column"]) for s in steps] == [0, 1, 2, 3]
    assert [int(s["payload"]["bucket"]) for s in steps[1:]] == deepest
    assert [int(s["payload"]["batch"]) for s in steps] == [3] * 4


def test_shared_thread_pool_mode_gives_the_same_tokens(flavour_engine):
    """`configure_onnxruntime` (what the CLI, server and bench use) in a fresh process: same tokens as the
    per-session pools of this process; engines loaded later report the shared pool's size, and asking the pool
    itself for another size is refused."""
    import json
    import subprocess
    import sys
    code = (
        "import json, sys\n"
        "from skipdecode.runtime.ort_sessions import configure_onnxruntime\n"
        "from skipdecode.runtime.engine import Engine\n"
        "from skipdecode.runtime.errors import BackendError\n"
        "from skipdecode.runtime.request import GenerateOptions\n"
        "configure_onnxruntime(2)\n"
        "res = Engine.load(sys.argv[1]).generate(json.loads(sys.argv[2]), GenerateOptions(max_new_tokens=12, "
        "speedup=2.0))\n"
        "threads = Engine.load(sys.argv[1], threads=1).backend.threads\n"
        "try:\n    configure_onnxruntime(1)\n    refused = False\n"
        "except BackendError:\n    refused = True\n"
        "print(json.dumps({'tokens': [r.tokens for r in res], 'threads': threads, 'refused': refused}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(flavour_engine[2]), json.dumps(PROMPTS)],
                          capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = Engine.load(flavour_engine[2]).generate(PROMPTS, GenerateOptions(max_new_tokens=12, speedup=2.0))
    assert got == {"tokens": [r.tokens for r in want], "threads": 2, "refused": True}
