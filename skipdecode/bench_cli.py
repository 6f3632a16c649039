"""`skipdecode bench`: the throughput benchmark (bench/run.py). The parser imports neither torch nor onnx; the
handler does when it runs. Options left out take the preset's value (`--quick` or the full run)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from skipdecode.cliargs import floats, ints


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="decode throughput, SkipDecode speedup vs ideal, HF generate, memory")
    p.add_argument("--quick", action="store_true",
                   help="embedded model + opt-125m, batches 1 and 8, 32 new tokens: a few minutes on 2 cores")
    p.add_argument("--models", type=_names,
                   help="comma-separated: embedded (tiny-opt-kjv), small-opt-kjv (trained models under models/), "
                        "opt-125m, opt-350m, opt-1.3b (random weights); default all (small-opt-kjv where present)")
    p.add_argument("--batches", type=ints, help="batch sizes (default 1,8,32)")
    p.add_argument("--speedups", type=floats, help="target speedups besides full depth (default 2,3,5)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per sequence (default 128)")
    p.add_argument("--prompt-lengths", type=ints, help="LO,HI: prompt lengths drawn from [LO, HI] (default 16,64)")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement; medians are reported (default 3)")
    p.add_argument("--min-time", type=float,
                   help="seconds of samples per measurement; repeats grow until reached (default 2, quick 1)")
    p.add_argument("--threads", type=int, help="onnxruntime and torch threads (default: every core)")
    p.add_argument("--backends", type=_names,
                   help="onnxruntime (default pre-packing: shared), onnxruntime-private, onnxruntime-noprepack, "
                        "onnxruntime-int8, onnxruntime-int4, onnxruntime-dyn8 (exports with that --quantize scheme; "
                        "default: onnxruntime,onnxruntime-private,onnxruntime-int8)")
    p.add_argument("--peers", type=_names,
                   help="ctranslate2-int8,ctranslate2-fp32 (default both; the peers extra installs ctranslate2)")
    p.add_argument("--no-peers", action="store_true", help="skip the CTranslate2 peers")
    p.add_argument("--lossless", type=_lossless_pairs,
                   help="lossless rows as DRAFT_SPEEDUP:DRAFT_TOKENS pairs, e.g. 3:4,5:6, or auto (the engine's "
                        "automatic policy, measured at export); 0 draft tokens = automatic drafting at that depth "
                        "(default auto,3:4)")
    p.add_argument("--no-lossless", action="store_true", help="skip the lossless-mode rows")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate baseline")
    p.add_argument("--kernel", help="quantized engines' kernel path: auto (default), measure, exported, a4, a1")
    p.add_argument("--no-memory", action="store_true", help="skip the resident-memory probes")
    p.add_argument("--cache-dir", type=Path, help="random checkpoints and engines (default engines/bench)")
    p.add_argument("--rebuild", action="store_true", help="re-create cached checkpoints and engines")
    p.add_argument("--out-dir", type=Path, default=Path("build/bench"),
                   help="bench.json, bench.md and bench.png go here (default build/bench)")
    p.add_argument("--json", type=Path, help="write the JSON here instead of OUT_DIR/bench.json")


def _lossless_pairs(text: str) -> tuple[tuple[float, int], ...]:
    try:
        pairs = tuple((0.0, 0) if item == "auto" else (float(item.split(":")[0]), int(item.split(":")[1]))
                      for item in text.split(","))
        if any(len(item.split(":")) != 2 for item in text.split(",") if item != "auto"):
            raise ValueError(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DRAFT_SPEEDUP:DRAFT_TOKENS pairs like 3:4,5:6") from exc
    return pairs


def config_from_args(args):
    from skipdecode.bench.run import config_from
    from skipdecode.runtime.errors import InputError

    if args.prompt_lengths is not None and len(args.prompt_lengths) != 2:
        raise InputError(f"--prompt-lengths takes LO,HI, got {list(args.prompt_lengths)}")
    try:
        return config_from(args.quick, models=args.models, batches=args.batches, speedups=args.speedups,
                           max_new_tokens=args.max_new_tokens, prompt_lengths=args.prompt_lengths,
                           repeats=args.repeats, min_time_s=args.min_time, threads=args.threads, backends=args.backends,
                           hf=False if args.no_hf else None, memory=False if args.no_memory else None,
                           peers=() if args.no_peers else args.peers,
                           lossless=() if args.no_lossless else args.lossless,
                           cache_dir=args.cache_dir, rebuild=args.rebuild or None, kernel=args.kernel)
    except ValueError as exc:  # the config names the bad value and its limit
        raise InputError(str(exc)) from exc


def run_bench(args) -> int:
    from skipdecode.bench.report import write_outputs
    from skipdecode.bench.run import run_bench as bench
    from skipdecode.runtime.ort_sessions import configure_onnxruntime

    cfg = config_from_args(args)
    configure_onnxruntime(cfg.threads)  # as `skipdecode generate`/`serve` run: one pool for every bucket graph
    out = bench(cfg)
    out["command"] = "skipdecode " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "skipdecode bench"
    json_path = args.json or args.out_dir / "bench.json"
    write_outputs(out, json_path, args.out_dir / "bench.md", args.out_dir / "bench.png")
    t = out["targets"]
    met = sum(c["met"] for c in t["checks"])
    print(f"bench: {len(out['results'])} rows in {out['duration_s'] / 60:.1f} min; targets met {met}/{len(t['checks'])}"
          f"; wrote {json_path}, {args.out_dir / 'bench.md'}, {args.out_dir / 'bench.png'}")
    for c in t["checks"]:
        if not c["met"]:
            where = " ".join(f"{k}={c[k]}" for k in ("model", "backend", "batch", "speedup") if k in c)
            value = "-" if c["value"] is None else f"{c['value']:.2f}"
            print(f"  not met: {c['target']} ({where}): {value} vs {c['threshold']:g}")
    return 0


BENCH_COMMANDS: dict = {"bench": run_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone use: `python -m skipdecode.bench_cli bench --quick`."""
    from skipdecode.runtime.errors import SkipDecodeError

    parser = argparse.ArgumentParser(prog="python -m skipdecode.bench_cli", description=__doc__.splitlines()[0])
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except SkipDecodeError as exc:
        print(f"skipdecode bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
