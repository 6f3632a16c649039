"""CLI: bad input exits non-zero with a one-line message naming the value and the limit, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from skipdecode.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_json(capsys):
    rc, out, _ = run(capsys, "plan", "--layers", "24", "--speedup", "2", "--prompt-length", "8",
                     "--max-length", "40", "--json")
    assert rc == 0
    plan = json.loads(out)
    assert (plan["max_layers"], plan["min_layers"]) == (18, 6)
    budgets = [c["budget"] for c in plan["columns"]]
    assert budgets[0] == 24 and budgets[-1] == 6 and len(budgets) == 40 - 8
    assert plan["realised_speedup"] == pytest.approx(24 / (sum(budgets[1:]) / len(budgets[1:])))


def test_generate_torch_json(capsys, tiny_checkpoint):
    _, ckpt = tiny_checkpoint
    rc, out, _ = run(capsys, "generate", "--backend", "torch", "--model", str(ckpt), "--prompt-ids", "2 5 6 7",
                     "--prompt-ids", "2 9", "--max-new-tokens", "6", "--speedup", "2", "--json")
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 6 and len(r["budgets"]) == 6 for r in rows)
    assert rows[0]["budgets"][0] == 6 and rows[0]["text"] is None


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "2 " * 130, "--max-new-tokens", "4"], "is above the model's limit of 128 positions"),
    (["--prompt-ids", "2 3", "--max-new-tokens", "200"], "is above the model's limit of 128 positions"),
    (["--prompt-ids", "2 3", "--max-new-tokens", "8", "--max-length", "5"], "is above max_length 5"),
    (["--prompt-ids", "2 3", "--max-new-tokens", "0"], "max_new_tokens=0 is below the minimum 1"),
    (["--prompt-ids", "2 3", "--temperature", "-1"], "temperature=-1.0"),
    (["--prompt-ids", "2 3", "--temperature", "1", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--prompt-ids", "2 3", "--top-k", "-3"], "top_k=-3"),
    (["--prompt-ids", "2 999"], "token id 999 outside the vocabulary [0, 211)"),
    (["--prompt", "hello"], "has no tokenizer"),
    (["--prompt-ids", "2 3", "--speedup", "40"], "speedup=40.0 is above the maximum 6"),
    (["--prompt-ids", "2 3", "--max-layers", "4"], "must be given together"),
])
def test_generate_bad_input(capsys, tiny_checkpoint, argv, message):
    _, ckpt = tiny_checkpoint
    rc, _, err = run(capsys, "generate", "--backend", "torch", "--model", str(ckpt), *argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err


def test_unknown_model_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "skipdecode.cli", "generate", "--backend", "torch", "--model",
                           "not-a-model", "--prompt-ids", "1 2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'not-a-model'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import skipdecode.runtime.schedule, skipdecode.runtime.request, skipdecode.runtime.sampling\n"
            "import skipdecode.runtime, skipdecode.cli\n"
            "from skipdecode.cli import main; sys.exit(main(['plan', '--layers', '12', '--speedup', '2', "
            "'--prompt-length', '4', '--max-length', '10']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "realised layer speedup" in proc.stdout


def test_plan_with_explicit_budgets_reports_their_target(capsys):
    rc, out, _ = run(capsys, "plan", "--layers", "12", "--max-layers", "10", "--min-layers", "4", "--prompt-length",
                     "8", "--max-length", "40")
    assert rc == 0 and "target 1.71x from M and m" in out and "target 1x" not in out
    rc, out, _ = run(capsys, "plan", "--layers", "12", "--max-layers", "10", "--min-layers", "4", "--prompt-length",
                     "8", "--max-length", "40", "--json")
    assert json.loads(out)["target_speedup"] == pytest.approx(12 / 7)
    rc, out, _ = run(capsys, "plan", "--layers", "12", "--speedup", "3", "--prompt-length", "8", "--max-length", "40")
    assert "target 3x;" in out  # a --speedup schedule reports the speedup it was given


@pytest.mark.parametrize("entry", ["skipdecode", "skipdecode-serve"])
def test_ctrl_c_while_loading_is_one_line_and_exit_130(capsys, monkeypatch, entry):
    """A Ctrl-C before a command's own signal handling is set up (importing Ray, loading the engine)."""
    import skipdecode.serve_cli as serve_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_cli, "run_serve", interrupted)
    if entry == "skipdecode":
        rc = main(["serve", "--engine", "nowhere"])
    else:
        rc = serve_cli.main(["--engine", "nowhere"])
    _, err = capsys.readouterr()
    assert rc == 130 and err == "skipdecode serve: interrupted\n"
