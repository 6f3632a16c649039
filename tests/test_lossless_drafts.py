"""Lossless mode with quantized drafts: a plain export carries int8 copies of its draft buckets' graphs, which draft
while the float verify graphs check, so the output is still float full depth's.

Checked here: what the manifest says drafts and what verifies, greedy token identity with float full depth on both
OPT styles, the skip-tuned model and the bandwidth-bound small model, which requests draft with which weights, the
K/V the drafts write being replaced by the float verify pass, old (version 3) engines, the export options, and
negative controls: corrupted drafts change the acceptance but not the output, and before the verify pass the drafted
K/V is the int8 graph's.
Sampling with int8 drafts against the exact full-depth distribution: tests/test_lossless.py (chi-square).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skipdecode.export.exporter import ExportConfig, export  # noqa: E402
from skipdecode.runtime import batcher as batcher_module  # noqa: E402
from skipdecode.runtime.engine import Engine  # noqa: E402
from skipdecode.runtime.errors import EngineError, InputError  # noqa: E402
from skipdecode.runtime.manifest import FORMAT_VERSION, MANIFEST, WEIGHTS_FILE, load_manifest  # noqa: E402
from skipdecode.runtime.request import GenerateOptions, draft_bucket  # noqa: E402
from skipdecode.runtime.sampling import SamplingParams  # noqa: E402
from skipdecode.runtime.speculative import Acceptance  # noqa: E402

from .conftest import PROMPTS  # noqa: E402

KJV_PROMPTS = ["And God said unto Moses,", "In the beginning", "Blessed are the poor in spirit: for",
               "And it came to pass"]


class DraftCalls:
    """Counts the draft calls (decode_rows below full depth) of a backend by the weights they ran."""

    def __init__(self, backend, monkeypatch) -> None:
        self.quantized = self.float = 0
        real = backend.decode_rows

        def spy(slots, tokens, bucket, gates, draft=False):
            if bucket < backend.num_layers:
                if draft:
                    self.quantized += 1
                else:
                    self.float += 1
            return real(slots, tokens, bucket, gates, draft=draft)

        monkeypatch.setattr(backend, "decode_rows", spy)


def quantized_names(man) -> set[str]:
    return {t[k] for t in man.drafts["quantization"]["tensors"].values()
            for k in ("weight", "scales", "zero_points", "gather_scales", "gather_zero_points") if t.get(k)}


def test_a_plain_export_carries_int8_drafts_and_the_manifest_says_which_graphs_draft_and_verify(engine_dir):
    style, _, out = engine_dir
    man = load_manifest(out)
    assert man.format_version == FORMAT_VERSION == 4
    assert man.quantization == {}  # the engine's own weights, its verify graphs' included, are float
    drafts = [g for g in man.graphs if g.kind == "draft"]
    assert drafts and man.draft_buckets == tuple(sorted(g.budget for g in drafts))
    assert {int(k): v for k, v in man.drafts["graphs"].items()} == {g.budget: g.name for g in drafts}
    assert man.drafts["scheme"].startswith("int8-b") and man.drafts["quantization"]["op"] == "MatMulNBits"
    L = man.num_layers
    # the default draft depth and each exported speedup's draft bucket have one
    for s in (None, 2.0, 3.0, 5.0):
        assert draft_bucket(L, man.buckets, s) in man.draft_buckets, (style, s)
    assert set(man.draft_buckets) <= set(man.buckets) - {L}
    q = quantized_names(man)
    for g in drafts:
        assert g.layers == man.decode(g.budget).layers and g.inputs == man.decode(g.budget).inputs
        assert any(w in q for w in g.weights)
    for g in man.graphs:
        if g.kind != "draft":  # prefill, buckets and the verify graphs read float weights only
            assert not any(w in q for w in g.weights), g.name
    assert {g.kind for g in man.graphs} >= {"verify", "draft"}
    for b in man.draft_buckets:  # checked like a quantized engine: exact weights, and the fast path's bound
        for key in (f"draft.{b}.logits", f"exact.draft.{b}.logits", f"draft.{b}.kv"):
            assert man.parity[key]["max_abs_diff"] <= man.parity[key]["limit"], key
    with Engine.load(out) as engine:
        assert engine.backend.draft_buckets == man.draft_buckets and engine.backend.lossless_refusal is None


@pytest.mark.parametrize("draft_tokens,draft_speedup", [(1, 2.0), (4, 3.0), (7, 5.0), (None, None)])
def test_greedy_int8_drafts_are_token_identical_to_float_full_depth(engine_dir, monkeypatch, draft_tokens,
                                                                    draft_speedup):
    style, _, out = engine_dir
    engine = Engine.load(out)
    calls = DraftCalls(engine.backend, monkeypatch)
    full = engine.generate(PROMPTS[:1], GenerateOptions(max_new_tokens=24))
    fast = engine.generate(PROMPTS[:1], GenerateOptions(max_new_tokens=24, lossless=True, draft_tokens=draft_tokens,
                                                        draft_speedup=draft_speedup))
    assert [g.tokens for g in fast] == [f.tokens for f in full], style
    assert fast[0].drafted > 0 and calls.quantized > 0 and calls.float == 0  # greedy: int8 drafts by default
    batch = engine.generate(PROMPTS, GenerateOptions(max_new_tokens=16, lossless=True, draft_tokens=3))
    assert [g.tokens for g in batch] == [g.tokens for g in engine.generate(PROMPTS,
                                                                           GenerateOptions(max_new_tokens=16))]


def test_int8_drafts_on_the_skip_tuned_model_keep_full_depth_and_get_accepted(kjv_engine, monkeypatch):
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS]
    calls = DraftCalls(kjv_engine.backend, monkeypatch)
    full = [g.tokens for g in kjv_engine.generate(prompts, GenerateOptions(max_new_tokens=40))]
    for weights in ("quantized", "float"):
        opts = GenerateOptions(max_new_tokens=40, lossless=True, draft_tokens=4, draft_weights=weights)
        fast = kjv_engine.generate(prompts, opts)
        assert [g.tokens for g in fast] == full, weights
        rates = [g.accepted / g.drafted for g in fast]
        assert all(0 < r < 1 for r in rates), (weights, rates)
    assert calls.quantized > 0 and calls.float > 0


def test_sampled_requests_draft_float_by_default_and_int8_when_asked(kjv_engine, monkeypatch):
    """Greedy requests draft with the int8 graphs by default; sampled ones with the float buckets (the int8 rounding
    would magnify batching's float noise into different seeded tokens: runtime/request.py draft_quantized), and
    with int8 when asked, deterministically."""
    prompt = kjv_engine.encode(KJV_PROMPTS[0])
    calls = DraftCalls(kjv_engine.backend, monkeypatch)
    sampled = SamplingParams(temperature=0.8, seed=7)
    kjv_engine.generate([prompt], GenerateOptions(max_new_tokens=20, lossless=True, sampling=sampled))
    assert calls.float > 0 and calls.quantized == 0
    calls.float = 0
    opts = GenerateOptions(max_new_tokens=20, lossless=True, sampling=sampled, draft_weights="quantized")
    first = kjv_engine.generate([prompt], opts)[0].tokens
    assert calls.quantized > 0 and calls.float == 0
    assert kjv_engine.generate([prompt], opts)[0].tokens == first  # the same seed, the same tokens
    # alone, a sampled request's default drafts are the same float buckets as before quantized drafts existed
    batched = [g.tokens for g in kjv_engine.generate([prompt, prompt], GenerateOptions(
        max_new_tokens=20, lossless=True, sampling=SamplingParams(temperature=0.8, seed=7)))]
    alone = kjv_engine.generate([prompt], GenerateOptions(max_new_tokens=20, lossless=True, sampling=sampled))
    assert batched[0] == alone[0].tokens


def test_the_verify_pass_replaces_the_kv_the_int8_drafts_wrote(engine_dir):
    """Draft 3 tokens with the int8 graph (it writes its layers' K/V at the drafted columns), rewind, verify: every
    layer's K/V of those columns must be float full depth's, as if the tokens had been decoded at full depth. The
    control: before the verify pass the draft layers held the int8 graph's values, far from full depth's."""
    _, _, out = engine_dir
    engine = Engine.load(out)
    be = engine.backend
    L, bucket = be.num_layers, be.draft_buckets[-1]
    layers = engine.manifest.draft(bucket).layers
    prompt, tokens = [2, 17, 29, 41, 53], [7, 19, 23, 31]
    a, b = be.slots.allocate(2)
    be.prefill_rows([prompt], [a])
    be.prefill_rows([prompt], [b])
    n = len(prompt)
    for t in tokens[:3]:
        be.decode_rows([a], np.array([t]), bucket, np.ones((1, bucket), dtype=bool), draft=True)
    drafted = [be.kv.read(layer)[0][a, :, n: n + 3].copy() for layer in layers]
    be.rewind([a], [n])
    verified = be.verify_rows([a], np.array([tokens]))[a]
    decoded = [be.decode_rows([b], np.array([t]), L, np.ones((1, L), dtype=bool))[b].copy() for t in tokens]
    np.testing.assert_allclose(verified, np.stack(decoded), atol=1e-4)
    for layer in range(L):
        keys, values = be.kv.read(layer)
        np.testing.assert_allclose(keys[a, :, n: n + 4], keys[b, :, n: n + 4], atol=1e-5)
        np.testing.assert_allclose(values[a, :, n: n + 4], values[b, :, n: n + 4], atol=1e-5)
    keys = [be.kv.read(layer)[0][b, :, n: n + 3] for layer in layers]
    assert max(float(np.abs(d - k).max()) for d, k in zip(drafted, keys, strict=True)) > 1e-3


def test_a_corrupted_draft_changes_the_acceptance_but_not_the_output(kjv_engine_dir, kjv_engine, tmp_path,
                                                                     monkeypatch):
    """The draft weights only propose: scaling the int8 scales of the drafts' layers at random makes far fewer
    drafts agree with full depth, and the tokens stay full depth's. Accepting every draft (no verifier) on the
    corrupted engine changes them: the corruption does reach the drafts."""
    bad_dir = tmp_path / "bad"
    shutil.copytree(kjv_engine_dir, bad_dir)
    man = load_manifest(bad_dir)
    buf = np.fromfile(bad_dir / WEIGHTS_FILE, dtype=np.uint8)
    for name, t in man.drafts["quantization"]["tensors"].items():
        if name.startswith("model.decoder.layers."):  # every layer a draft runs; the embedding and head stay
            w = man.weights[t["scales"]]
            scales = buf[w.offset: w.offset + w.nbytes].view(w.dtype)
            scales *= np.random.default_rng(0).uniform(-3, 3, size=scales.shape).astype(w.dtype)
    buf.tofile(bad_dir / WEIGHTS_FILE)
    with pytest.raises(EngineError, match=WEIGHTS_FILE):
        Engine.load(bad_dir)  # the content hashes name the corrupted file
    prompts = [kjv_engine.encode(t) for t in KJV_PROMPTS]
    opts = GenerateOptions(max_new_tokens=40, lossless=True, draft_tokens=4)
    full = [g.tokens for g in kjv_engine.generate(prompts, GenerateOptions(max_new_tokens=40))]
    good = kjv_engine.generate(prompts, opts)
    with Engine.load(bad_dir, verify=False) as bad:
        corrupted = bad.generate(prompts, opts)
        assert [g.tokens for g in corrupted] == full
        assert sum(g.accepted for g in corrupted) < 0.5 * sum(g.accepted for g in good)
        monkeypatch.setattr(batcher_module, "speculative_accept", lambda drafts, probs, p, sampler: Acceptance(
            tuple(drafts), int(np.argmax(p[len(drafts)])), True))
        assert [g.tokens for g in bad.generate(prompts, opts)] != full


def test_a_version_3_engine_still_loads_and_drafts_with_its_float_buckets(engine_dir, tmp_path):
    """What an exporter before quantized drafts wrote: no draft graphs, no `drafts`, format_version 3."""
    style, ckpt, out = engine_dir
    old = tmp_path / "v3"
    man = export(ExportConfig(lossless_policy="default",
                              model=str(ckpt), out=old, speedups=(2.0, 3.0, 5.0), max_batch=4, drafts="none"),
                 progress=False)
    assert not man.drafts and not man.draft_buckets
    # the float part of weights.bin is the same bytes, at the same offsets, as in the engine with drafts
    with_drafts = load_manifest(out)
    assert all(with_drafts.weights[k] == w for k, w in man.weights.items())
    n = man.weights_size
    assert (old / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()[:n]
    raw = json.loads((old / MANIFEST).read_text())
    del raw["drafts"]
    raw["format_version"] = 3
    (old / MANIFEST).write_text(json.dumps(raw))
    with Engine.load(old) as engine:
        assert engine.manifest.format_version == 3 and engine.backend.draft_buckets == ()
        full = engine.generate(PROMPTS, GenerateOptions(max_new_tokens=16))
        fast = engine.generate(PROMPTS, GenerateOptions(max_new_tokens=16, lossless=True, draft_tokens=3))
        assert [g.tokens for g in fast] == [g.tokens for g in full], style
        with pytest.raises(InputError, match="no quantized draft graph for the draft bucket"):
            engine.generate(PROMPTS, GenerateOptions(max_new_tokens=4, lossless=True, draft_weights="quantized"))
    raw["format_version"] = 5
    (old / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="format_version=5; this runtime reads versions 3, 4"):
        load_manifest(old)


def test_the_manifest_must_name_exactly_its_draft_graphs(engine_dir, tmp_path):
    _, _, out = engine_dir
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    raw = json.loads((bad / MANIFEST).read_text())
    graphs = raw["drafts"]["graphs"]
    first = min(graphs, key=int)
    graphs[str(int(first) + 100)] = graphs.pop(first)
    (bad / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="does not match the draft graphs"):
        load_manifest(bad)
    raw = json.loads((out / MANIFEST).read_text())
    raw["quantization"] = {"scheme": "int8-b64"}
    (bad / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="draft graphs on an engine whose own weights are quantized"):
        load_manifest(bad)


def test_draft_options_at_export_and_per_request(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    with pytest.raises(EngineError, match="--drafts int8: the engine's own weights are quantized"):
        export(ExportConfig(lossless_policy="default",
                            model=str(ckpt), out=tmp_path / "q", speedups=(2.0,), quantize="int8", drafts="int8"),
               progress=False)
    with pytest.raises(EngineError, match="--drafts int8: float16 engines"):
        export(ExportConfig(lossless_policy="default",
                            model=str(ckpt), out=tmp_path / "h", speedups=(2.0,), dtype="fp16", drafts="int8"),
               progress=False)
    with pytest.raises(EngineError, match="unknown quantization scheme"):
        export(ExportConfig(lossless_policy="default",
                            model=str(ckpt), out=tmp_path / "x", speedups=(2.0,), drafts="int3"), progress=False)
    assert not (tmp_path / "q").exists() and not (tmp_path / "h").exists() and not (tmp_path / "x").exists()
    man = export(ExportConfig(lossless_policy="default",
                              model=str(ckpt), out=tmp_path / "int4", speedups=(3.0,), max_batch=2, drafts="int4"),
                 progress=False)
    assert man.drafts["scheme"].startswith("int4-b") and man.drafts["quantization"]["bits"] == 4
    with Engine.load(tmp_path / "int4") as engine:
        full = engine.generate(PROMPTS[:2], GenerateOptions(max_new_tokens=16))
        fast = engine.generate(PROMPTS[:2], GenerateOptions(max_new_tokens=16, lossless=True, draft_tokens=2))
        assert [g.tokens for g in fast] == [g.tokens for g in full]
        with pytest.raises(InputError, match="has no quantized draft graph"):
            engine.backend.decode_rows([0], np.array([5]), engine.manifest.num_layers,
                                       np.ones((1, engine.manifest.num_layers), dtype=bool), draft=True)
    with pytest.raises(InputError, match="draft_weights='int8' is not one of"):
        GenerateOptions(max_new_tokens=4, lossless=True, draft_weights="int8")
    with pytest.raises(InputError, match="lossless decoding only"):
        GenerateOptions(max_new_tokens=4, draft_weights="float")


def test_draft_weights_over_http_and_on_the_command_line():
    pytest.importorskip("starlette", reason="the HTTP server needs the serve extra")
    from skipdecode.cli import build_parser, options_from_args
    from skipdecode.serve.protocol import ServerLimits, parse_completion

    limits = ServerLimits(64, 211, 2)
    req = parse_completion({"prompt": [2, 5], "lossless": True, "draft_weights": "float"}, limits, None)
    assert req.options.draft_weights == "float"
    with pytest.raises(InputError, match="draft_weights='int8' is not one of"):
        parse_completion({"prompt": [2, 5], "lossless": True, "draft_weights": "int8"}, limits, None)
    args = build_parser().parse_args(["generate", "--engine", "e", "--prompt-ids", "2 5", "--lossless",
                                      "--draft-weights", "quantized"])
    assert options_from_args(args, 2).draft_weights == "quantized"


def test_the_drafts_benchmark_script_reports_every_setting(kjv_engine, monkeypatch):
    """skipdecode/drafts_bench.py on one prompt, one round (no timing asserted): the three settings, the same tokens,
    acceptance and tokens per round that agree with the drafted and accepted counts."""
    from skipdecode.drafts_bench import measure, table
    rows = measure(kjv_engine, [KJV_PROMPTS[0]], max_new_tokens=24, rounds=1, log=lambda _: None)
    assert [r["setting"] for r in rows] == ["full depth", f"lossless, {kjv_engine.manifest.drafts['scheme']} drafts",
                                           "lossless, float drafts"]
    assert all(r["identical"] for r in rows)
    for r in rows[1:]:
        assert 0 < r["acceptance"] < 1 and 1 < r["tokens_per_round"] <= 5 and r["rounds"] > 0
    assert not hasattr(kjv_engine.backend, "__dict__") or "verify_rows" not in vars(kjv_engine.backend)
    assert len(table(rows)) == 2 + 3 + 1 + 2 + 3


SMALL = "models/small-opt-kjv/skip-tuned"


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    """The bandwidth-bound embedded model (hidden 384), exported as a plain export does (int8 drafts included)."""
    from pathlib import Path
    if not (Path(SMALL) / "model.safetensors").is_file():
        pytest.skip(f"{SMALL} is not in this checkout (`make small-model` trains it)")
    out = tmp_path_factory.mktemp("small") / "small"
    export(ExportConfig(lossless_policy="default",
                        model=SMALL, out=out, speedups=(3.0,), max_batch=4, max_length=96), progress=False)
    with Engine.load(out) as engine:
        yield engine


def test_int8_drafts_on_the_small_model_keep_full_depth_and_the_check_can_fail(small_engine, monkeypatch):
    """Greedy int8-draft / fp32-verify rounds equal fp32 full depth on the bandwidth-bound model, with drafts both
    accepted and rejected; negative control: accepting every draft unchecked changes the output."""
    prompts = [small_engine.encode(t) for t in KJV_PROMPTS]
    calls = DraftCalls(small_engine.backend, monkeypatch)
    full = [g.tokens for g in small_engine.generate(prompts, GenerateOptions(max_new_tokens=40))]
    fast = small_engine.generate(prompts, GenerateOptions(max_new_tokens=40, lossless=True, draft_tokens=4))
    assert [g.tokens for g in fast] == full
    assert all(0 < g.accepted / g.drafted < 1 for g in fast) and calls.quantized > 0 and calls.float == 0

    def accept_all(drafts, probs, p, sampler):
        return Acceptance(tuple(drafts), int(np.argmax(p[len(drafts)])), True)

    monkeypatch.setattr(batcher_module, "speculative_accept", accept_all)
    unchecked = small_engine.generate(prompts, GenerateOptions(max_new_tokens=40, lossless=True, draft_tokens=4))
    assert [g.tokens for g in unchecked] != full
