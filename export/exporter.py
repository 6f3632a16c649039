"""`export`: an OPT checkpoint -> engines/<name>/ (manifest, shared weights, prefill + per-bucket decode graphs).

Everything is written into a hidden temporary sibling directory and renamed into place only after the parity
check passed, under a lock on the target (export/target.py), so an interrupted or failed export never leaves a
half-written engine directory and never loses the engine that was there. Everything that can be refused from the
config and the model's shape (attention flavour, lengths, the parity plan) is refused before tracing starts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm

from ..runtime import contract as C
from ..runtime.errors import EngineError, ScheduleError, check_int
from ..runtime.integrity import hash_files
from ..runtime.manifest import MAX_BATCH, WEIGHTS_FILE, GraphSpec, Manifest
from ..runtime.request import DEFAULT_DRAFT_SPEEDUP, draft_bucket
from ..runtime.schedule import layers_for_budget, solve_budgets
from ..runtime.speculative import DraftPolicy
from .graphs import DecodeGraph, PrefillGraph, VerifyGraph
from .models import OPTShape, load_model
from .onnx_export import attach_weights, prepacked_weights, trace, write_weights
from .parity import check_parity, plan_parity
from .quantize_export import add_quantized_drafts, dequantized_model, quantize_files, resolve_kernels, resolve_scheme
from .target import ExportTarget

DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16")}


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: Path
    speedups: tuple[float, ...] = (2.0, 3.0, 5.0)
    budgets: tuple[int, ...] | None = None  # explicit budgets replace the ones derived from `speedups`
    warmup_layers: int = 1
    max_length: int | None = None  # default: the model's max positions
    max_batch: int = 8
    dtype: str = "fp32"
    # Decode attention flavour (runtime/contract.py): "gqa" for onnxruntime (in-place KV, attention over each row's
    # own length), "matmul" for standard-ops-only consumers such as TensorRT. None: chosen by `resolve_attention`.
    attention: str | None = None
    backend: str = "onnxruntime"  # "tensorrt" also builds one TensorRT plan per graph (needs attention="matmul")
    trt: object | None = None  # export.tensorrt_build.TrtBuildConfig; None = its defaults
    force: bool = False  # replace an existing engine directory
    # weight-only quantization: "int8", "int4" or a full scheme (export/quantize_export.py); None keeps float weights
    quantize: str | None = None
    # lossless mode's quantized drafts: a quantized copy of the draft buckets' decode graphs, which draft while the
    # float verify graphs check (the output stays full depth's). "auto": int8 wherever the engine can carry them
    # (float32 weights, onnxruntime, a block size the shape allows), else none; "none"; or a scheme as for
    # `quantize` (refused where it cannot be built).
    drafts: str = "auto"
    # quantized engines: the other kernel forms written beside the exported graphs, among which the runtime chooses
    # per machine (runtime/kernels.py). "auto" (default): `dyn8` for int8 engines (a second, 7-bit weight set that
    # CPUs without VNNI run faster at batch 8); "none"; or a list of "a1" (MatMulNBits accuracy level 1: 8-24x
    # slower on an AVX2-only CPU, so never by default) and "dyn8" (docs/quantization.md)
    kernel_candidates: str = "auto"
    # lossless mode's automatic drafting policy (runtime/speculative.py `DraftPolicy`): "measure" (default) times
    # candidates on the exported float engine and records the fastest (export/lossless_tune.py); "default" records
    # none (the runtime's fixed defaults); or "TOKENS:SPEEDUP[:STOP]" records that one
    lossless_policy: str = "measure"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.attention is not None and self.attention not in C.ATTENTIONS:
            raise EngineError(f"attention={self.attention!r} is not one of {list(C.ATTENTIONS)}")
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise EngineError(f"backend={self.backend!r} is not one of ['onnxruntime', 'tensorrt']")
        if self.backend == "tensorrt" and self.attention == "gqa":
            raise EngineError("backend=tensorrt needs attention='matmul' (TensorRT runs standard ONNX ops only)")
        check_int("max_batch", self.max_batch, lo=1, hi=MAX_BATCH)
        check_int("warmup_layers", self.warmup_layers, lo=0, error=ScheduleError)
        if not isinstance(self.drafts, str) or not self.drafts:
            raise EngineError(f"drafts={self.drafts!r} must be 'auto', 'none' or a quantization scheme such as 'int8'")
        if self.lossless_policy not in ("measure", "default"):
            DraftPolicy.parse(self.lossless_policy)  # refused before any tracing


def bucket_budgets(num_layers: int, cfg: ExportConfig) -> tuple[int, ...]:
    """Every budget the schedules of `speedups` can ask for (so they run exactly), or the explicit list; the
    full depth always."""
    w = cfg.warmup_layers
    if cfg.budgets is not None:
        for b in cfg.budgets:
            check_int("budget", b, lo=max(w, 1), hi=num_layers, error=ScheduleError)
        return tuple(sorted(set(cfg.budgets) | {num_layers}))
    budgets = {num_layers}
    for s in cfg.speedups:
        M, m = solve_budgets(num_layers, s, w)
        budgets |= set(range(m, M + 1))
    return tuple(sorted(budgets))


GQA_HEAD_MULTIPLE = 8  # onnxruntime's GroupQueryAttention refuses other head sizes ("must be a multiple of 8")


def resolve_attention(cfg: ExportConfig, shape: OPTShape) -> tuple[str, str]:
    """-> (attention flavour, why). An explicit choice is kept (gqa with a head size it cannot run is refused
    here, not deep inside the parity run); otherwise gqa where it works, else the portable matmul flavour."""
    D = shape.head_dim
    if cfg.attention is not None:
        if cfg.attention == "gqa" and D % GQA_HEAD_MULTIPLE:
            raise EngineError(f"attention='gqa' needs a head size that is a multiple of {GQA_HEAD_MULTIPLE} "
                              f"(onnxruntime GroupQueryAttention); this model's head size is {D} "
                              f"(hidden_size {shape.hidden_size} / {shape.num_heads} heads): use --attention matmul "
                              "or leave --attention out")
        return cfg.attention, "requested"
    if cfg.backend == "tensorrt":
        return "matmul", "auto: TensorRT runs standard ONNX ops only"
    if D % GQA_HEAD_MULTIPLE:
        return "matmul", (f"auto: head size {D} is not a multiple of {GQA_HEAD_MULTIPLE}, which GroupQueryAttention "
                          "needs")
    return "gqa", "auto: onnxruntime's in-place GroupQueryAttention"


def schedule_defaults(num_layers: int, cfg: ExportConfig, buckets: tuple[int, ...]) -> dict:
    """What the manifest records about the schedules the engine runs exactly: the speedups every budget of which was
    exported (with explicit `budgets`, only those of `speedups` the list happens to cover), and the warm-up."""
    exact = []
    for s in cfg.speedups:
        M, m = solve_budgets(num_layers, s, cfg.warmup_layers)
        if set(range(m, M + 1)) <= set(buckets):
            exact.append(s)
    return {"speedups": exact, "warmup_layers": cfg.warmup_layers}


def draft_buckets(num_layers: int, cfg: ExportConfig, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets lossless mode drafts with: the default draft depth's and each exported speedup's
    (`draft_bucket`), so `--draft-speedup S` for any S of the export finds a quantized draft."""
    if not any(b < num_layers for b in buckets):
        return ()
    speeds = {DEFAULT_DRAFT_SPEEDUP, *(s for s in cfg.speedups if s > 1)}
    return tuple(sorted({draft_bucket(num_layers, buckets, s) for s in speeds}))


def resolve_drafts(cfg: ExportConfig, shape: OPTShape, dtype: str, buckets: tuple[int, ...]
                   ) -> tuple[str | None, tuple[int, ...], str]:
    """-> (scheme of the quantized drafts or None, their buckets, why not when None). "auto" leaves them out where
    the engine cannot carry them; an explicit scheme is refused there instead."""
    if cfg.drafts == "none":
        return None, (), "--drafts none"
    why = None
    if cfg.quantize is not None:
        why = "the engine's own weights are quantized, and its lossless mode is refused"
    elif dtype != "float32":
        why = f"{dtype} engines have no quantized graphs"
    elif cfg.backend != "onnxruntime":
        why = "the TensorRT backend has no lossless mode"
    elif not draft_buckets(shape.num_layers, cfg, buckets):
        why = "no bucket below full depth to draft with"
    scheme = None
    if why is None:
        try:
            scheme = resolve_scheme("int8" if cfg.drafts == "auto" else cfg.drafts, shape, dtype, "--drafts")
        except EngineError as exc:
            if cfg.drafts != "auto":
                raise
            why = str(exc)
    if why is not None:
        if cfg.drafts != "auto":
            raise EngineError(f"--drafts {cfg.drafts}: {why}")
        return None, (), why
    return scheme, draft_buckets(shape.num_layers, cfg, buckets), ""


def tool_versions() -> dict:
    return {name: version(name) for name in ("skipdecode", "torch", "transformers", "onnx", "onnxruntime")}


def export(cfg: ExportConfig, progress: bool = True) -> Manifest:
    with ExportTarget(Path(cfg.out), cfg.force) as target:
        for line in target.recovered:
            print(f"export: {line}", file=sys.stderr)
        torch_dtype, dtype = DTYPES[cfg.dtype]
        model, codec = load_model(cfg.model)
        model = model.to(torch_dtype)
        shape = OPTShape.from_config(model.config)
        L = shape.num_layers
        check_int("warmup_layers", cfg.warmup_layers, lo=0, hi=L, error=ScheduleError)
        max_length = check_int("max_length", cfg.max_length or shape.max_positions, lo=2, hi=shape.max_positions)
        buckets = bucket_budgets(L, cfg)
        attention, reason = resolve_attention(cfg, shape)
        cfg = replace(cfg, attention=attention)
        if cfg.quantize is not None:
            cfg = replace(cfg, quantize=resolve_scheme(cfg.quantize, shape, dtype))
            resolve_kernels(cfg.kernel_candidates, cfg.quantize)  # refused before any tracing
        elif cfg.kernel_candidates not in ("auto", "none"):
            raise EngineError(f"--kernel-candidates {cfg.kernel_candidates}: only quantized engines (--quantize) "
                              "have other kernel forms")
        drafts = resolve_drafts(cfg, shape, dtype, buckets)
        plan_parity(max_length, buckets, min(3, cfg.max_batch))  # refuses an impossible check before any tracing
        if progress and reason != "requested":
            print(f"export: attention {attention} ({reason})", file=sys.stderr)
        if progress and drafts[0] is None and cfg.drafts == "auto":
            print(f"export: no quantized drafts for lossless mode ({drafts[2]})", file=sys.stderr)
        man = _build(model, codec, shape, buckets, dtype, max_length, cfg, target.tmp, progress, drafts[:2])
        reference = model if not man.quantization else dequantized_model(model, target.tmp, man.weights,
                                                                              man.quantization)
        man = replace(man, parity=check_parity(target.tmp, reference), attention_reason=reason)
        man.write(target.tmp)
        man = _lossless_policy(cfg, man, target.tmp, progress)
        _backend_checks(cfg, man, target.tmp, progress)
        target.commit()
    return man


def _lossless_policy(cfg: ExportConfig, man: Manifest, tmp: Path, progress: bool) -> Manifest:
    """Record lossless mode's automatic drafting policy (ExportConfig.lossless_policy). Measured only where the
    timing means something for the engine's users: float engines for onnxruntime on the CPU (quantized engines
    refuse lossless mode; TensorRT engines run on a GPU)."""
    if cfg.lossless_policy == "default":
        return man
    if cfg.lossless_policy != "measure":
        policy = DraftPolicy.parse(cfg.lossless_policy).as_dict() | {"measured": {"set": "--lossless-policy"}}
    elif man.quantization or cfg.backend != "onnxruntime":
        return man
    else:
        from .lossless_tune import tune
        log = (lambda m: print(f"export: {m}", file=sys.stderr)) if progress else (lambda _: None)
        policy = tune(tmp, log=log)
        if progress:
            what = (f"{policy['draft_tokens']} tokens from {policy['draft_speedup']:g}x, stop "
                    f"{policy['stop_below']}" if policy["draft_tokens"] else "no automatic drafting (it did not "
                    "pay on this machine)")
            print(f"export: lossless policy: {what}", file=sys.stderr)
    man = replace(man, lossless=policy)
    man.write(tmp)
    return man


def _backend_checks(cfg: ExportConfig, man: Manifest, tmp: Path, progress: bool) -> None:
    """fp16 graphs are also compared with an fp32 export of the same model (per-output tolerances, fails hard);
    TensorRT plans are built from the finished graphs and compared with onnxruntime CPU through polygraphy."""
    if cfg.dtype == "fp16":
        from .fp16_parity import check_fp16_export
        check_fp16_export(replace(cfg, dtype="fp32", backend="onnxruntime", drafts="none", lossless_policy="default"),
                          tmp, progress)
    if cfg.backend == "tensorrt":
        from .polygraphy_check import check_backend_parity
        from .tensorrt_build import TrtBuildConfig, build_plans
        build_plans(tmp, man, cfg.trt or TrtBuildConfig(), progress)
        check_backend_parity(tmp, "tensorrt")


def _build(model, codec, shape: OPTShape, buckets, dtype: str, max_length: int, cfg: ExportConfig,
           tmp: Path, progress: bool, drafts: tuple[str | None, tuple[int, ...]] = (None, ())) -> Manifest:
    L, H, D, V = shape.num_layers, shape.num_heads, shape.head_dim, shape.vocab_size
    prefill = PrefillGraph(model)
    index = write_weights(prefill, tmp / WEIGHTS_FILE)
    # the verify graphs check drafted tokens at full depth (lossless mode): any batch in standard ops, and for gqa
    # engines one row in place (faster: attention over the row's own length, no K/V copies)
    jobs = [("prefill", L)] + [(f"decode_b{b:03d}", b) for b in sorted(buckets, reverse=True)] + [("verify", L)]
    if cfg.attention == "gqa":
        jobs.append(("verify_row", L))
    graphs = []
    for name, budget in tqdm(jobs, desc="export graphs", unit="graph", disable=not progress, file=sys.stderr):
        if name == "prefill":
            layers = tuple(range(L))
            ins, outs = C.prefill_io(L, H, D, V, dtype)
            module, args = prefill, _prefill_args()
        elif name.startswith("verify"):
            layers, attention = tuple(range(L)), "gqa" if name == "verify_row" else "matmul"
            ins, outs = C.verify_io(L, H, D, V, dtype, attention)
            module, args = VerifyGraph(model, attention), _verify_args(L, H, D, model.dtype, attention)
        else:
            layers = layers_for_budget(L, budget, cfg.warmup_layers)
            ins, outs = C.decode_io(layers, H, D, V, dtype, cfg.attention)
            module = DecodeGraph(model, layers, cfg.attention)
            args = _decode_args(len(layers), H, D, model.dtype, cfg.attention)
        path = tmp / f"{name}.onnx"
        trace(module, args, ins, outs, path, contrib_ops=name != "prefill" and name != "verify"
              and cfg.attention == "gqa")
        used = attach_weights(path, index, [s.name for s in (*ins, *outs)])
        kind = name if name == "verify_row" else name.split("_")[0]
        graphs.append(GraphSpec(name, kind, path.name, budget, layers, tuple(ins), tuple(outs),
                                tuple(used)))
    quantization, draft_info = {}, {}
    if cfg.quantize is not None:
        index, graphs, quantization = quantize_files(tmp, graphs, index, cfg.quantize,
                                                     resolve_kernels(cfg.kernel_candidates, cfg.quantize))
        for form in quantization["kernels"]:
            if "weights" in form:  # a form over weights of its own: which of them it reads only pre-packed
                form["prepacked"] = list(prepacked_weights(tmp, list(form["files"].values()), list(index)))
    if drafts[0] is not None:
        index, graphs, draft_info = add_quantized_drafts(tmp, graphs, index, *drafts)
    if codec is not None:
        codec.save(tmp / "tokenizer.json")
    tokenizer = "tokenizer.json" if codec is not None else None
    man = Manifest(
        model=replace(shape, name=Path(cfg.out).name, source=str(cfg.model)), dtype=dtype,
        warmup_layers=cfg.warmup_layers, attention=cfg.attention, max_batch=cfg.max_batch, max_length=max_length,
        graphs=tuple(graphs),
        weights_file=WEIGHTS_FILE, weights_size=(tmp / WEIGHTS_FILE).stat().st_size, weights=index,
        schedule_defaults=schedule_defaults(L, cfg, buckets),
        tokenizer=tokenizer, tools=tool_versions(), quantization=quantization, drafts=draft_info,
        prepacked=prepacked_weights(tmp, [g.file for g in graphs], list(index)),
        integrity=hash_files(tmp, [WEIGHTS_FILE, *(g.file for g in graphs), *variant_files(quantization),
                                   *([tokenizer] if tokenizer else [])]))
    man.write(tmp)
    return man


def variant_files(quantization: dict) -> list[str]:
    """The alternative graph files of a quantized engine's kernel candidates (export/quantize_export.py)."""
    return [f for k in quantization.get("kernels", ()) for f in k["files"].values()]


# Example inputs for tracing: sizes >= 2 and distinct from each other so no dim is specialised.
_B, _S, _T, _V = 3, 7, 13, 4


def _prefill_args():
    ids = torch.full((_B, _S), 5, dtype=torch.long)
    return ids, torch.arange(_S).repeat(_B, 1), torch.ones(_B, _S, dtype=torch.long)


def _decode_args(n_layers: int, heads: int, head_dim: int, dtype: torch.dtype, attention: str):
    past = [torch.zeros(_B, heads, _T, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
    lengths = torch.tensor([2, 5, 9], dtype=torch.int32)
    kv_length = (torch.tensor(_T, dtype=torch.int32),) if attention == "gqa" else ()
    gate = torch.ones(_B, n_layers, dtype=torch.bool)
    return (torch.full((_B, 1), 5, dtype=torch.long), lengths, *kv_length, gate, *past)


def _verify_args(n_layers: int, heads: int, head_dim: int, dtype: torch.dtype, attention: str):
    if attention == "gqa":  # one row: batch 1 is the only size its graph runs
        past = [torch.zeros(1, heads, _T, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
        return (torch.full((1, _V), 5, dtype=torch.long), torch.tensor([5], dtype=torch.int32),
                torch.tensor(5 + _V, dtype=torch.int32), *past)
    past = [torch.zeros(_B, heads, _T, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
    ids = torch.full((_B, _V), 5, dtype=torch.long)
    return (ids, torch.tensor([2, 5, 9], dtype=torch.int32), *past)
