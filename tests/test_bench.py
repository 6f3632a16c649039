"""The bench machinery on a tiny model: the JSON interface other tools read, the cost model and ideal speedup,
target evaluation, and the report files. Timings here are never checked against targets (pytest is no benchmark)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from skipdecode.bench import cost  # noqa: E402
from skipdecode.bench.report import add_hf_ratios, evaluate_targets, markdown, scheme_table  # noqa: E402
from skipdecode.bench.run import (  # noqa: E402
    EMBEDDED_MODELS,
    SMALL,
    BenchConfig,
    BenchModel,
    interleave_groups,
    prepare_model,
    present_embedded,
)
from skipdecode.runtime.errors import InputError  # noqa: E402
from skipdecode.runtime.schedule import Schedule, make_plan  # noqa: E402

from skipdecode.bench_cli import add_bench_parser, config_from_args, run_bench  # noqa: E402


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


TINY_ARGS = ("--quick", "--models", "tiny-preln", "--batches", "1,2", "--max-new-tokens", "6", "--prompt-lengths",
             "3,9", "--repeats", "1", "--min-time", "0")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `skipdecode bench` run on the tiny pre-LN shape (both onnxruntime backends, HF, memory probes)."""
    tmp = tmp_path_factory.mktemp("bench")
    args = parse(*TINY_ARGS, "--cache-dir", str(tmp / "cache"), "--out-dir", str(tmp / "out"),
                 "--json", str(tmp / "result.json"))
    # The bench switches onnxruntime to one process-wide thread pool, which cannot be undone and would leak into
    # the other tests of this process; tests/test_slots.py checks that mode in a subprocess instead.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("skipdecode.runtime.ort_sessions.configure_onnxruntime", lambda threads=None: threads)
        assert run_bench(args) == 0

    def strict(const):
        raise ValueError(f"{const} is not JSON")
    return tmp, args, json.loads((tmp / "result.json").read_text(), parse_constant=strict)


def test_json_interface(bench_run):
    _, _, out = bench_run
    rows = out["results"]
    assert {r["backend"] for r in rows} == {"onnxruntime", "onnxruntime-private", "onnxruntime-int8", "hf-generate"}
    # CTranslate2's OPT converter refuses the tiny vocabulary (211, not a multiple of 8): recorded, not fatal
    assert {s["backend"] for s in out["skipped"]} == {"ctranslate2-int8", "ctranslate2-fp32"}
    for r in rows:
        assert {"model", "backend", "batch", "speedup", "tokens_per_s"} <= r.keys()
        assert r["model"] == "tiny-preln" and r["tokens_per_s"] > 0
        if r["backend"] != "hf-generate":
            assert r["ideal_speedup"] > 0 and r["measured_speedup"] > 0 and "vs_hf" in r
    ours = {(r["backend"], r["batch"], r["speedup"]) for r in rows if r["backend"] != "hf-generate"}
    backends = ("onnxruntime", "onnxruntime-private", "onnxruntime-int8")
    assert ours == {(b, n, s) for b in backends for n in (1, 2) for s in (1, 2, 3, 5)}
    assert all(0 < r["roofline_fraction"] and r["e2e_speedup"] > 0 for r in rows if r["backend"] in backends)
    full = [r for r in rows if r["backend"] == "onnxruntime" and r["speedup"] == 1]
    assert all(r["measured_speedup"] == 1 and r["ideal_speedup"] == 1 for r in full)
    assert out["memory"]["all_buckets_bytes"] > 0 and out["memory"]["one_copy_bytes"] > 0
    assert {"cpu", "cores", "threads", "date", "versions"} <= out["machine"].keys()
    checks = out["targets"]["checks"]
    assert checks and all({"target", "value", "threshold", "met"} <= c.keys() for c in checks)
    assert out["targets"]["all_met"] == all(c["met"] for c in checks)
    [scaling] = out["length_scaling"]
    assert [p["past_length"] for p in scaling["points"]] == [32, 96]  # lengths past the tiny model's 128 dropped
    assert all(p["step_ms"] > 0 and p["attention_ms"] > 0 for p in scaling["points"])
    assert len(out["cost_models"]) == 6 and all(c["per_layer_s"] > 0 for c in out["cost_models"])
    assert out["memory"]["models"][0]["all_buckets_int8_bytes"] > 0
    # lossless rows (the engine's automatic policy, and 4 tokens from 3x) on the default backend, greedy tokens
    # equal full depth's
    lossless = out["lossless"]
    assert {(r["backend"], r["batch"], r["draft_speedup"], r["draft_tokens"]) for r in lossless} == {
        ("onnxruntime", b, s, k) for b in (1, 2) for s, k in ((0, 0), (3, 4))}
    for r in lossless:
        assert r["identical"] and r["speedup"] > 0 and 0 <= r["acceptance_rate"] <= 1
    auto = next(r for r in lossless if r["draft_tokens"] == 0)
    assert auto["drafting"].startswith("automatic") and auto["policy"]["draft_speedup"] > 1
    auto_b2 = next(r for r in lossless if r["batch"] == 2 and r["draft_tokens"] == 0)
    assert auto_b2["acceptance_rate"] == 0  # two lossless rows per step: no drafting by default
    assert any(c["target"] == "lossless tokens identical to full depth" and c["met"] for c in checks)


def test_report_files_and_cache(bench_run):
    tmp, args, out = bench_run
    md = (tmp / "out" / "bench.md").read_text()
    assert "| tiny-preln | onnxruntime | 2 | 3x |" in md and "## Targets" in md and "3x speedup (ideal)" in md
    assert "## Lossless mode" in md and "| tiny-preln | onnxruntime | 1 | 4 tokens from 3x |" in md
    assert "| tiny-preln | onnxruntime | 2 | automatic: " in md
    assert (tmp / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # a second run reuses the cached engine instead of exporting again
    model = prepare_model("tiny-preln", config_from_args(args), log=print)
    manifest = model.engine / "manifest.json"
    before = manifest.stat().st_mtime_ns
    prepare_model("tiny-preln", config_from_args(args), log=print)
    assert manifest.stat().st_mtime_ns == before


def test_fit_recovers_known_costs():
    rng = np.random.default_rng(0)
    layers = [1, 2, 3, 4, 6, 9, 12] * 3
    seconds = [0.004 + 0.0025 * b + rng.normal(0, 2e-5) for b in layers]
    cm = cost.fit_cost_model(layers, seconds)
    assert cm.fixed_s == pytest.approx(0.004, rel=0.02)
    assert cm.per_layer_s == pytest.approx(0.0025, rel=0.01)
    assert cm.r2 > 0.999
    # noise that tilts the line below zero: clamped to the non-negative boundary, never a negative step time
    assert cost.fit_cost_model([1, 2, 12], [0.0, 0.3, 1.2]).fixed_s == 0.0
    flat = cost.fit_cost_model([1, 2, 12], [0.5, 0.4, 0.3])
    assert (flat.fixed_s, flat.per_layer_s) == (pytest.approx(0.4), 0.0)
    with pytest.raises(ValueError, match="distinct layer counts"):
        cost.fit_cost_model([12, 12], [0.1, 0.1])


def test_ideal_speedup():
    steps = [2, 2]  # of a 4-layer model; fixed 1 + 1 per layer: full 5, skip 3 per step
    assert cost.ideal_speedup(cost.CostModel(1.0, 1.0, 1.0), 4, steps) == pytest.approx(5 / 3)
    no_fixed = cost.CostModel(0.0, 1.0, 1.0)
    plan = make_plan(Schedule.for_speedup(12, 3.0), 8, 40)
    buckets = [s.bucket for s in plan.steps]
    assert cost.ideal_speedup(no_fixed, 12, buckets) == pytest.approx(plan.realised_speedup)
    assert cost.ideal_speedup(cost.CostModel(0.3, 0.1, 1.0), 12, buckets) < plan.realised_speedup
    assert cost.ideal_speedup(no_fixed, 12, []) == 1.0


def test_step_buckets_follow_the_generation_plan():
    buckets = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12)
    got = cost.step_buckets(12, 1, buckets, 2.0, 8, 16)
    want = [s.bucket for s in make_plan(Schedule.for_speedup(12, 2.0), 8, 24, buckets).steps]
    assert got == want and len(got) == 15 and got == sorted(got, reverse=True)
    assert cost.step_buckets(12, 1, buckets, 1.0, 8, 16) == [12] * 15


def test_rotated_samples_rotate_and_warm_up():
    calls = []
    samples = cost.rotated_samples({k: (lambda k=k: calls.append(k)) for k in "abc"}, rounds=3, lead_in=1)
    assert calls[:3] == list("abc")  # untimed warm-up
    # round r starts at key r (rotation); odd rounds run backwards, so no key is always timed first or last;
    # each timed call follows an untimed lead-in call of the same function
    assert calls[3:] == list("aabbcc") + list("aaccbb") + list("ccaabb")
    assert [len(samples[k]) for k in "abc"] == [3, 3, 3]
    assert cost.fastest({"a": [0.3, 0.1, 0.2]}) == {"a": 0.1}


def _row(model, backend, batch, speedup, tps, measured=None, ideal=None):
    r = {"model": model, "backend": backend, "batch": batch, "speedup": speedup, "tokens_per_s": tps}
    return r | ({"measured_speedup": measured, "ideal_speedup": ideal} if backend != "hf-generate" else {})


def test_targets_evaluation():
    out = {"results": [_row("opt-125m", "onnxruntime", 8, 1.0, 100.0, 1.0, 1.0),
                       _row("opt-125m", "onnxruntime", 8, 2.0, 190.0, 1.90, 2.0),
                       _row("opt-125m", "onnxruntime", 8, 3.0, 260.0, 2.60, 2.8),
                       _row("opt-125m", "hf-generate", 8, 1.0, 50.0)],
           "memory": {"models": [{"model": "opt-125m", "all_buckets_bytes": 110, "one_copy_bytes": 100}]},
           "length_scaling": [{"model": "opt-125m", "backend": "onnxruntime", "batch": 8, "step_growth_ms": 1.0,
                               "attention_growth_ms": 1.0, "step_ms_at_shortest": 40.0}]}
    add_hf_ratios(out["results"])
    checks = {(c["target"].split()[0], c.get("speedup")): c for c in evaluate_targets(out)["checks"]}
    assert checks[("realised", 2.0)]["met"] and checks[("realised", 2.0)]["value"] == pytest.approx(0.95)
    assert not checks[("realised", 3.0)]["met"]
    assert checks[("full", None)]["value"] == pytest.approx(2.0) and checks[("full", None)]["met"]
    skip = checks[("SkipDecode", 3.0)]
    assert skip["stand_in_for"] == "opt-1.3b" and skip["value"] == pytest.approx(5.2) and skip["met"]
    assert checks[("all", None)]["met"] and checks[("step", None)]["met"]
    lossless = {"model": "small-opt-kjv", "backend": "onnxruntime", "batch": 1, "speedup": 1.4, "identical": True,
                "draft_speedup": 0.0, "draft_tokens": 0}
    out["lossless"] = [lossless, lossless | {"batch": 8, "identical": False, "speedup": 0.9},
                       lossless | {"draft_speedup": 3.0, "draft_tokens": 4, "speedup": 2.0}]
    found = [(c["target"], c["batch"], c["met"]) for c in evaluate_targets(out)["checks"] if "lossless" in c["target"]]
    assert found == [("lossless tokens identical to full depth", 1, True), ("lossless >= 1.5 x full-depth tokens/s",
                                                                              1, False),
                     ("lossless tokens identical to full depth", 8, False),
                     ("automatic lossless not slower than full depth (within noise)", 8, False),
                     ("lossless tokens identical to full depth", 1, True)]


def test_int8_against_our_fp32_and_the_scheme_table():
    rows = [_row("opt-125m", "onnxruntime", 8, 1.0, 100.0, 1.0, 1.0),
            _row("opt-125m", "onnxruntime", 8, 3.0, 250.0, 2.5, 2.6),
            _row("opt-125m", "onnxruntime-int8", 8, 1.0, 80.0, 1.0, 1.0),
            _row("opt-125m", "onnxruntime-int8", 8, 3.0, 260.0, 3.2, 3.2),
            _row("opt-125m", "onnxruntime-dyn8", 8, 1.0, 120.0, 1.0, 1.0) | {"roofline_fraction": 0.4},
            _row("opt-125m", "ctranslate2-int8", 8, 1.0, 100.0)]
    for r in rows:
        r["e2e_tokens_per_s"] = r["tokens_per_s"]
    out = {"results": rows, "memory": {"models": []}, "length_scaling": []}
    add_hf_ratios(rows)
    assert rows[2]["vs_fp32"] == pytest.approx(0.8) and rows[3]["vs_fp32"] == pytest.approx(1.04)
    assert "vs_fp32" not in rows[0] and "vs_fp32" not in rows[5]  # the reference and the peers get none
    found = [(c["speedup"], c["met"]) for c in evaluate_targets(out)["checks"] if "our fp32" in c["target"]]
    assert found == [(1.0, False), (3.0, True)]  # slower than fp32 at full depth fails; a faster 3x passes
    table = "\n".join(scheme_table(out))
    assert "| opt-125m | 8 | int8 | 80.0 | 260.0 | 0.80 | 2.60 | 0.80 | 1.04 | - |" in table
    assert "| opt-125m | 8 | dyn8 | 120.0 | - | 1.20 | - | 1.20 | - | 0.40 |" in table
    assert "int4" not in table  # a format that was not run gets no row


def test_interleave_groups_fit_in_memory(tmp_path, monkeypatch):
    model = BenchModel("m", tmp_path, tmp_path / "fp32", {None: tmp_path / "fp32", "int8": tmp_path / "int8"})
    sizes = {"fp32": 400, "int8": 100}
    monkeypatch.setattr("skipdecode.bench.run._weights_bytes", lambda engine: sizes[engine.name])
    monkeypatch.setattr("skipdecode.bench.run.prepack_bytes_estimate", lambda engine: 4 * sizes[engine.name])
    backends = ["onnxruntime", "onnxruntime-int8", "onnxruntime-private"]
    assert interleave_groups(model, backends, budget=10_000) == [backends]  # all timed in the same rounds
    # the private engine (4 copies: 1600) no longer fits with the others; the order is kept
    assert interleave_groups(model, backends, budget=1000) == [backends[:2], backends[2:]]
    assert interleave_groups(model, backends, budget=450) == [[b] for b in backends]


def test_roofline_target_of_the_small_model():
    def row(model, batch, speedup, fraction):
        return _row(model, "onnxruntime", batch, speedup, 10.0, 1.0, 1.0) | {"roofline_fraction": fraction}
    out = {"results": [row(SMALL, 1, 1.0, 0.85), row(SMALL, 1, 2.0, 0.5), row(SMALL, 8, 1.0, 0.1),
                       row("embedded", 1, 1.0, 0.1)],
           "memory": {"models": []}, "length_scaling": []}
    found = [c for c in evaluate_targets(out)["checks"] if "roofline" in c["target"]]
    assert [(c["model"], c["batch"], c["value"], c["met"]) for c in found] == [(SMALL, 1, 0.85, True)]
    out["results"][0]["roofline_fraction"] = 0.7
    assert not next(c for c in evaluate_targets(out)["checks"] if "roofline" in c["target"])["met"]


def test_embedded_models_of_the_full_preset(tmp_path, monkeypatch):
    # the default embedded model always; the small one only where its checkpoint is in the checkout
    assert present_embedded(tmp_path) == ("embedded",)
    small = tmp_path / EMBEDDED_MODELS[SMALL]
    small.mkdir(parents=True)
    (small / "config.json").write_text("{}")
    assert present_embedded(tmp_path) == ("embedded", SMALL)
    assert BenchConfig.full_preset().models[0] == "embedded"
    # selectable by name, without the model being trained yet; a missing checkpoint is reported when it loads
    assert config_from_args(parse("--quick", "--models", SMALL)).models == (SMALL,)
    monkeypatch.setitem(EMBEDDED_MODELS, SMALL, tmp_path / "absent" / "skip-tuned")
    with pytest.raises(FileNotFoundError, match="make small-model"):
        prepare_model(SMALL, BenchConfig.quick_preset(models=(SMALL,), cache_dir=tmp_path / "cache"), log=print)


def test_markdown_of_a_synthetic_result():
    row = _row("m", "onnxruntime", 1, 1.0, 10.0, 1.0, 1.0) | {"step_ms": 1.0, "prefill_ms": 2.0, "layer_speedup": 1.0}
    out = {"machine": {"date": "d", "cpu": "c", "cores": 2, "threads": 2, "git": None,
                       "versions": {"skipdecode": "0", "onnxruntime": "1", "torch": "2", "transformers": "5"}},
           "config": {"repeats": 3, "max_new_tokens": 8, "prompt_lengths": [1, 2]}, "duration_s": 60.0,
           "results": [row], "cost_models": [], "memory": {"models": []}, "length_scaling": [],
           "targets": {"all_met": True, "checks": []}}
    assert "| m | onnxruntime | 1 | 1x | 10.0 |" in markdown(out)


@pytest.mark.parametrize("argv, message", [
    (("--prompt-lengths", "4"), "--prompt-lengths takes LO,HI"),
    (("--models", "opt-7b"), "unknown model 'opt-7b'"),
    (("--batches", "64"), "must lie in [1, max_batch=32]"),
    (("--backends", "tensorrt"), "unknown backend 'tensorrt'"),
    (("--lossless", "3:16"), "draft_tokens=16"),
    (("--lossless", "1:4"), "draft_speedup=1.0"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        config_from_args(parse(*argv))
