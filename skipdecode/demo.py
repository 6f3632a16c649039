"""`skipdecode demo`: what SkipDecode does, shown in one warm process.

The engine is loaded once and warmed up (one untimed generation per setting); then every round generates the same
prompt at full depth, at each SkipDecode speedup and (unless `--no-lossless`) in lossless mode, in an order that
rotates from round to round, so drift on a shared machine hits every setting alike. The table gives, per setting,
the layers run per decoded token next to the schedule's layer-count target, the median decode tokens/s, and the
speedup over full depth: the median over rounds of the ratio within a round, so both sides of a ratio come from the
same round of the same process. The generated texts follow the table.

Timing follows `skipdecode bench`: decode time runs from the first token (which the prefill produces) to the last, so
the prefill, which skipping does not shrink, is left out of tokens/s and speedup and reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from skipdecode.cliargs import floats, ints
from skipdecode.runtime.errors import InputError, check_int
from skipdecode.runtime.generator import timed_generate
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.speculative import DEFAULT_DRAFT_TOKENS

FULL_DEPTH = "full depth"
LOSSLESS = "lossless"
MAX_ROUNDS = 1000


@dataclass(frozen=True)
class Setting:
    """One way of generating: full depth (speedup None), SkipDecode at a layer-count target, or lossless mode."""

    name: str
    speedup: float | None = None
    lossless: bool = False
    draft_weights: str | None = None  # lossless mode: "float" or "quantized" drafts; None: the default
    draft_tokens: int | None = None  # lossless mode: drafts per round; None: automatic

    def options(self, max_new_tokens: int, eos_token_id: int | None) -> GenerateOptions:
        return GenerateOptions(max_new_tokens=max_new_tokens, speedup=self.speedup, eos_token_id=eos_token_id,
                               lossless=self.lossless, draft_weights=self.draft_weights,
                               draft_tokens=self.draft_tokens)


@dataclass
class SettingResult:
    """What one setting did over the timed rounds (`decode_s[i]`, `decode_tokens[i]`: round i)."""

    name: str
    speedup_target: float | None  # the --speedup asked for; None: full depth and lossless mode
    target_layers: float  # L / speedup target (L for full depth and lossless mode)
    mean_layers: float  # layers the schedule ran per decoded token (the prefill's first token excluded)
    decode_s: list[float] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0  # median over rounds of decode_tokens / decode_s
    speedup: float = 1.0  # median over rounds of (full depth's decode time per token / this one's), same round
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    drafted: int = 0  # lossless mode, over all timed rounds
    accepted: int = 0


def default_settings(speedups: Sequence[float], lossless: bool, draft_scheme: str | None = None,
                     draft_tokens: int | None = None) -> list[Setting]:
    """Full depth, each SkipDecode speedup, lossless mode; on an engine with quantized drafts (`draft_scheme`, e.g.
    "int8-b64") lossless mode twice: as it runs by default (quantized drafts) and drafting with the float buckets.
    `draft_tokens`: lossless rows draft that many per round (None: the engine's automatic policy)."""
    settings = [Setting(FULL_DEPTH)] + [Setting(f"SkipDecode {s:g}x", speedup=s) for s in speedups]
    if not lossless:
        return settings
    if draft_scheme:
        return settings + [Setting(f"{LOSSLESS} ({draft_scheme.split('-')[0]} drafts)", lossless=True,
                                   draft_tokens=draft_tokens),
                           Setting(f"{LOSSLESS} (float drafts)", lossless=True, draft_weights="float",
                                   draft_tokens=draft_tokens)]
    return settings + [Setting(LOSSLESS, lossless=True, draft_tokens=draft_tokens)]


def _timed(engine, prompt: Sequence[int], opts: GenerateOptions) -> tuple[float, float, list[int], int, int]:
    """(prefill seconds, decode seconds, tokens, drafted, accepted) of one generation of `prompt`."""
    timed = timed_generate(engine, [prompt], opts)
    result = timed.results[0]
    return timed.prefill_s, timed.decode_s, result.tokens, result.drafted, result.accepted


def run_demo(engine, prompt: Sequence[int], settings: Sequence[Setting], max_new_tokens: int = 64, rounds: int = 5,
             log: Callable[[str], None] = lambda _: None) -> list[SettingResult]:
    """Warm up, then `rounds` interleaved rounds of every setting on `engine` (batch 1, greedy). The first setting is
    the reference of the speedups: put full depth first."""
    check_int("rounds", rounds, lo=1, hi=MAX_ROUNDS)
    check_int("max_new_tokens", max_new_tokens, lo=2)  # decode time needs a token after the prefill's
    if not settings or settings[0].speedup is not None or settings[0].lossless:
        raise InputError("the first demo setting must be full depth: the speedups are measured against it")
    L = engine.backend.num_layers
    opts = [s.options(max_new_tokens, engine.eos_token_id) for s in settings]
    results = []
    for s, o in zip(settings, opts, strict=True):
        # budgets[0] is the prefill's token (full depth); the schedule's mean is over the decoded ones
        budgets = engine.generate([prompt], o)[0].budgets  # also the warm-up of this setting's graphs
        results.append(SettingResult(
            name=s.name, speedup_target=s.speedup, target_layers=L / s.speedup if s.speedup else float(L),
            mean_layers=statistics.fmean(budgets[1:]) if len(budgets) > 1 else float(L)))
    log(f"warmed up; {rounds} timed rounds of {len(settings)} settings")
    for i in range(rounds):
        order = [(i + k) % len(settings) for k in range(len(settings))]  # rotate who goes first
        for k in order:
            prefill, decode, tokens, drafted, accepted = _timed(engine, prompt, opts[k])
            r = results[k]
            if len(tokens) < 2:
                raise InputError(f"{r.name}: generation ended after {len(tokens)} token (end of text), so there is "
                                 "no decode step to time; try another prompt")
            r.prefill_s.append(prefill)
            r.decode_s.append(decode)
            r.decode_tokens.append(len(tokens) - 1)
            r.tokens, r.drafted, r.accepted = tokens, r.drafted + drafted, r.accepted + accepted
    full = results[0]
    for r in results:
        r.tokens_per_s = statistics.median(n / s for n, s in zip(r.decode_tokens, r.decode_s, strict=True))
        r.speedup = statistics.median(
            (fs / fn) / (s / n) for fs, fn, s, n in zip(full.decode_s, full.decode_tokens, r.decode_s,
                                                        r.decode_tokens, strict=True))
        if engine.codec is not None:
            r.text = engine.codec.decode(r.tokens)
    return results


def format_table(results: Sequence[SettingResult], num_layers: int) -> list[str]:
    """The demo's table: one line per setting."""
    head = ("setting", "layers per token (target)", "decode tokens/s (median)", "speedup vs full depth")
    rows = []
    for r in results:
        if r.speedup_target is not None:
            layers = f"{r.mean_layers:.2f} ({r.target_layers:.2f} = {num_layers}/{r.speedup_target:g})"
        elif r.drafted:
            layers = f"{r.mean_layers:.2f} ({num_layers}; {r.accepted / r.drafted:.0%} of drafts accepted)"
        else:
            layers = f"{r.mean_layers:.2f} ({num_layers})"
        rows.append((r.name, layers, f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x"))
    widths = [max(len(x[c]) for x in (head, *rows)) for c in range(len(head))]
    return ["  ".join(x[c].ljust(widths[c]) for c in range(len(head))).rstrip() for x in (head, *rows)]


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="one warm process: full depth vs SkipDecode 2x/3x vs lossless, a speed table "
                                     "and the texts")
    p.add_argument("--engine", required=True, help="engine directory (built by `skipdecode export`)")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids", type=ints,
                   help='prompt token ids, e.g. "2 100 200" (models without a tokenizer)')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--speedups", type=floats, default=(2.0, 3.0), help="SkipDecode layer-count targets (default 2,3)")
    p.add_argument("--no-lossless", dest="lossless", action="store_false", help="leave lossless mode out")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default SKIPDECODE_THREADS, else every core)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the content-hash check of the engine's files at load")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def cmd_demo(args) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise InputError("pass exactly one of --prompt TEXT or --prompt-ids \"1 2 3\"")
    from skipdecode.runtime.engine import Engine
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    threads = configure_onnxruntime(args.threads)  # one pool for every bucket graph, as `generate` and `serve`
    t0 = time.perf_counter()
    with Engine.load(args.engine, verify=args.verify) as engine:
        load_s = time.perf_counter() - t0
        prompt = engine.encode(args.prompt) if args.prompt is not None else list(args.prompt_ids)
        refusal = engine.backend.lossless_refusal  # quantized engines: lossless would not be their full depth's
        drafts = engine.manifest.drafts.get("scheme") if engine.backend.draft_buckets else None
        # an engine whose measured policy is not to draft would show lossless mode as full depth: draft the
        # runtime's default length instead, and say so
        policy = engine.backend.draft_policy
        shown = DEFAULT_DRAFT_TOKENS if policy.tokens == 0 else None
        settings = default_settings(args.speedups, args.lossless and refusal is None, drafts, shown)
        L = engine.backend.num_layers
        log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
        log(f"loaded {args.engine} in {load_s:.1f} s: {L} layers, buckets "
            f"{','.join(map(str, engine.manifest.buckets))}, {threads} threads")
        if args.lossless and refusal is None:
            log(f"lossless mode drafts {shown} tokens per round: this engine's measured policy is not to draft "
                "(it did not beat full depth where it was exported; docs/lossless.md)" if shown else
                f"lossless mode drafts as this engine's measured policy says: up to {policy.tokens} tokens from "
                f"the {policy.draft_speedup:g}x bucket" + (f", a round ending below {policy.stop_below:g}"
                                                          if policy.stop_below is not None else ""))
        if args.lossless and refusal is not None:
            log(f"lossless mode left out: {refusal}")
        results = run_demo(engine, prompt, settings, args.max_new_tokens, args.rounds, log)
    if args.json:
        print(json.dumps({"engine": str(args.engine), "num_layers": L, "threads": threads, "rounds": args.rounds,
                          "max_new_tokens": args.max_new_tokens, "prompt_tokens": prompt,
                          "settings": [asdict(r) for r in results]}))
        return 0
    print(f"batch 1, greedy, {args.max_new_tokens} new tokens; medians of {args.rounds} interleaved rounds in this "
          f"process after a warm-up")
    print()
    for line in format_table(results, L):
        print(line)
    prefill_ms = statistics.median(s for r in results for s in r.prefill_s) * 1e3
    print()
    print(f"Decode only: the prefill ({prefill_ms:.1f} ms median here) runs at full depth in every setting.\n"
          "--speedup S is a layer-count target (L/S layers per token); embedding, LM head and sampling do not\n"
          "shrink, so the measured speedup is below S on larger models (docs/benchmarks.md). Lossless mode drafts\n"
          "with a shallow bucket and checks at full depth: its output is full depth's (docs/lossless.md).")
    print()
    full = results[0]
    if args.prompt is not None:
        print(f"prompt: {args.prompt}")
    for r in results:
        shown = r.text if r.text is not None else " ".join(map(str, r.tokens))
        same = " [same tokens as full depth]" if r is not full and r.tokens == full.tokens else ""
        print(f"--- {r.name}{same}")
        print(shown.strip())
    return 0
