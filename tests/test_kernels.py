"""Per-machine kernel choice of quantized engines (runtime/kernels.py): the exporter writes the candidates with
their parity records, the cache key follows every input, a candidate that failed parity is never chosen however
fast, a forced choice runs, and the choice and its reason are reported (stderr line, bench section)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.runtime import kernels as K
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError
from skipdecode.runtime.manifest import MANIFEST, load_manifest
from skipdecode.runtime.request import GenerateOptions

from .conftest import PROMPTS

CPU = {"model": "Test CPU", "flags": ["avx2", "fma", "sse2"]}


@pytest.fixture(scope="module")
def int8_engine(tmp_path_factory):
    from skipdecode.export.random_models import build_random_opt
    root = tmp_path_factory.mktemp("kernels")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(root / "ckpt")
    export(ExportConfig(lossless_policy="default",
                        model=str(root / "ckpt"), out=root / "int8", speedups=(2.0,), max_batch=4, quantize="int8",
                        kernel_candidates="a1"),
           progress=False)
    return root / "int8"


@pytest.fixture(scope="module")
def dyn8_engine(tmp_path_factory):
    """A plain int8 export: it carries the dyn8 form by default."""
    from skipdecode.export.random_models import build_random_opt
    root = tmp_path_factory.mktemp("kernels-dyn8")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(root / "ckpt")
    export(ExportConfig(lossless_policy="default",
                        model=str(root / "ckpt"), out=root / "int8", speedups=(2.0,), max_batch=4, quantize="int8"),
           progress=False)
    return root / "int8"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(K.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(K.ENV_KERNEL, raising=False)
    return tmp_path / "cache"


def _copy(engine: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the engine whose manifest `edit(raw)` may change (the manifest is not among the hashed files)."""
    dst = tmp_path / engine.name
    shutil.copytree(engine, dst)
    if edit is not None:
        raw = json.loads((dst / MANIFEST).read_text())
        edit(raw)
        (dst / MANIFEST).write_text(json.dumps(raw))
    return dst


def _fail_exact(raw: dict) -> None:
    """Record the a1 candidate's parity ("exact.*" entries) as over its limit."""
    key = next(k for k in raw["parity"] if k.startswith("exact."))
    raw["parity"][key]["max_abs_diff"] = raw["parity"][key]["limit"] * 2


class FakeMeasure:
    """Timings given per candidate; counts the calls."""

    def __init__(self, ms: dict) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self, cands, bands):
        self.calls += 1
        return {c.name: {b: self.ms[c.name] for b in bands} for c in cands}


def test_export_writes_the_a1_candidate_with_its_parity(int8_engine):
    man = load_manifest(int8_engine)
    cands = K.candidates(man)
    assert [c.name for c in cands] == ["a4", "a1"]
    a4, a1 = cands
    assert a4.files == {} and a4.parity == "engine"
    assert set(a1.files) == {g.name for g in man.graphs} and a1.parity == "exact"
    for f in a1.files.values():
        assert (int8_engine / f).is_file() and f in man.integrity["files"]
        assert b"accuracy_level" in (int8_engine / f).read_bytes()
    assert all(K.parity_passed(man, c) for c in cands)


def test_cache_key_changes_with_each_input():
    base = K.cache_key(CPU, "1.31.1", "abc")
    assert base == K.cache_key(dict(CPU, flags=list(reversed(CPU["flags"]))), "1.31.1", "abc")  # order-free
    others = [K.cache_key(dict(CPU, model="Other CPU"), "1.31.1", "abc"),
              K.cache_key(dict(CPU, flags=[*CPU["flags"], "avx512_vnni"]), "1.31.1", "abc"),
              K.cache_key(CPU, "1.32.0", "abc"), K.cache_key(CPU, "1.31.1", "abd")]
    assert len({base, *others}) == 5


def test_manifest_hash_follows_the_manifest(int8_engine, tmp_path):
    copy = _copy(int8_engine, tmp_path, _fail_exact)
    assert K.manifest_hash(int8_engine) != K.manifest_hash(copy)


def test_cpu_info_reads_model_and_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: sse2 avx2 avx512_vnni amx_int8\n\n"
                 "processor\t: 1\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: sse2\n")
    info = K.cpu_info(str(f))
    assert info == {"model": "Some CPU @ 2GHz", "flags": ["amx_int8", "avx2", "avx512_vnni", "sse2"]}
    assert K.isa(info["flags"])["amx_int8"] and not K.isa(info["flags"])["avx512f"]


def test_measured_choice_is_the_fastest_and_is_cached(int8_engine, cache):
    man = load_manifest(int8_engine)
    fake = FakeMeasure({"a4": 2.0, "a1": 1.0})
    choice = K.choose(int8_engine, man, "auto", 4, fake, "1.31.1", CPU)
    assert (choice.name, choice.source, fake.calls) == ("a1", "measured", 1)
    assert "fastest at batch 4" in choice.reason and "a1 1.00" in choice.reason
    again = K.choose(int8_engine, man, "auto", 4, fake, "1.31.1", CPU)
    assert (again.name, again.source, fake.calls) == ("a1", "cached", 1)
    assert len(list((cache / "kernels").glob("*.json"))) == 1
    # another onnxruntime version is another key: measured again
    K.choose(int8_engine, man, "auto", 4, fake, "1.32.0", CPU)
    assert fake.calls == 2
    # "measure" ignores the cache
    K.choose(int8_engine, man, "measure", 4, fake, "1.31.1", CPU)
    assert fake.calls == 3


def test_a_candidate_that_failed_parity_is_never_chosen_even_if_fastest(int8_engine, tmp_path):
    bad = _copy(int8_engine, tmp_path, _fail_exact)
    man = load_manifest(bad)
    fake = FakeMeasure({"a4": 5.0, "a1": 0.1})  # a1 would win by 50x
    choice = K.choose(bad, man, "auto", 4, fake, "1.31.1", CPU)
    assert choice.name == "a4" and "a1" in choice.rejected and "parity" in choice.rejected["a1"]
    assert fake.calls == 0  # one eligible candidate: nothing to measure
    with pytest.raises(EngineError, match="kernel='a1' failed the export's parity check"):
        K.choose(bad, man, "a1", 4, fake, "1.31.1", CPU)
    # negative control: the untouched engine, same timings, picks a1
    good = K.choose(int8_engine, load_manifest(int8_engine), "auto", 4, fake, "1.31.1", CPU)
    assert good.name == "a1" and not good.rejected


def test_a_missing_parity_record_is_not_a_pass(int8_engine, tmp_path):
    man = load_manifest(_copy(int8_engine, tmp_path, lambda raw: raw["parity"].clear()))
    assert not any(K.parity_passed(man, c) for c in K.candidates(man))


def test_per_band_winners_are_reported_and_one_runs_for_the_max_batch(int8_engine):
    man = load_manifest(int8_engine)

    asked = []

    def measure(cands, bands):
        asked.append(bands)
        return {"a4": {1: 1.0, 4: 3.0}, "a1": {1: 2.0, 4: 2.5}}

    choice = K.choose(int8_engine, man, "measure", 4, measure, "1.31.1", CPU)
    assert choice.name == "a1" and choice.per_band == {1: "a4", 4: "a1"}
    assert "batch 1 would pick a4" in choice.reason
    one = K.choose(int8_engine, man, "measure", 1, measure, "1.31.1", CPU)
    assert one.per_band == {1: "a4"} and one.name == "a4"
    assert asked == [(1, 4), (1,)]  # the 8 band capped at the max batch


def test_modes_and_bad_values(int8_engine, monkeypatch):
    man = load_manifest(int8_engine)
    fake = FakeMeasure({"a4": 1.0, "a1": 2.0})
    assert K.choose(int8_engine, man, None, 4, fake, "v", CPU).source == "exported"  # the library default
    monkeypatch.setenv(K.ENV_KERNEL, "a1")
    assert (K.choose(int8_engine, man, None, 4, fake, "v", CPU).name, fake.calls) == ("a1", 0)
    with pytest.raises(EngineError, match="kernel='a7' is not one of"):
        K.choose(int8_engine, man, "a7", 4, fake, "v", CPU)


def test_engine_load_runs_the_forced_candidate_and_reports_it(int8_engine):
    opts = GenerateOptions(max_new_tokens=6, speedup=2.0)
    with Engine.load(int8_engine, kernel="a1") as a1, Engine.load(int8_engine, kernel="a4") as a4:
        assert a1.kernel_choice.name == "a1" and a1.kernel_choice.source == "forced"
        assert {g.file for g in a1.manifest.graphs} == set(K.candidates(a1.manifest)[1].files.values())
        assert not any(".a1." in g.file for g in a4.manifest.graphs)
        line = a1.kernel_choice.line()
        assert line.startswith("kernel: a1 (forced: requested)") and "cpu:" in line
        ra, rb = a1.generate(PROMPTS, opts), a4.generate(PROMPTS, opts)
        assert all(len(r.tokens) == 6 for r in ra + rb)


def test_engine_load_measures_with_the_real_backends(int8_engine, cache):
    """The real measuring path (every candidate loaded, steps interleaved), timed by a fake clock that makes a1
    slower: a4 is chosen, and the timings reach the report."""
    clock = {"t": 0.0, "calls": 0}

    def timer():
        clock["calls"] += 1
        clock["t"] += 0.001
        return clock["t"]

    seen = []
    real = K.measure_steps

    def measure(open_backend, cands, bands, rounds=K.ROUNDS, timer=timer):
        seen.append([c.name for c in cands])
        out = real(open_backend, cands, bands, rounds=3, timer=timer)
        out["a1"] = {b: ms * 10 for b, ms in out["a1"].items()}
        return out

    import skipdecode.runtime.engine as E
    orig = E.measure_steps
    E.measure_steps = measure
    try:
        with Engine.load(int8_engine, kernel="measure") as engine:
            c = engine.kernel_choice
            assert seen == [["a4", "a1"]] and c.name == "a4" and c.source == "measured"
            assert set(c.timings_ms) == {"a4", "a1"} and set(c.timings_ms["a4"]) == {1, 4}
            assert clock["calls"] == 2 * 3 * 2 * 2  # two timer reads per step, 3 rounds, 2 bands, 2 candidates
            assert np.isfinite(engine.generate(PROMPTS[:1], GenerateOptions(max_new_tokens=3))[0].tokens).all()
    finally:
        E.measure_steps = orig


def test_float_engines_have_no_choice(engine_dir):
    _, _, directory = engine_dir
    with Engine.load(directory, kernel="auto") as engine:
        assert engine.kernel_choice is None


def test_bench_report_names_the_choice_and_the_cpu_extensions():
    from skipdecode.bench.report import _kernel_lines
    out = {"machine": {"isa": {"avx2": True, "avx512f": True, "amx_int8": False}},
           "kernels": [{"model": "opt-125m", "backend": "onnxruntime-int8", "name": "a4", "source": "measured",
                        "reason": "fastest at batch 8 (ms/step: a4 1.00, a1 2.00)", "per_band": {1: "a4", 8: "a4"}}]}
    text = "\n".join(_kernel_lines(out))
    assert "CPU extensions: avx2 avx512f." in text and "| a4 | measured | fastest at batch 8" in text
    assert _kernel_lines({"machine": {}, "kernels": []}) == []


class _FakeBackend:
    """Slot-backend stand-in whose decode step advances a shared clock by `ms`."""

    def __init__(self, clock: dict, ms: float) -> None:
        from skipdecode.runtime.kv import SlotTable
        self.clock, self.ms, self.steps = clock, ms, 0
        self.buckets, self.pad_token_id, self.max_length = (2,), 1, 64
        self.slots = SlotTable(8)

    def prefill_rows(self, prompts, slots):
        pass

    def decode_rows(self, slots, tokens, bucket, gates):
        self.steps += 1
        self.clock["t"] += self.ms / 1e3

    def close(self):
        pass


def test_a_candidate_far_slower_after_one_round_is_not_timed_further():
    clock = {"t": 0.0}
    made = {}

    def open_backend(cand, batch, length):
        made[cand.name] = _FakeBackend(clock, {"fast": 1.0, "close": 2.0, "slow": 10.0}[cand.name])
        return made[cand.name]

    cands = [K.Candidate(n, {}, "engine") for n in ("fast", "close", "slow")]
    out = K.measure_steps(open_backend, cands, (1, 8), rounds=5, timer=lambda: clock["t"])
    assert {n: round(t[8]) for n, t in out.items()} == {"fast": 1, "close": 2, "slow": 10}
    # warm-up (one per band) + timed steps: 5 rounds x 2 bands, the slow one only its first round
    assert (made["fast"].steps, made["close"].steps, made["slow"].steps) == (12, 12, 4)


# ----------------------------------------------------------------------------------------- the dyn8 kernel form

def test_an_int8_export_carries_a_parity_checked_dyn8_form(dyn8_engine):
    man = load_manifest(dyn8_engine)
    a4, dyn8 = K.candidates(man)
    assert (a4.name, dyn8.name, dyn8.parity) == ("a4", "dyn8", "kernel.dyn8")
    assert set(dyn8.files) == set(dyn8.weights) == {g.name for g in man.graphs}
    for f in dyn8.files.values():
        assert f.endswith(".dyn8.onnx") and f in man.integrity["files"] and (dyn8_engine / f).is_file()
    # its own part of the parity report, both checks, every graph; all passed
    part = {k for k in man.parity if K._parity_part(k) == "kernel.dyn8"}
    assert {k for k in part if k.startswith("exact.")} and {k for k in part if not k.startswith("exact.")}
    assert {k.split(".")[-2] for k in part if ".decode." not in k} >= {"prefill", "verify"}
    assert K.parity_passed(man, a4) and K.parity_passed(man, dyn8)
    # a second weight set (7-bit codes tagged .dyn8) that the exported graphs never read; the token lookup of both
    # forms reads the one packed int8 table, so no float embedding is kept for the dyn8 form
    tagged = {w for ws in dyn8.weights.values() for w in ws if ".dyn8." in w}
    assert tagged and not tagged & {w for g in man.graphs for w in g.weights}
    assert not any(w.endswith("embed_tokens.weight") for ws in dyn8.weights.values() for w in ws)
    gather = {w for w in man.weights if w.endswith("embed_tokens.weight.qweight")}
    assert gather and gather <= set(dyn8.weights["prefill"])
    assert dyn8.prepacked and set(dyn8.prepacked) <= tagged


def test_the_dyn8_form_runs_and_gives_back_the_other_weight_set(dyn8_engine):
    opts = GenerateOptions(max_new_tokens=6, speedup=2.0)
    with Engine.load(dyn8_engine, kernel="dyn8") as d, Engine.load(dyn8_engine, kernel="a4") as a:
        assert d.kernel_choice.name == "dyn8" and all(g.file.endswith(".dyn8.onnx") for g in d.manifest.graphs)
        # each form reads only its own set: the other's matrices are unread, so their pages are given back
        unread_d, unread_a = set(d.manifest.unread_weights()), set(a.manifest.unread_weights())
        int8 = {w for w in d.manifest.weights if w.endswith(".qweight") and ".dyn8." not in w}
        dyn8 = {w for w in d.manifest.weights if ".dyn8." in w}
        table = {w for w in int8 if "embed_tokens" in w}  # the token lookup of both forms
        assert table and int8 - table <= unread_d and not dyn8 & unread_d
        assert dyn8 <= unread_a and not int8 & unread_a
        assert d.backend.released_bytes > 0 and a.backend.released_bytes > 0
        rd, ra = d.generate(PROMPTS, opts), a.generate(PROMPTS, opts)
        assert all(len(r.tokens) == 6 for r in rd + ra)


def test_dyn8_is_chosen_when_fastest_and_never_when_its_parity_failed(dyn8_engine, tmp_path):
    man = load_manifest(dyn8_engine)
    fake = FakeMeasure({"a4": 2.0, "dyn8": 1.0})
    assert K.choose(dyn8_engine, man, "auto", 4, fake, "v", CPU).name == "dyn8"

    def fail_dyn8(raw):
        key = next(k for k in raw["parity"] if k.startswith("kernel.dyn8."))
        raw["parity"][key]["max_abs_diff"] = raw["parity"][key]["limit"] * 2

    bad = load_manifest(_copy(dyn8_engine, tmp_path, fail_dyn8))
    choice = K.choose(tmp_path / dyn8_engine.name, bad, "auto", 4, fake, "v", CPU)
    # the failed form is out; the exported form's own record is untouched, so it still runs
    assert choice.name == "a4" and set(choice.rejected) == {"dyn8"}


def test_a_dyn8_scale_error_in_one_layer_fails_the_forms_parity(dyn8_engine, tmp_path):
    """Negative control of the form's own check: one dyn8 matrix's scales 2% off in weights.bin (as a corrupted file
    or a quantizer bug would leave them) fail "exact.kernel.dyn8.*" against the form's reference built from the
    right weights, while the engine as exported passes the same check."""
    import shutil as sh

    from skipdecode.export.models import load_model
    from skipdecode.export.parity import ParityError, check_parity
    from skipdecode.export.quantize_export import dequantized_model
    man = load_manifest(dyn8_engine)
    form = man.quantization["kernels"][1]
    bad = tmp_path / "bad"
    sh.copytree(dyn8_engine, bad)
    w = man.weights[form["quantization"]["tensors"]["model.decoder.layers.1.fc2.weight"]["scales"]]
    raw = np.fromfile(bad / "weights.bin", dtype=np.uint8)
    raw[w.offset: w.offset + w.nbytes].view(w.dtype)[:] *= 1.02
    raw.tofile(bad / "weights.bin")
    model, _ = load_model(str(dyn8_engine.parent / "ckpt"))
    reference = dequantized_model(model, dyn8_engine, man.weights, man.quantization)
    right = {"dyn8": dequantized_model(reference, dyn8_engine, man.weights, form["quantization"])}
    with pytest.raises(ParityError, match=r"exact\.kernel\.dyn8\.") as err:
        check_parity(bad, reference, form_models=right)
    print(err.value)
    check_parity(dyn8_engine, reference, form_models=right)  # the engine as exported passes


@pytest.mark.parametrize(("value", "scheme", "want"), [
    ("auto", "int8-b32", ("dyn8",)), ("auto", "int4-b32", ()), ("auto", "int8-b32-a1", ()), ("auto", "dyn8", ()),
    ("none", "int8-b32", ()), ("a1,dyn8", "int8-b32", ("a1", "dyn8")), ("a1", "int4-b32", ("a1",))])
def test_kernel_forms_per_scheme(value, scheme, want):
    from skipdecode.export.quantize_export import resolve_kernels
    assert resolve_kernels(value, scheme) == want


@pytest.mark.parametrize(("value", "scheme", "match"), [
    ("a2", "int8-b32", "expected auto, none or a list of a1, dyn8"), ("", "int8-b32", "expected auto"),
    ("dyn8", "int4-b32", "only 8-bit engines carry a dyn8 form"),
    ("dyn8", "dyn8", "only MatMulNBits engines at accuracy level 4")])
def test_bad_kernel_forms_are_refused(value, scheme, match):
    from skipdecode.export.quantize_export import resolve_kernels
    with pytest.raises(EngineError, match=match):
        resolve_kernels(value, scheme)


def test_kernel_forms_on_a_float_export_are_refused_before_tracing(tmp_path):
    from skipdecode.export.random_models import build_random_opt
    build_random_opt("tiny-preln", seed=0).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(EngineError, match="only quantized engines"):
        export(ExportConfig(lossless_policy="default",
                            model=str(tmp_path / "ckpt"), out=tmp_path / "e", kernel_candidates="dyn8"),
               progress=False)
    assert not (tmp_path / "e").exists()


def test_a_form_naming_an_unknown_weight_is_refused(dyn8_engine, tmp_path):
    def edit(raw):
        form = raw["quantization"]["kernels"][1]
        form["weights"]["prefill"] = [*form["weights"]["prefill"], "no.such.weight"]

    with pytest.raises(EngineError, match="must list weights of this engine"):
        K.candidates(load_manifest(_copy(dyn8_engine, tmp_path, edit)))
