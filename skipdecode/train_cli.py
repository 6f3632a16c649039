"""Training-side subcommands: `corpus`, `train-tokenizer`, `finetune`, `eval`.

Parsers import neither torch nor transformers; handlers import them when they run. Bad input raises
`SkipDecodeError` subclasses, which the `skipdecode` entry point prints as one line (exit status 2).
Standalone use (before or without the main CLI): `python -m skipdecode.train_cli finetune ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from skipdecode.cliargs import floats as _floats
from skipdecode.runtime.errors import InputError, SkipDecodeError

TUNE_SPEEDUPS = "2,3,5"  # drawn per batch; full depth is trained on the prompt positions (training/finetune.py)
EVAL_SPEEDUPS = "1,2,3,5"


def _int_pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers LO,HI, got {text!r}") from exc
    return lo, hi


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="write the offline KJV corpus (train / held-out split)")
    p.add_argument("--out", required=True, help="directory for kjv-train.txt and kjv-heldout.txt")
    p.add_argument("--sample", help="also write a small held-out sample file here (~80 KB)")

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with OPT's special ids")
    p.add_argument("--data", nargs="+", required=True, help="text (.txt) or JSONL (.jsonl, field 'text') files")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192)

    p = sub.add_parser("finetune", help="train an OPT model with the SkipDecode layer sets (teacher forcing)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="checkpoint to fine-tune: local dir, hub id or short name")
    start.add_argument("--config", help="JSON of OPTConfig fields: pretrain from scratch (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--data", nargs="+", required=True,
                   help="text (.txt), JSONL of {'text'} (packed into chunks) or task JSONL of {'prompt', "
                        "'completion'} (loss on completions; the schedule's prompt length is the prompt's)")
    p.add_argument("--heldout", nargs="*", default=[], help="held-out files: full-depth loss after training")
    p.add_argument("--out", required=True, help="output dir: checkpoints/ while training, HF model at the end")
    p.add_argument("--speedups", type=_floats, default=_floats(TUNE_SPEEDUPS),
                   help=f"target speedups, one drawn per batch (default {TUNE_SPEEDUPS}; 1 = full depth)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch (rows per optimizer step) whatever the number of processes")
    p.add_argument("--micro-batch-size", type=int,
                   help="rows per forward on one process (default: all of its rows); gradient accumulation "
                        "makes up the rest of the global batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk = T of the training schedule")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=50, help="linear LR warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--prompt-range", type=_int_pair, default=(8, 64), help="prompt length p ~ U[LO,HI]")
    p.add_argument("--warmup-layers", type=int, default=1)
    p.add_argument("--loss-on", choices=("all", "generated"), default="all")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (one GPU per torchrun process), else CPU")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on GPUs that support it (fp32 master weights), fp32 elsewhere")
    p.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="under torchrun: ddp (replicas) or fsdp (FSDP2 sharding of weights, gradients, AdamW "
                        "states); auto = ddp")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass (less memory, ~30%% more compute)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the self-distillation term: KL from the same model at full depth to the "
                        "schedule's output on skipped columns (0 = off)")
    p.add_argument("--save-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")

    p = sub.add_parser("make-task", help="a verse -> next verse task JSONL ({prompt, completion}) from text files")
    p.add_argument("--data", nargs="+", required=True, help="text files with one verse per line (e.g. the corpus)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--limit", type=int, help="keep the first N records")
    p.add_argument("--max-chars", type=int, default=160, help="leave out pairs with a longer verse")

    p = sub.add_parser("eval-engine", help="teacher-forced perplexity through exported engines (e.g. fp32 vs int8)")
    p.add_argument("--engine", action="append", required=True,
                   help="engine directory (repeatable; the change is reported against the first)")
    p.add_argument("--data", nargs="+", required=True, help="held-out text files")
    p.add_argument("--speedups", type=_floats, default=_floats(EVAL_SPEEDUPS))
    p.add_argument("--chunks", type=int, default=96)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", help="JSON file for the rows")
    p.add_argument("--every-kernel", action="store_true",
                   help="quantized engines: one row set per kernel form that passed parity (e.g. int8's a4 and dyn8)")

    p = sub.add_parser("eval", help="quality report: perplexity, agreement, ROUGE-L vs speedup")
    p.add_argument("--model", required=True, help="model directory (e.g. the skip-tuned one)")
    p.add_argument("--base", help="untuned model directory for the ablation")
    p.add_argument("--engine", help="engine dir exported from --model: its continuations come from onnxruntime")
    p.add_argument("--data", nargs="+", help="held-out text files (default: heldout.txt next to --model)")
    p.add_argument("--speedups", type=_floats, default=_floats(EVAL_SPEEDUPS),
                   help=f"target speedups to evaluate (default {EVAL_SPEEDUPS}; full depth is always included)")
    p.add_argument("--max-layers", type=int, action="append", default=[], help="explicit budget M (repeatable)")
    p.add_argument("--min-layers", type=int, action="append", default=[], help="explicit budget m, paired")
    p.add_argument("--json", required=True, help="JSON file for the rows")
    p.add_argument("--out-dir", help="also write report.md and quality.png here")
    p.add_argument("--chunks", type=int, default=96, help="held-out chunks for teacher-forced metrics")
    p.add_argument("--gen-prompts", type=int, default=16, help="prompts for greedy continuations")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="prompt + continuation = T of the schedule")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", nargs="+",
                   help="task JSONL ({prompt, completion}): generate completions through --engine (and --base-engine "
                        "for --base) at each speedup and lossless, score ROUGE-L and completion perplexity")
    p.add_argument("--base-engine", help="engine exported from --base (task evaluation)")
    p.add_argument("--records", type=int, default=64, help="task records to evaluate (the first N)")
    p.add_argument("--no-lossless", action="store_true", help="task evaluation without the lossless row")


def cmd_make_task(args) -> int:
    from skipdecode.training.corpus import read_documents
    from skipdecode.training.task_eval import verse_task, write_task
    rows = verse_task(read_documents(args.data), args.limit, args.max_chars)
    if not rows:
        raise InputError(f"no verse pairs in {', '.join(args.data)} (one verse per line, blank lines between "
                         "documents)")
    print(f"wrote {write_task(rows, args.out)} ({len(rows)} records)")
    return 0


def cmd_task_eval(args) -> int:
    from skipdecode.training.task_eval import task_report
    if args.engine is None:
        raise InputError("--task evaluates through an exported engine: pass --engine DIR (skipdecode export "
                         "--model MODEL)")
    if (args.base is None) != (args.base_engine is None):
        raise InputError("--base and --base-engine come together for the task evaluation of the control")
    runs = [("tuned", args.model, args.engine)] + ([("control", args.base, args.base_engine)] if args.base else [])
    rows = task_report(runs, args.task, args.json, args.out_dir, args.records, [s for s in args.speedups if s != 1],
                       args.seq_len, not args.no_lossless, args.threads)
    for r in rows:
        print(f"{r['model']:>16} {r['role']:>8} {r['schedule']:>9}  rougeL {r['rouge_l']:.3f}  ppl "
              f"{r['perplexity']:8.3f} ({100 * r['ppl_vs_1x']:+.1f}%)  layers {r['mean_layers']:5.2f}")
    return 0


def cmd_corpus(args) -> int:
    from skipdecode.training.corpus import read_documents, write_kjv_corpus, write_sample
    files = write_kjv_corpus(args.out)
    print(f"wrote {files.train} ({files.train_docs} chapters) and {files.heldout} ({files.heldout_docs} chapters)")
    if args.sample:
        print(f"wrote {write_sample(read_documents([files.heldout]), args.sample)}")
    return 0


def cmd_train_tokenizer(args) -> int:
    from skipdecode.training.corpus import read_documents
    from skipdecode.training.tokenizer_train import train_tokenizer_file
    out = train_tokenizer_file(read_documents(args.data), args.out, args.vocab_size)
    print(f"wrote {out}")
    return 0


def cmd_finetune(args) -> int:
    from skipdecode.training.finetune import FinetuneJob, TrainConfig, run_job
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, speedups=args.speedups, prompt_range=args.prompt_range,
        warmup_layers=args.warmup_layers, loss_on=args.loss_on, seed=args.seed,
        checkpoint_every=args.checkpoint_every, threads=args.threads, micro_batch_size=args.micro_batch_size,
        device=args.device, precision=args.precision, strategy=args.strategy,
        grad_checkpointing=args.grad_checkpointing, distill=args.distill)
    job = FinetuneJob(out=Path(args.out), data=tuple(args.data), train=cfg, model=args.model, config=args.config,
                      tokenizer=args.tokenizer, heldout=tuple(args.heldout), save_dtype=args.save_dtype)
    summary = run_job(job, resume=args.resume)
    if summary:  # rank 0 (the only process of a plain run)
        keys = ("steps", "wall_time_s", "final_train_loss", "heldout_loss", "heldout_perplexity", "processes",
                "strategy", "peak_memory_mb_rank0")
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def _budgets(args) -> list[tuple[int, int]]:
    if len(args.max_layers) != len(args.min_layers):
        raise InputError(f"--max-layers given {len(args.max_layers)} time(s) but --min-layers "
                         f"{len(args.min_layers)}: they come in pairs")
    return list(zip(args.max_layers, args.min_layers, strict=True))


def default_heldout(model_dir: str) -> list[str]:
    for d in (Path(model_dir), Path(model_dir).parent):
        if (d / "heldout.txt").is_file():
            return [str(d / "heldout.txt")]
    raise InputError(f"no heldout.txt in {model_dir} or its parent: pass --data FILE")


def cmd_eval(args) -> int:
    if args.task:
        return cmd_task_eval(args)
    from skipdecode.training.quality import EvalConfig, run_report
    cfg = EvalConfig(speedups=args.speedups, budgets=tuple(_budgets(args)), chunks=args.chunks,
                     gen_prompts=args.gen_prompts, prompt_length=args.prompt_length, seq_len=args.seq_len,
                     seed=args.seed, threads=args.threads)
    rows = run_report(args.model, args.base, args.data or default_heldout(args.model), cfg, args.json,
                      args.out_dir, engine_dir=args.engine)
    for r in rows:
        print(f"{r['model']:>12} {r['label']:>8}  ppl {r['perplexity']:8.3f}  agree {r['agreement']:.3f}  "
              f"layers {r['mean_layers']:5.2f}  rougeL(full) {r['rouge_l_full']:.3f}")
    return 0


def cmd_eval_engine(args) -> int:
    from skipdecode.runtime.ort_sessions import configure_onnxruntime
    from skipdecode.training.engine_eval import engine_report, write_json
    from skipdecode.training.quality import EvalConfig
    configure_onnxruntime()
    speedups = sorted({1.0, *args.speedups})
    cfg = EvalConfig(chunks=args.chunks, prompt_length=args.prompt_length, seq_len=args.seq_len)
    rows = engine_report(args.engine, args.data, speedups, cfg, every_kernel=args.every_kernel)
    for r in rows:
        label = r["weights"] + (f" ({r['kernel']})" if r["kernel"] else "")
        print(f"{label:>20} {r['speedup']:>4g}x  ppl {r['perplexity']:8.3f}  "
              f"vs first engine {r['vs_first_engine']:+.2%}")
    if args.json:
        write_json(rows, args.json)
    return 0


TRAIN_COMMANDS = {"corpus": cmd_corpus, "train-tokenizer": cmd_train_tokenizer, "finetune": cmd_finetune,
                  "make-task": cmd_make_task, "eval": cmd_eval, "eval-engine": cmd_eval_engine}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipdecode.train_cli", description=__doc__.splitlines()[0])
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return TRAIN_COMMANDS[args.command](args)
    except SkipDecodeError as exc:
        print(f"skipdecode {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
