"""`skipdecode` command line: a thin shell over typed functions. Errors print one line and exit 2.

torch is imported only by the subcommands that need it (torch backend, export), so `plan` and the onnxruntime
backend work in a runtime-only install.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from skipdecode.cliargs import ints
from skipdecode.runtime.errors import InputError, SkipDecodeError


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule (default: full depth)")
    g.add_argument("--speedup", type=float,
                   help="layer-count target S: budgets decay from max to min with mean L/S layers per token. The "
                        "end-to-end speedup is lower, because embedding, LM head, prefill and sampling do not "
                        "shrink (opt-125m: 3x gives ~2x, opt-1.3b ~2.6x; `skipdecode bench` measures both)")
    g.add_argument("--max-layers", type=int, help="explicit max budget M (overrides --speedup)")
    g.add_argument("--min-layers", type=int, help="explicit min budget m")
    g.add_argument("--warmup-layers", type=int,
                   help="layers [0, w) always run (default: the engine's export setting, else 1)")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], type=ints,
                   help='prompt token ids, e.g. "2 100 200" (repeat for a batch)')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, help="schedule length T (default prompt + max new tokens)")
    add_schedule_args(p)
    g = p.add_argument_group("lossless mode (full-depth output, SkipDecode graphs as drafts)")
    g.add_argument("--lossless", action="store_true",
                   help="self-speculative decoding: a shallow bucket drafts tokens, one full-depth pass checks them; "
                        "greedy output is token-identical to full depth, sampled output has its distribution")
    g.add_argument("--draft-speedup", type=float,
                   help="draft depth: the smallest exported bucket with >= layers / this (default 3)")
    g.add_argument("--draft-tokens", type=int, help="tokens drafted per round, 1..15 (default 4)")
    g.add_argument("--draft-weights", choices=("quantized", "float"),
                   help="draft with the engine's int8 draft graphs or its float buckets (default: quantized for "
                        "greedy requests where the engine has them, else float); the output is full depth's either way")
    g = p.add_argument_group("sampling (default greedy)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop-token-ids", type=ints, default=[], help="extra ids that end a sequence")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    p.add_argument("--json", action="store_true", help="one JSON object per sequence")


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the content-hash check of the engine's files at load (faster; corruption goes unnoticed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipdecode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the budget and layer set of every column")
    p.add_argument("--layers", type=int, required=True, help="decoder layers L")
    p.add_argument("--prompt-length", type=int, required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--buckets", type=ints, help="exported budgets (default: every budget)")
    add_schedule_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="generate with SkipDecode")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "cuda", "tensorrt"), default="onnxruntime",
                   help="torch: the PyTorch reference; onnxruntime (CPU), cuda, tensorrt: an engine directory")
    p.add_argument("--model", help="torch backend: local dir, hub id or short name (opt-1.3b)")
    p.add_argument("--engine", help="engine directory (every backend but torch)")
    p.add_argument("--device", type=int, default=0, help="CUDA device of the cuda/tensorrt backends")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="onnxruntime execution providers, comma-separated, in priority order")
    p.add_argument("--prepack", help="weight pre-packing: shared (default: one packed copy for all graphs), "
                                     "private (one per graph), off")
    add_kernel_arg(p)
    add_verify_arg(p)
    add_generate_args(p)

    p = sub.add_parser("memory", help="resident memory: all bucket graphs loaded vs one copy of the weights")
    p.add_argument("--engine", required=True)
    add_verify_arg(p)
    p.add_argument("--json", action="store_true")

    from skipdecode.export_cli import add_export_parsers  # parsers only: no torch import here
    from skipdecode.train_cli import add_train_parsers
    add_export_parsers(sub)
    add_train_parsers(sub)
    from skipdecode.serve_cli import add_serve_parser  # parser only: the server libraries load when it runs
    add_serve_parser(sub)
    from skipdecode.bench_cli import add_bench_parser
    add_bench_parser(sub)
    from skipdecode.demo import add_demo_parser
    add_demo_parser(sub)
    return parser


def schedule_from_args(args, num_layers: int):
    from skipdecode.runtime.schedule import schedule_for
    w = 1 if args.warmup_layers is None else args.warmup_layers
    return schedule_for(num_layers, args.speedup, args.max_layers, args.min_layers, w)


def cmd_plan(args) -> int:
    from skipdecode.runtime.schedule import make_plan
    sched = schedule_from_args(args, args.layers)
    plan = make_plan(sched, args.prompt_length, args.max_length, args.buckets)
    L = sched.num_layers
    explicit = args.max_layers is not None or args.min_layers is not None
    # explicit budgets aim at a mean of (M + m) / 2 layers per token, whatever --speedup says
    target = L / ((sched.max_budget + sched.min_budget) / 2) if explicit else (args.speedup or 1.0)
    rows = [{"column": plan.prompt_length, "source": "prefill", "budget": L, "layers": list(range(L))}]
    rows += [{"column": s.column + 1, "source": "decode", "scheduled": s.scheduled, "budget": s.bucket,
              "layers": list(s.layers)} for s in plan.steps]
    summary = {"num_layers": L, "max_layers": sched.max_budget, "min_layers": sched.min_budget,
               "warmup_layers": sched.warmup, "prompt_length": plan.prompt_length, "max_length": plan.max_length,
               "target_speedup": target, "mean_layers": plan.mean_layers,
               "realised_speedup": plan.realised_speedup, "columns": rows}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"L={L} M={sched.max_budget} m={sched.min_budget} w={sched.warmup} "
          f"p={plan.prompt_length} T={plan.max_length}")
    for r in rows:
        layers = r["layers"]
        print(f"  column {r['column']:>5}  {r['source']:<7} budget {r['budget']:>3}  layers "
              f"{_ranges(layers)}")
    print(f"mean layers per decode step {plan.mean_layers:.2f}  realised layer speedup {plan.realised_speedup:.3f}x "
          f"(target {target:.3g}x{' from M and m' if explicit else ''}; end-to-end time also has the parts that do "
          "not shrink)")
    return 0


def _ranges(layers: Sequence[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out) or "-"


def options_from_args(args, eos_token_id: int | None):
    from skipdecode.runtime.request import GenerateOptions
    from skipdecode.runtime.sampling import SamplingParams
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    return GenerateOptions(
        max_new_tokens=args.max_new_tokens, speedup=args.speedup, max_layers=args.max_layers,
        min_layers=args.min_layers, warmup_layers=args.warmup_layers, max_length=args.max_length,
        sampling=sampling, eos_token_id=None if args.ignore_eos else eos_token_id,
        stop_token_ids=tuple(args.stop_token_ids), lossless=getattr(args, "lossless", False),
        draft_speedup=getattr(args, "draft_speedup", None), draft_tokens=getattr(args, "draft_tokens", None),
        draft_weights=getattr(args, "draft_weights", None))


KERNEL_HELP = ("quantized engines: exported (the exported graphs), auto (the fastest kernel path on this machine "
               "among those that passed parity, measured once and cached; the default), measure (measure again), or "
               "a candidate's name (a4, a1); default $SKIPDECODE_KERNEL, else auto")


def add_kernel_arg(p) -> None:
    p.add_argument("--kernel", default=None, help=KERNEL_HELP)


def default_kernel(value: str | None) -> str:
    """The commands' kernel mode: the option, else $SKIPDECODE_KERNEL, else auto (the library's default is
    "exported": an embedding application measures only when it asks to)."""
    import os
    return value or os.environ.get("SKIPDECODE_KERNEL") or "auto"


def report_kernel(engine) -> None:
    """One line on stderr: which kernel path a quantized engine runs and why (nothing for float engines)."""
    choice = getattr(engine, "kernel_choice", None)
    if choice is not None:
        print(choice.line(), file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    if not args.prompt and not args.prompt_ids:
        raise InputError("no prompt given: pass --prompt TEXT or --prompt-ids \"1 2 3\" at least once")
    if args.backend == "torch":
        if not args.model:
            raise InputError("--backend torch needs --model (local dir, hub id or short name)")
        from skipdecode.export.torch_generator import TorchGenerator
        gen = TorchGenerator.load(args.model)
    else:
        if not args.engine:
            raise InputError(f"--backend {args.backend} needs --engine DIR (built by `skipdecode export`)")
        from skipdecode.runtime.engine import Engine
        from skipdecode.runtime.ort_sessions import configure_onnxruntime
        configure_onnxruntime()  # one pool for every bucket graph (SKIPDECODE_THREADS, else every core)
        gen = Engine.load(args.engine, providers=args.providers.split(","), prepack=args.prepack,
                          backend=args.backend, device=args.device, verify=args.verify,
                          kernel=default_kernel(args.kernel) if args.backend == "onnxruntime" else None)
        report_kernel(gen)
    prompts = [gen.encode(t) for t in args.prompt] + [list(x) for x in args.prompt_ids]
    opts = options_from_args(args, gen.eos_token_id)
    t0 = time.perf_counter()
    results = gen.generate(prompts, opts)
    elapsed = time.perf_counter() - t0
    for prompt, r in zip(prompts, results, strict=True):
        lossless = {"drafted": r.drafted, "accepted": r.accepted,
                    "acceptance_rate": r.accepted / r.drafted if r.drafted else None} if opts.lossless else None
        if args.json:
            print(json.dumps({"prompt_tokens": prompt, "tokens": r.tokens, "text": r.text,
                              "budgets": r.budgets, "finish_reason": r.finish_reason, "lossless": lossless}))
        else:
            print(r.text if r.text is not None else " ".join(map(str, r.tokens)))
            extra = (f", lossless: {r.accepted}/{r.drafted} drafted tokens accepted" if lossless else "")
            print(f"  [{len(r.tokens)} tokens, mean layers {sum(r.budgets) / len(r.budgets):.2f}, "
                  f"{r.finish_reason}{extra}]", file=sys.stderr)
    n = sum(len(r.tokens) for r in results)
    print(f"{n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tokens/s, batch {len(prompts)})", file=sys.stderr)
    return 0


def cmd_memory(args) -> int:
    from skipdecode.runtime.memory import measure_memory
    m = measure_memory(args.engine, verify=args.verify)
    if args.json:
        print(json.dumps(m))
        return 0
    mib = 2**20
    print(f"{m['graphs']} graphs loaded: {m['all_buckets_bytes'] / mib:.0f} MiB resident; weights file "
          f"{m['weights_file_bytes'] / mib:.0f} MiB ({m['all_buckets_bytes'] / m['weights_file_bytes']:.2f}x); "
          f"one plain onnxruntime session of the full-depth graph: {m['one_copy_bytes'] / mib:.0f} MiB "
          f"({m['ratio']:.2f}x)")
    return 0


COMMANDS = {"plan": cmd_plan, "generate": cmd_generate, "memory": cmd_memory}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skipdecode.bench_cli import BENCH_COMMANDS
    from skipdecode.demo import cmd_demo
    from skipdecode.export_cli import EXPORT_COMMANDS
    from skipdecode.serve_cli import run_serve
    from skipdecode.train_cli import TRAIN_COMMANDS
    handler = {**COMMANDS, **EXPORT_COMMANDS, **TRAIN_COMMANDS, **BENCH_COMMANDS, "serve": run_serve,
               "demo": cmd_demo}[args.command]
    try:
        return handler(args)
    except SkipDecodeError as exc:
        print(f"skipdecode {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling (loading, importing)
        print(f"skipdecode {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
