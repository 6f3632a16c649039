"""Lossless mode with float and with quantized drafts, side by side in one warm process (no torch).

    python -m skipdecode.drafts_bench --engine engines/tiny-opt-kjv [--prompt TEXT ...] [--rounds 7]
        [--draft-tokens K]

For each prompt: batch 1, greedy, the interleaved rounds of `skipdecode demo` (skipdecode/demo.py: warm-up, then
every setting once per round in rotating order; tokens/s and speedups are medians over rounds of ratios taken
within a round) over full depth, lossless mode drafting with the engine's quantized draft graphs (its default) and
lossless mode drafting with the float buckets. Besides tokens/s: the share of drafted tokens the full model
accepted, tokens emitted per verify round (one extra untimed run per setting, counting verify calls: greedy runs
repeat exactly), and whether the tokens equal full depth's. Prints a markdown table; `--json` the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from skipdecode.demo import FULL_DEPTH, Setting, run_demo
from skipdecode.runtime.errors import InputError, SkipDecodeError
from skipdecode.runtime.request import GenerateOptions

PROMPTS = ("And God said unto Moses,", "In the beginning", "Blessed are the poor in spirit: for",
           "And it came to pass")


def rounds_per_generation(engine, prompt, opts: GenerateOptions) -> tuple[int, int, int]:
    """(verify rounds, tokens, accepted drafts) of one generation, counting the backend's verify calls."""
    backend = engine.backend
    real, calls = backend.verify_rows, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    backend.verify_rows = counting
    try:
        gen = engine.generate([prompt], opts)[0]
    finally:
        del backend.verify_rows  # the instance attribute goes; the method is the class's again
    return calls[0], len(gen.tokens), gen.accepted


def measure(engine, prompts, max_new_tokens: int, rounds: int, log, draft_tokens: int | None = None) -> list[dict]:
    if not engine.backend.draft_buckets:
        raise InputError("this engine has no quantized draft graphs: export it with this version of skipdecode "
                         "(a plain `skipdecode export` adds int8 drafts)")
    scheme = engine.manifest.drafts["scheme"]
    settings = [Setting(FULL_DEPTH),
                Setting(f"lossless, {scheme} drafts", lossless=True, draft_weights="quantized",
                        draft_tokens=draft_tokens),
                Setting("lossless, float drafts", lossless=True, draft_weights="float", draft_tokens=draft_tokens)]
    rows = []
    for text in prompts:
        prompt = engine.encode(text)
        results = run_demo(engine, prompt, settings, max_new_tokens, rounds, log)
        for s, r in zip(settings, results, strict=True):
            row = {"prompt": text, "setting": s.name, "tokens_per_s": r.tokens_per_s, "speedup": r.speedup,
                   "identical": r.tokens == results[0].tokens, "decode_s": r.decode_s}
            if s.lossless:
                opts = s.options(max_new_tokens, engine.eos_token_id)
                n_rounds, _, accepted = rounds_per_generation(engine, prompt, opts)
                row |= {"acceptance": r.accepted / r.drafted if r.drafted else 0.0,
                        "tokens_per_round": (accepted + n_rounds) / n_rounds if n_rounds else 0.0,
                        "rounds": n_rounds}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| prompt | setting | decode tokens/s | vs full depth | drafts accepted | tokens per round | "
           "same tokens |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['acceptance']:.0%}" if "acceptance" in r else "-"
        per = f"{r['tokens_per_round']:.2f}" if "tokens_per_round" in r else "-"
        out.append(f"| {r['prompt']} | {r['setting']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} | "
                   f"{per} | {'yes' if r['identical'] else 'NO'} |")
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    out.append("")
    out += ["| setting (median over prompts) | decode tokens/s | vs full depth | drafts accepted | tokens per round |",
            "|---|---|---|---|---|"]
    for name, rs in by_setting.items():
        acc = f"{statistics.median(r['acceptance'] for r in rs):.0%}" if "acceptance" in rs[0] else "-"
        per = f"{statistics.median(r['tokens_per_round'] for r in rs):.2f}" if "tokens_per_round" in rs[0] else "-"
        out.append(f"| {name} | {statistics.median(r['tokens_per_s'] for r in rs):.1f} | "
                   f"{statistics.median(r['speedup'] for r in rs):.2f}x | {acc} | {per} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m skipdecode.drafts_bench", description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, help="an engine with quantized drafts (a plain export)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat; default four KJV openings)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per prompt after the warm-up")
    p.add_argument("--draft-tokens", type=int, help="drafts per round (default: automatic drafting)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default SKIPDECODE_THREADS, else every core)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    try:
        threads = configure_onnxruntime(args.threads)
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        with Engine.load(args.engine) as engine:
            t0 = time.perf_counter()
            rows = measure(engine, args.prompt or PROMPTS, args.max_new_tokens, args.rounds, log, args.draft_tokens)
            log(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s, {threads} threads")
    except SkipDecodeError as exc:
        print(f"drafts_bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"engine": args.engine, "threads": threads, "rows": rows}))
    else:
        print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
