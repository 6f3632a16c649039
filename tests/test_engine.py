"""Exporter + onnxruntime runtime against the PyTorch reference, and the engine directory contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.torch_generator import TorchGenerator
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError, InputError
from skipdecode.runtime.manifest import FORMAT_VERSION, WEIGHTS_FILE
from skipdecode.runtime.request import FinishEvent, GenerateOptions, TokenEvent
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.schedule import Schedule, make_plan

from .conftest import PROMPTS
from .recorders import record


@pytest.mark.parametrize("speedup", [1.0, 2.0, 3.0, 5.0])
def test_runtime_matches_reference(engine_dir, speedup):
    _, ckpt, out = engine_dir
    opts = GenerateOptions(max_new_tokens=32, speedup=speedup)
    engine, torch_gen = Engine.load(out), TorchGenerator.load(str(ckpt))
    rec_e, rec_t = record(engine.backend), record(torch_gen.backend)
    got, want = engine.generate(PROMPTS, opts), torch_gen.generate(PROMPTS, opts)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.budgets for r in got] == [r.budgets for r in want]
    assert all(len(r.tokens) == 32 for r in got)
    assert sorted(rec_e) == sorted(rec_t) == [0, 1, 2]
    for slot in rec_e:
        for a, b in zip(rec_e[slot], rec_t[slot], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    if speedup > 1:
        assert min(got[0].budgets) < engine.manifest.num_layers


def test_sampling_matches_reference(engine_dir):
    _, ckpt, out = engine_dir
    opts = GenerateOptions(max_new_tokens=16, speedup=2.0, sampling=SamplingParams(0.9, 20, 0.95, seed=3))
    got = Engine.load(out).generate(PROMPTS, opts)
    want = TorchGenerator.load(str(ckpt)).generate(PROMPTS, opts)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_stream_yields_every_token_then_one_finish_event_per_row(engine_dir):
    engine = Engine.load(engine_dir[2])
    opts = GenerateOptions(max_new_tokens=5, speedup=2.0)
    events = list(engine.stream(PROMPTS, opts))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    finishes = [e for e in events if isinstance(e, FinishEvent)]
    assert len(tokens) == 5 * len(PROMPTS) and [e.index for e in tokens if e.request_id == 0] == list(range(5))
    assert sorted(e.request_id for e in finishes) == list(range(len(PROMPTS)))
    assert all(e.reason == "length" for e in finishes)
    # each row's finish event is its last
    assert all(events.index(f) > max(events.index(t) for t in tokens if t.request_id == f.request_id) for f in finishes)
    assert {e.budget for e in tokens if e.index == 0} == {engine.manifest.num_layers}  # the prefill's token
    want = engine.generate(PROMPTS, opts)
    assert [[e.token for e in tokens if e.request_id == r] for r in range(len(PROMPTS))] == [w.tokens for w in want]


def test_graphs_share_one_weights_file(engine_dir):
    out = engine_dir[2]
    man = json.loads((out / "manifest.json").read_text())
    files = {g["file"] for g in man["graphs"]}
    # prefill, one graph per bucket, the verify graphs of lossless mode (any batch; one row in place for gqa) and
    # its int8 drafts (one per draft bucket)
    kinds = [g["kind"] for g in man["graphs"]]
    assert kinds.count("verify") == 1 and kinds.count("verify_row") == (man["attention"] == "gqa")
    assert kinds.count("draft") == len(man["drafts"]["graphs"]) > 0
    assert len(files) == len(kinds) == 1 + kinds.count("decode") + 1 + kinds.count("verify_row") + kinds.count("draft")
    weights_size = (out / WEIGHTS_FILE).stat().st_size
    for f in files:
        model = onnx.load(str(out / f), load_external_data=False)
        assert model.graph.initializer, f
        for t in model.graph.initializer:
            meta = {e.key: e.value for e in t.external_data}
            assert meta["location"] == WEIGHTS_FILE, (f, t.name)
            assert int(meta["offset"]) + int(meta["length"]) <= weights_size
        assert (out / f).stat().st_size < weights_size  # no graph carries its own weights
    assert sorted(p.name for p in out.iterdir()) == sorted(files | {WEIGHTS_FILE, "manifest.json"})


def test_sparse_buckets_never_run_fewer_layers(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    out = tmp_path / "sparse"
    export(ExportConfig(lossless_policy="default", model=str(ckpt), out=out, budgets=(2, 4)), progress=False)
    engine = Engine.load(out)
    assert engine.manifest.buckets == (2, 4, 6)
    res = engine.generate(PROMPTS, GenerateOptions(max_new_tokens=20, speedup=3.0))
    p = len(PROMPTS[0])  # row 0's own schedule
    plan = make_plan(Schedule.for_speedup(6, 3.0), p, p + 20)
    scheduled = [s.scheduled for s in plan.steps]
    assert all(run >= want for run, want in zip(res[0].budgets[1:], scheduled, strict=True))
    assert set(res[0].budgets[1:]) <= {2, 4, 6}
    assert res[0].budgets[1:] != scheduled  # rounding really happened


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    _, ckpt = tiny_checkpoint
    import skipdecode.export.exporter as exporter

    def broken(directory, model):
        raise EngineError("parity check failed (injected)")

    monkeypatch.setattr(exporter, "check_parity", broken)
    with pytest.raises(EngineError, match="injected"):
        export(ExportConfig(lossless_policy="default", model=str(ckpt), out=tmp_path / "e"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_parity_check_can_fail(tiny_checkpoint, tmp_path):
    """Negative control: an engine whose weights differ from the reference model fails parity."""
    from skipdecode.export.parity import ParityError, check_parity
    style, ckpt = tiny_checkpoint
    out = tmp_path / "e"
    export(ExportConfig(lossless_policy="default", model=str(ckpt), out=out, speedups=(2.0,)), progress=False)
    other = build_random_opt(style, seed=1, init_std=0.15)
    with pytest.raises(ParityError, match="prefill.logits"):
        check_parity(out, other)


def copy_engine(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("breakage, message", [
    (lambda d: shutil.rmtree(d), "does not exist"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "is corrupted"),
    (lambda d: (d / WEIGHTS_FILE).unlink(), "shared weights file"),
    (lambda d: (d / WEIGHTS_FILE).write_bytes(b"short"), "has 5 bytes"),
    (lambda d: (d / "decode_b006.onnx").unlink(), "decode_b006.onnx (decode_b006) is missing"),
    (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99')),
     "format_version=99"),
])
def test_bad_engine_directories(engine_dir, tmp_path, breakage, message):
    d = copy_engine(engine_dir[2], tmp_path / "e")
    breakage(d)
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Engine.load(d)


@pytest.mark.parametrize("prompts, opts, message", [
    ([[2, 3]] * 5, GenerateOptions(max_new_tokens=4), "batch size=5 is above the maximum 4"),
    ([[2, 3]], GenerateOptions(max_new_tokens=200), "is above the model's limit of 128"),
    ([[2, 3], []], GenerateOptions(max_new_tokens=4), "prompt 1 is empty"),
    ([], GenerateOptions(max_new_tokens=4), "no prompts"),
    ([[2, 3]], GenerateOptions(max_new_tokens=4, warmup_layers=2), "warmup_layers=2 differs from the 1"),
])
def test_bad_requests(engine_dir, prompts, opts, message):
    with pytest.raises(InputError, match=message):
        Engine.load(engine_dir[2]).generate(prompts, opts)


def test_invalid_sampling_values():
    with pytest.raises(InputError, match="top_p=0"):
        SamplingParams(temperature=1.0, top_p=0.0)


def test_unavailable_provider_is_an_error(engine_dir):
    from skipdecode.runtime.errors import BackendError
    with pytest.raises(BackendError, match="TensorrtExecutionProvider"):
        Engine.load(engine_dir[2], providers=["TensorrtExecutionProvider", "CPUExecutionProvider"])


def test_length_error_names_only_what_the_caller_gave(engine_dir):
    from skipdecode.runtime.errors import InputError
    from skipdecode.runtime.request import resolve_max_length
    with pytest.raises(InputError) as info:
        resolve_max_length(3, GenerateOptions(max_new_tokens=200), 128)
    assert "max_length" not in str(info.value) and "3 + max_new_tokens 200 = 203" in str(info.value)
    with pytest.raises(InputError, match="max_length 150 is above the model's limit of 128"):
        resolve_max_length(3, GenerateOptions(max_new_tokens=20, max_length=150), 128)
