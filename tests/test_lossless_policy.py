"""Lossless mode's automatic drafting policy: measured at export and recorded in the manifest, or set there.

Checked here: a plain export of a float engine times candidate policies and records the fastest (or no automatic
drafting) with its measurements; `--lossless-policy TOKENS:SPEEDUP[:STOP]` and `default`; the runtime drafts as
the manifest says (tokens per round, the early stop, no drafting) while an explicit `draft_tokens` still forces its
length; every policy keeps full depth's tokens; bad policies and manifest entries are one-line errors. Negative
control: the tuner refuses an engine whose lossless output differs from its full depth.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skipdecode.export import lossless_tune  # noqa: E402
from skipdecode.export.exporter import ExportConfig, export  # noqa: E402
from skipdecode.runtime import batcher as batcher_module  # noqa: E402
from skipdecode.runtime.engine import Engine  # noqa: E402
from skipdecode.runtime.errors import EngineError, InputError  # noqa: E402
from skipdecode.runtime.manifest import MANIFEST, load_manifest  # noqa: E402
from skipdecode.runtime.request import GenerateOptions  # noqa: E402
from skipdecode.runtime.speculative import Acceptance, DraftPolicy  # noqa: E402

from skipdecode.cli import main  # noqa: E402

from .conftest import PROMPTS  # noqa: E402


class Rounds:
    """Counts verify passes and the drafts of each round (calls of shallow graphs between two verify passes)."""

    def __init__(self, backend, monkeypatch) -> None:
        self.drafts: list[int] = []
        self._pending = 0
        real_decode, real_verify = backend.decode_rows, backend.verify_rows

        def decode(slots, tokens, bucket, gates, draft=False):
            if bucket < backend.num_layers:
                self._pending += 1
            return real_decode(slots, tokens, bucket, gates, draft=draft)

        def verify(slots, tokens):
            self.drafts.append(self._pending)
            self._pending = 0
            return real_verify(slots, tokens)

        monkeypatch.setattr(backend, "decode_rows", decode)
        monkeypatch.setattr(backend, "verify_rows", verify)


def with_policy(src, dst, lossless: dict):
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST).read_text())
    raw["lossless"] = lossless
    (dst / MANIFEST).write_text(json.dumps(raw))
    return dst


def test_a_plain_export_measures_the_policy_and_records_why(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint
    out = tmp_path / "e"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--speedups", "2,3", "--max-batch", "2",
                 "--no-progress"]) == 0
    man = load_manifest(out)
    policy, measured = man.lossless, man.lossless["measured"]
    shapes = {(c["draft_tokens"], c["stop_below"]) for c in measured["candidates"]}
    assert set(lossless_tune.SHAPES) <= shapes
    assert all(c["speedup"] > 0 and 0 <= c["acceptance"] <= 1 for c in measured["candidates"])
    best = max(measured["candidates"], key=lambda c: c["speedup"])
    # the fastest candidate, or no automatic drafting where none beat full depth by the margin
    want_tokens = best["draft_tokens"] if best["speedup"] >= lossless_tune.MIN_GAIN else 0
    assert (policy["draft_tokens"], policy["draft_speedup"], policy["stop_below"]) == \
        (want_tokens, best["draft_speedup"], best["stop_below"])
    assert man.draft_policy == DraftPolicy(best["draft_speedup"], want_tokens, best["stop_below"])


def test_a_set_policy_is_recorded_and_the_runtime_drafts_as_it_says(engine_dir, tmp_path, monkeypatch):
    style, ckpt, out = engine_dir
    man = export(ExportConfig(lossless_policy="3:2", model=str(ckpt), out=tmp_path / "set", speedups=(2.0, 3.0),
                              max_batch=4), progress=False)
    assert man.draft_policy == DraftPolicy(2.0, 3, None) and man.lossless["measured"] == {"set": "--lossless-policy"}
    with Engine.load(out) as engine:
        full = [g.tokens for g in engine.generate(PROMPTS[:1], GenerateOptions(max_new_tokens=24))]
    for lossless, check in [
            # exactly 3 drafts every round (no early stop), the end of the request aside
            ({"draft_speedup": 3.0, "draft_tokens": 3, "stop_below": None},
             lambda d, g: set(d[:-2]) == {3} and g.drafted == sum(d)),
            # no automatic drafting: lossless requests decode at full depth
            ({"draft_speedup": 3.0, "draft_tokens": 0, "stop_below": None}, lambda d, g: d == [] and g.drafted == 0),
            # the early stop ends rounds (a random model's drafts are unsure)
            ({"draft_speedup": 3.0, "draft_tokens": 6, "stop_below": 0.99},
             lambda d, g: 0 < min(d) and max(d) <= 6 and sum(x < 6 for x in d) > len(d) // 2)]:
        eng = with_policy(out, tmp_path / f"p{lossless['draft_tokens']}", lossless)
        with Engine.load(eng) as engine:
            assert engine.backend.draft_policy == DraftPolicy(3.0, lossless["draft_tokens"], lossless["stop_below"])
            rounds = Rounds(engine.backend, monkeypatch)
            gen = engine.generate(PROMPTS[:1], GenerateOptions(max_new_tokens=24, lossless=True))[0]
            assert gen.tokens == full[0], (style, lossless)
            assert check(rounds.drafts, gen), (style, lossless, rounds.drafts)
            if lossless["draft_tokens"] == 0:  # an explicit length still drafts, exactly that many per round
                rounds.drafts.clear()
                gen = engine.generate(PROMPTS[:1], GenerateOptions(max_new_tokens=24, lossless=True,
                                                                   draft_tokens=2))[0]
                assert gen.tokens == full[0] and set(rounds.drafts[:-1]) == {2}


def test_bad_policies_are_one_line_errors_and_leave_nothing(tiny_checkpoint, engine_dir, tmp_path, capsys):
    _, ckpt = tiny_checkpoint
    for bad, says in [("4", "not TOKENS:SPEEDUP"), ("4:1", "draft_speedup=1.0"), ("99:3", "above the maximum 15"),
                      ("4:3:1", "stop_below=1.0")]:
        assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "x"), "--lossless-policy", bad,
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="not TOKENS:SPEEDUP"):
        ExportConfig(model=str(ckpt), out=tmp_path / "y", lossless_policy="fast")
    _, _, out = engine_dir
    for entry, says in [({"draft_speedup": 3.0, "draft_tokens": 16, "stop_below": None}, "above the maximum 15"),
                        ({"draft_speedup": "3", "draft_tokens": 4, "stop_below": None}, "must be a number"),
                        ({"draft_speedup": 3.0, "draft_tokens": 4, "stop_below": 0}, "stop_below=0.0"),
                        ({"draft_tokens": 4}, "draft_speedup is missing"),
                        ([4, 3], "must be a JSON object")]:
        bad = with_policy(out, tmp_path / f"m{len(list(tmp_path.iterdir()))}", entry)
        with pytest.raises(EngineError, match=says):
            load_manifest(bad)


def test_quantized_engines_record_no_policy(tiny_checkpoint, tmp_path):
    """They refuse lossless mode, so there is nothing to time."""
    _, ckpt = tiny_checkpoint
    man = export(ExportConfig(model=str(ckpt), out=tmp_path / "q", speedups=(2.0,), max_batch=2, quantize="int8",
                              kernel_candidates="none"), progress=False)
    assert man.lossless == {} and man.draft_policy == DraftPolicy()


def test_the_tuner_refuses_an_engine_whose_lossless_output_is_not_full_depth(engine_dir, monkeypatch):
    """Negative control: accepting every draft unchecked changes the tokens, and the tuner says so."""
    _, _, out = engine_dir

    def accept_all(drafts, probs, p, sampler):
        return Acceptance(tuple(drafts), int(np.argmax(p[len(drafts)])), True)

    monkeypatch.setattr(batcher_module, "speculative_accept", accept_all)
    with pytest.raises(EngineError, match="gave other tokens than full depth"):
        lossless_tune.tune(out)


def test_the_demo_shows_lossless_mode_drafting_on_an_engine_whose_policy_is_not_to(engine_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr("skipdecode.runtime.ort_sessions.configure_onnxruntime", lambda threads=None: threads or 1)
    _, _, out = engine_dir
    eng = with_policy(out, tmp_path / "none", {"draft_speedup": 3.0, "draft_tokens": 0, "stop_below": None})
    assert main(["demo", "--engine", str(eng), "--no-verify", "--prompt-ids", "2 17 29 41 53", "--max-new-tokens",
                 "12", "--rounds", "1", "--json"]) == 0
    captured = capsys.readouterr()
    settings = {s["name"]: s for s in json.loads(captured.out)["settings"]}
    assert settings["lossless (int8 drafts)"]["drafted"] > 0 and settings["lossless (float drafts)"]["drafted"] > 0
    assert all(s["tokens"] == settings["full depth"]["tokens"] for s in settings.values() if "lossless" in s["name"])
