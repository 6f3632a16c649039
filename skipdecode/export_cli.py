"""Subcommands that need the export extra (torch, transformers, onnx). Parsers are built without importing
torch; handlers import it when they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skipdecode.cliargs import floats, ints


def add_export_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="trace the prefill graph and one decode graph per bucket to ONNX")
    p.add_argument("--model", required=True, help="local checkpoint dir, hub id or short name (opt-1.3b)")
    p.add_argument("--out", required=True, type=Path, help="engine directory to write (engines/NAME)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--speedups", type=floats, default=(2.0, 3.0, 5.0),
                   help="export every budget these target speedups schedule (default 2,3,5)")
    g.add_argument("--budgets", type=ints, help="explicit decode budgets (full depth is always added)")
    p.add_argument("--warmup-layers", type=int, default=1)
    p.add_argument("--max-length", type=int, help="max prompt + generated tokens (default: model max positions)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--attention", choices=("gqa", "matmul"),
                   help="decode attention: gqa (onnxruntime, in-place KV) or matmul (standard ops, TensorRT); "
                        "default: gqa where it works (head size a multiple of 8, onnxruntime backend), else matmul")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="tensorrt: also build one TensorRT plan per graph (implies --attention matmul; GPU only)")
    p.add_argument("--trt-weights", choices=("inputs", "embedded"), default="inputs",
                   help="TensorRT weights: graph inputs bound to one device copy (default) or a copy per plan")
    p.add_argument("--trt-timing-cache", type=Path, help="TensorRT timing cache file to start from and update")
    p.add_argument("--trt-opt-batch", type=int, help="batch TensorRT tunes kernels for (default max batch)")
    p.add_argument("--quantize", metavar="SCHEME",
                   help="weight-only quantization: int8 (MatMulNBits, int8 dot products; about 3x faster steps on "
                        "CPU, weights 3.7x smaller), int4, or a full scheme such as int8-b64 (export/quantize.py)")
    p.add_argument("--drafts", default="auto", metavar="SCHEME",
                   help="lossless mode's quantized drafts: int8 copies of the draft buckets' graphs, which draft while "
                        "the float graphs verify (the output is unchanged; the weights file grows by the int8 copy "
                        "of the layers the deepest draft bucket runs, +16%% on the embedded model). auto (default): "
                        "int8 where the engine can carry them (float32, onnxruntime, no --quantize); none; or a "
                        "scheme such as int4 (docs/lossless.md)")
    p.add_argument("--kernel-candidates", default="auto", metavar="FORMS",
                   help="quantized engines: other kernel forms written beside the exported graphs, which the runtime "
                        "measures and chooses between per machine. auto (default): dyn8 for int8 engines (a second "
                        "7-bit weight set, about +1 byte per weight on disk, fastest at batch 8 on CPUs without "
                        "VNNI); none; or a list of a1,dyn8 (docs/quantization.md)")
    p.add_argument("--lossless-policy", default="measure", metavar="POLICY",
                   help="how --lossless drafts when a request asks for nothing in particular. measure (default): "
                        "time candidate policies on the exported model (a few seconds to a minute) and record the "
                        "fastest, or none where drafting does not pay; default: the runtime's fixed policy (4 tokens "
                        "from the 3x bucket, a round ending at a draft token below 0.6); or TOKENS:SPEEDUP[:STOP], "
                        "e.g. 4:3 (docs/lossless.md)")
    p.add_argument("--force", action="store_true", help="replace an existing engine directory")
    p.add_argument("--no-progress", action="store_true")


def cmd_export(args) -> int:
    from skipdecode.export.exporter import ExportConfig, export
    trt = None
    if args.backend == "tensorrt":
        from skipdecode.export.tensorrt_build import TrtBuildConfig
        trt = TrtBuildConfig(weights=args.trt_weights, opt_batch=args.trt_opt_batch,
                             timing_cache=args.trt_timing_cache)
    cfg = ExportConfig(model=args.model, out=args.out, speedups=args.speedups, budgets=args.budgets,
                       warmup_layers=args.warmup_layers, max_length=args.max_length, max_batch=args.max_batch,
                       dtype=args.dtype, attention=args.attention, backend=args.backend, trt=trt, force=args.force,
                       quantize=args.quantize, kernel_candidates=args.kernel_candidates, drafts=args.drafts,
                       lossless_policy=args.lossless_policy)
    man = export(cfg, progress=not args.no_progress)
    print_summary(args.out, man)
    return 0


def print_summary(out: Path, man) -> None:
    mib = 1 / 2**20
    print(f"engine {out}: {len(man.graphs)} graphs, buckets {list(man.buckets)}, dtype {man.dtype}, "
          f"attention {man.attention} ({man.attention_reason}), "
          f"max batch {man.max_batch}, max length {man.max_length}")
    print(f"  {man.weights_file}: {man.weights_size * mib:.1f} MiB shared by every graph")
    if man.quantization:
        q = man.quantization
        print(f"  quantized: {q['scheme']} ({q['op']}, {q['bits']} bits, {len(q['tensors'])} weights, LM head "
              f"{'included' if q.get('lm_head') else 'in float'})")
    if man.drafts:
        q = man.drafts["quantization"]
        print(f"  lossless drafts: {man.drafts['scheme']} copies of buckets {list(man.draft_buckets)} "
              f"({len(q['tensors'])} weights, {_draft_bytes(man) * mib:.1f} MiB); the float verify graphs check them")
    for g in man.graphs:
        size = (out / g.file).stat().st_size
        print(f"  {g.file:<22} {g.kind:<8} budget {g.budget:>3}  {len(g.weights):>4} weights  "
              f"{size * mib * 1024:.0f} KiB")
    print("  parity vs PyTorch reference (max abs diff / limit): "
          + ", ".join(f"{k} {v['max_abs_diff']:.2g}/{v['limit']:.2g}" for k, v in man.parity.items()),
          file=sys.stderr)
    drafts = {k: v for k, v in man.parity.items() if k.startswith("draft.")}  # quantized, within a rounding bound
    worst = max((v for k, v in man.parity.items() if k not in drafts), key=lambda v: v["max_abs_diff"])
    line = f"  parity ok: worst difference {worst['max_abs_diff']:.3g}"
    if drafts:
        d = max(drafts.values(), key=lambda v: v["max_abs_diff"])
        line += (f"; {man.drafts['scheme'].split('-')[0]} drafts {d['max_abs_diff']:.3g} (limit {d['limit']:.3g}: "
                 "their activation rounding)")
    print(line)


def _draft_bytes(man) -> int:
    """Bytes of the weights only the draft graphs read (their quantized copies)."""
    others = {w for g in man.graphs if g.kind != "draft" for w in g.weights}
    mine = {w for g in man.graphs if g.kind == "draft" for w in g.weights} - others
    return sum(man.weights[w].nbytes for w in mine)


EXPORT_COMMANDS: dict = {"export": cmd_export}
