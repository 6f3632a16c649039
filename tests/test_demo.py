"""`skipdecode demo`: one warm process, interleaved rounds, a table whose speedups come from the same rounds."""

from __future__ import annotations

import json
import statistics

import pytest

from skipdecode.cli import main

PROMPT = "2 17 29 41 53"
# the tiny engine carries int8 drafts (a plain export does): lossless mode with them, and with the float buckets
NAMES = ["full depth", "SkipDecode 2x", "SkipDecode 3x", "lossless (int8 drafts)", "lossless (float drafts)"]


@pytest.fixture
def demo(capsys, monkeypatch, tiny_engine):
    # keep this test process's onnxruntime sessions on their own pools (the CLI opts the process into one shared pool)
    monkeypatch.setattr("skipdecode.runtime.ort_sessions.configure_onnxruntime", lambda threads=None: threads or 1)

    def run(*argv):
        rc = main(["demo", "--engine", str(tiny_engine), "--no-verify", *argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_demo_json_speedups_come_from_the_same_rounds(demo):
    rc, out, _ = demo("--prompt-ids", PROMPT, "--max-new-tokens", "12", "--rounds", "3", "--json")
    assert rc == 0
    report = json.loads(out)
    L = report["num_layers"]
    rows = report["settings"]
    assert [r["name"] for r in rows] == NAMES
    full = rows[0]
    for r in rows:
        assert len(r["decode_s"]) == len(r["decode_tokens"]) == len(r["prefill_s"]) == 3
        assert all(s > 0 for s in r["decode_s"]) and all(n == 11 for n in r["decode_tokens"])
        # tokens/s and the speedup are recomputed here from the per-round timings the report carries
        assert r["tokens_per_s"] == pytest.approx(statistics.median(
            n / s for n, s in zip(r["decode_tokens"], r["decode_s"], strict=True)))
        ratios = [(fs / fn) / (s / n) for fs, fn, s, n in zip(full["decode_s"], full["decode_tokens"], r["decode_s"],
                                                               r["decode_tokens"], strict=True)]
        assert r["speedup"] == pytest.approx(statistics.median(ratios))
    assert full["speedup"] == pytest.approx(1.0)
    # layer counts: full depth and lossless run every layer; SkipDecode's realised mean sits near its L/S target
    assert full["mean_layers"] == rows[3]["mean_layers"] == rows[4]["mean_layers"] == full["target_layers"] == L
    for r, s in zip(rows[1:3], (2, 3), strict=True):
        assert r["speedup_target"] == s and r["target_layers"] == pytest.approx(L / s)
        assert abs(r["mean_layers"] - L / s) <= 1
    assert rows[1]["mean_layers"] > rows[2]["mean_layers"]
    # lossless mode is exact with either drafts: greedy tokens identical to full depth, drafts counted
    for r in rows[3:]:
        assert r["tokens"] == full["tokens"] and len(full["tokens"]) == 12
        assert r["drafted"] > 0 and 0 <= r["accepted"] <= r["drafted"]


def test_demo_prints_table_and_outputs(demo):
    rc, out, err = demo("--prompt-ids", PROMPT, "--max-new-tokens", "6", "--rounds", "1", "--no-lossless")
    assert rc == 0
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("setting"))
    assert "layers per token (target)" in lines[head] and "speedup vs full depth" in lines[head]
    table = lines[head + 1:head + 4]
    assert [row.split("  ")[0] for row in table] == NAMES[:3]
    assert table[0].endswith("1.00x")
    assert "(3.00 = 6/2)" in table[1] and "(2.00 = 6/3)" in table[2]  # the 6-layer tiny engine's L/S targets
    # one output per setting, ids printed since this engine has no tokenizer
    assert [line for line in lines if line.startswith("--- ")][:1] == ["--- full depth"]
    assert sum(line.startswith("--- ") for line in lines) == 3
    assert "timed rounds" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", PROMPT, "--rounds", "0"], "rounds=0 is below the minimum 1"),
    (["--prompt-ids", PROMPT, "--max-new-tokens", "1"], "max_new_tokens=1 is below the minimum 2"),
    (["--prompt-ids", PROMPT, "--prompt", "text"], "exactly one of --prompt"),
    (["--prompt", "text"], "has no tokenizer"),
])
def test_demo_bad_input(demo, argv, message):
    rc, _, err = demo(*argv)
    assert rc == 2 and message in err and "Traceback" not in err
