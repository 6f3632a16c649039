"""Export parity: every graph of an engine directory against the PyTorch reference. Fails hard.

Both sides get identical inputs through the same slot API: prompts of different lengths prefilled into their
slots (the engine left-pads them into one batch, the reference runs each alone), then a few decode steps through
every bucket from the deepest to the shallowest (a monotone schedule, as at run time), feeding the reference's
greedy tokens to both. A KV window too short for all buckets in one sequence is covered in several rounds on fresh
slots (`plan_parity`), so any max_length >= 2 can be checked. Compared per output: logits and K/V of every
graph. Non-finite values fail: NaN compares as "no difference" in max(), so it is checked for explicitly.

Quantized engines, and the quantized draft graphs of a float engine (lossless mode), are checked twice
(export/quantize_export.py). "exact.*": session-only copies of the graphs that
multiply by the dequantized weights in float32, against the PyTorch model carrying those weights, at the float32
tolerance: the weights, scales and zero points are right. Unprefixed keys: the engine as users run it (activations
rounded at run time), against the same model, with the limit widened by `FAST_ROUNDING` times the deviation the
same rounding, emulated in PyTorch, causes on that output (a fixed fraction of max|logit| would be a measurement of
one CPU, not a bound).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..runtime.engine import Engine
from ..runtime.errors import EngineError
from ..runtime.kernels import candidates, with_candidate
from ..runtime.manifest import MANIFEST, load_manifest
from .quantize import exact_graph
from .quantize_export import FastPathRounding, dequantized_model, fast_path_rounding
from .reference import TorchReference


@dataclass(frozen=True)
class Tolerance:
    """Pass when max|engine - reference| <= atol + rtol * max|reference| + rounding * max|emulated - reference|
    (per output; `emulated`: the reference with the engine's activation rounding, where there is one, its deviation
    taken as the worst over all outputs of the same kind)."""

    atol: float
    rtol: float
    rounding: float = 0.0


# The float32 bound: operation order only (fp32 GEMMs summing in another order, fused kernels).
FLOAT32 = Tolerance(1e-4, 1e-5)
# The fast path of a quantized engine may deviate from the dequantized model by a multiple of what its activation
# rounding does in the PyTorch emulation (export/quantize_export.py `fast_path_rounding`), worst over all outputs of a
# kind, plus the float32 bound. The engine's integer dot products are exact on every CPU (no int16 saturation:
# export/quantize.py), so what is left is where the two roundings part. MatMulNBits: the same blocks, scales and
# round-half-to-even on both sides (the first layer's outputs agree to 1e-6), but a value on a rounding boundary can
# round the other way after fp32 operation-order noise, and each such flip propagates, so after a few layers the
# engine's deviation is another draw of the same size as the emulation's: measured 1.0-1.3x of it on the tiny test
# models and on the embedded model (int8 and int4); 3x. DynamicQuantizeMatMul: the engine takes one range over the
# whole left-padded batch where the reference rounds each row alone, so its steps are coarser by the ratio of the
# two ranges: measured 1.0-1.9x with three prompts; 4x. Errors in the weights themselves are caught by the "exact.*"
# check at the float32 bound (a 2% scale error in one layer exceeds it 100-fold), not by this one.
FAST_ROUNDING = {"MatMulNBits": 3.0, "DynamicQuantizeMatMul": 4.0}
TOLERANCES = {
    "float32": {"logits": FLOAT32, "kv": FLOAT32},
    "float16": {"logits": Tolerance(5e-2, 1e-2), "kv": Tolerance(2e-2, 1e-2)},
    # a quantized engine's graphs on the dequantized weights in fp32: nothing but operation order differs
    "exact": {"logits": FLOAT32, "kv": FLOAT32},
}


def fast_tolerances(quantization: dict) -> dict:
    """Per-output tolerances of a quantized engine as users run it (see FAST_ROUNDING)."""
    tol = Tolerance(FLOAT32.atol, FLOAT32.rtol, FAST_ROUNDING[quantization["op"]])
    return {"logits": tol, "kv": tol}


def tolerances(man) -> dict:
    """Per-output tolerances of an engine as users run it: the fast-path bound for quantized weights, else by dtype."""
    return fast_tolerances(man.quantization) if man.quantization else TOLERANCES[man.dtype]


# The float32 copies of quantized graphs (`exact_copy`: MatMulNBits at accuracy level 1) keep reading the weights
# that the engine itself reads only pre-packed, so shared pre-packing could not give their bytes back (and warned).
EXACT_PREPACK = "off"


class ParityError(EngineError):
    """An exported graph disagrees with the PyTorch reference beyond its tolerance."""


def _np(x) -> np.ndarray:
    if hasattr(x, "numpy"):  # torch tensor from the reference
        x = x.float().numpy()
    return np.asarray(x, dtype=np.float64)


def _record(report: dict, key: str, got, want, emulated=None, *, tol: Tolerance) -> None:
    got, want = _np(got), _np(want)
    finite = bool(np.isfinite(got).all() and np.isfinite(want).all())
    diff = float(np.abs(got - want).max()) if finite else float("inf")
    limit = tol.atol + tol.rtol * (float(np.abs(want).max()) if finite else 0.0)
    prev = report.get(key, {"max_abs_diff": 0.0, "limit": limit, "finite": True})
    entry = {"max_abs_diff": max(prev["max_abs_diff"], diff), "limit": max(prev["limit"], limit),
             "finite": prev["finite"] and finite}
    if tol.rounding and emulated is not None:  # the emulated rounding's own deviation; `_widen` uses it
        rounding = float(np.abs(_np(emulated) - want).max()) if finite else 0.0
        entry["rounding_diff"] = max(prev.get("rounding_diff", 0.0), rounding)
    report[key] = entry


def _widen(report: dict, factor: float) -> None:
    """Add `factor` x the emulated rounding's worst deviation over every output of the same kind (logits, K/V) to
    each limit: the worst of many outputs is a steadier measure of the rounding noise than any one output's."""
    for kind in ("logits", "kv"):
        keys = [k for k in report if k.endswith("." + kind) and "rounding_diff" in report[k]]
        worst = max((report[k]["rounding_diff"] for k in keys), default=0.0)
        for k in keys:
            report[k]["limit"] += factor * worst


@dataclass(frozen=True)
class ParityRound:
    """Prompts of `prompt_lengths` prefilled into fresh slots, then `steps` decode steps through each of `buckets`
    (deepest first: a monotone schedule)."""

    prompt_lengths: tuple[int, ...]
    buckets: tuple[int, ...]
    steps: int


PROMPT_LENGTHS = (5, 2, 8)  # ragged: the engine left-pads them into one prefill batch


def plan_parity(max_length: int, buckets, n_prompts: int, steps: int = 2) -> list[ParityRound]:
    """Rounds that decode through every bucket inside a KV window of `max_length` columns. A slot holding p prompt
    tokens takes one column per decode step, so a round needs longest prompt + buckets x steps <= max_length; a short
    window gets shorter prompts, fewer steps per bucket and more rounds. The exporter calls this before tracing, so
    an impossible check is refused before any work."""
    if max_length < 2:
        raise EngineError(f"parity needs max_length >= 2 (a 1-token prompt and one decode step); got {max_length}")
    steps = max(1, min(steps, max_length - 1))
    longest = max(1, min(max(PROMPT_LENGTHS), max_length - steps))
    lengths = tuple(min(n, longest) for n in PROMPT_LENGTHS[:n_prompts])
    per_round = (max_length - longest) // steps
    order = sorted(buckets, reverse=True)
    return [ParityRound(lengths, tuple(order[i: i + per_round]), steps) for i in range(0, len(order), per_round)]


def check_parity(directory: Path, model, steps_per_bucket: int = 2, seed: int = 0,
                 form_models: dict | None = None) -> dict:
    """Return {output: {max_abs_diff, limit, finite[, rounding_diff]}}; raise ParityError naming every output over
    its limit.
    `model`: the PyTorch model the engine must compute (for a quantized engine: carrying its dequantized weights).
    The quantized drafts of a float engine, and the kernel forms of a quantized engine with weights of their own,
    are checked against a copy of `model` carrying their dequantized weights: read from the engine, or for a form
    given in `form_models` (name -> model), that model."""
    directory = Path(directory)
    man = load_manifest(directory)
    report: dict = {}
    if man.drafts:
        draft_model = dequantized_model(model, directory, man.weights, man.drafts["quantization"])
        report.update(_draft_parity(directory, man, model, draft_model, steps_per_bucket, seed))
    if man.quantization:
        exact, fast = _quantized_checks(directory, man, model, man.quantization, steps_per_bucket, seed)
        report.update({**{f"exact.{k}": v for k, v in exact.items()}, **fast})
        for form in man.quantization.get("kernels", ()):
            if form["parity"] == f"kernel.{form['name']}":
                form_model = (form_models or {}).get(form["name"]) or \
                    dequantized_model(model, directory, man.weights, form["quantization"])
                report.update(_kernel_form_parity(directory, man, form, form_model, steps_per_bucket, seed))
    else:
        report.update(_parity_rounds(directory, man, model, None, tolerances(man), steps_per_bucket, seed))
    failed = {k: v for k, v in report.items() if not v["finite"] or v["max_abs_diff"] > v["limit"]}
    if failed:
        lines = ", ".join(f"{k}: {_describe(v)}" for k, v in failed.items())
        raise ParityError(f"parity check failed for {len(failed)} output(s) of {directory.name}: {lines}")
    return report


def _draft_parity(directory: Path, man, model, draft_model, steps: int, seed: int) -> dict:
    """Lossless mode's quantized draft graphs, checked as the quantized graphs of an engine are ("exact.draft.*" on
    a copy computing in float32 from the dequantized weights, "draft.*" as users run them with the rounding bound);
    the reference prefills with `model` and drafts with `draft_model`, as the engine prefills with its float graph."""
    exact, fast = _quantized_checks(directory, man, model, man.drafts["quantization"], steps, seed, draft_model)
    return {**{f"exact.{k}": v for k, v in exact.items()}, **fast}


def _quantized_checks(directory: Path, man, model, info: dict, steps: int, seed: int, draft_model=None
                      ) -> tuple[dict, dict]:
    """The two checks of quantized graphs (see the module docstring) -> (exact report, fast-path report): rounds on
    a session-only float32 copy of the graphs at the float32 bound, then the graphs as users run them against the
    same reference with `info`'s activation rounding emulated (on `draft_model`, the model the drafts follow, when
    checking drafts), within the bound that rounding gives."""
    # inside the engine directory: same file system (weights.bin is hard-linked, not copied), removed with it
    with tempfile.TemporaryDirectory(prefix=".exact-", dir=directory) as tmp:
        exact = _parity_rounds(exact_copy(directory, man, Path(tmp) / directory.name), man, model, None,
                               TOLERANCES["exact"], steps, seed, draft_model=draft_model, prepack=EXACT_PREPACK)
    rounding = fast_path_rounding(model if draft_model is None else draft_model, info)
    try:
        fast = _parity_rounds(directory, man, model, rounding, fast_tolerances(info), steps, seed,
                              draft_model=draft_model)
    finally:
        if rounding is not None:
            rounding.remove()
    _widen(fast, fast_tolerances(info)["logits"].rounding)
    return exact, fast


def _kernel_form_parity(directory: Path, man, form: dict, form_model, steps: int, seed: int) -> dict:
    """A kernel form over a weight set of its own (export/quantize_export.py `_dyn8_form`), checked as a quantized
    engine is ("exact.kernel.<name>.*" on a float32 copy, "kernel.<name>.*" as users run it, with its rounding bound)
    against `form_model` (the engine's reference carrying the form's dequantized weights). The form runs from a copy
    of the engine whose manifest names its graphs (the weights file is hard-linked, not copied)."""
    prefix = form["parity"]
    form_man = with_candidate(man, next(c for c in candidates(man) if c.name == form["name"]))
    with tempfile.TemporaryDirectory(prefix=".kernel-", dir=directory) as tmp:
        view = _linked_copy(directory, Path(tmp) / "form", {MANIFEST})  # a manifest of its own
        form_man.write(view)
        exact, fast = _quantized_checks(view, form_man, form_model, form["quantization"], steps, seed)
    return {**{f"exact.{prefix}.{k}": v for k, v in exact.items()}, **{f"{prefix}.{k}": v for k, v in fast.items()}}


def _linked_copy(directory: Path, dst: Path, skip: set[str]) -> Path:
    """`dst` holding every file of `directory` except `skip`, hard-linked where the file system allows."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.name not in skip and entry.is_file():
            try:
                os.link(entry, dst / entry.name)
            except OSError:  # another file system: a copy
                shutil.copy(entry, dst / entry.name)
    return dst


def exact_copy(directory: Path, man, dst: Path) -> Path:
    """A session-only copy of a quantized engine whose graphs multiply by the dequantized weights in float32
    (export/quantize.py `exact_graph`); every other file is linked, so the weights are the engine's own bytes."""
    dst.mkdir(parents=True)
    files = {g.file for g in man.graphs}
    for g in man.graphs:
        onnx.save(exact_graph(onnx.load(str(directory / g.file), load_external_data=False)), str(dst / g.file))
    return _linked_copy(directory, dst, files)


class _RoundedReference(TorchReference):
    """The reference with the engine's activation rounding switched on for each of its forward passes."""

    def __init__(self, model, rounding: FastPathRounding, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.rounding = rounding

    def _prefill(self, *args):
        with self.rounding:
            return super()._prefill(*args)

    def _decode(self, *args):
        with self.rounding:
            return super()._decode(*args)

    def _verify(self, *args):
        with self.rounding:
            return super()._verify(*args)

    def _decode_draft(self, *args):
        with self.rounding:
            return super()._decode_draft(*args)


def _parity_rounds(directory: Path, man, model, rounding: FastPathRounding | None, tols: dict, steps_per_bucket: int,
                   seed: int, draft_model=None, prepack: str | None = None) -> dict:
    """Every round of `plan_parity` on the engine at `directory` against `model` (and, given `rounding`, against the
    same model with the engine's activation rounding, stepped alongside with the same tokens). With `draft_model`
    the rounds check the quantized draft graphs instead (`_check_draft_round`). `prepack`: as `Engine.load`."""
    n_prompts = min(3, man.max_batch)
    # the exporter wrote it just now
    engine = Engine.load(directory, max_batch=n_prompts, verify=False, prepack=prepack, kernel="exported")
    kw = {"max_batch": n_prompts, "warmup_layers": man.warmup_layers, "draft_model": draft_model}
    refs = [TorchReference(model, **kw)] + ([_RoundedReference(model, rounding, **kw)] if rounding else [])
    rng = np.random.default_rng(seed)
    report: dict = {}
    buckets = man.draft_buckets if draft_model is not None else man.buckets
    try:
        for rnd in plan_parity(engine.backend.max_length, buckets, n_prompts, steps_per_bucket):
            prompts = [rng.integers(3, man.model.vocab_size, size=n).tolist() for n in rnd.prompt_lengths]
            if draft_model is not None:
                _check_draft_round(engine, refs, man, prompts, rnd, report, tols)
            else:
                _check_round(engine, refs, man, prompts, rnd, report, tols)
    finally:
        engine.close()
    return report


def _check_draft_round(engine, refs: list, man, prompts: list, rnd: ParityRound, report: dict, tols: dict) -> None:
    """Float prefill on every side (checked by `_check_round`), then from the prompts `rnd.steps` draft steps through
    each draft bucket (each step reads the K/V the draft wrote before, as a round of lossless mode does), compared
    on logits and the K/V of the draft's layers, then rewound to the prompts."""
    backend = engine.backend
    with _fresh_slots(backend, refs, len(prompts)) as slots:
        prompt_wants = [ref.prefill_rows(prompts, slots) for ref in refs]
        backend.prefill_rows(prompts, slots)
        columns = backend.slots.lengths[slots].copy()
        for bucket in rnd.buckets:
            wants = prompt_wants
            for _ in range(rnd.steps):
                wants = _decode_step(backend, refs, man, slots, wants[0], bucket, report, tols, draft=True)
            for side in (backend, *refs):
                side.rewind(slots, columns.tolist())


def _check_round(engine, refs: list, man, prompts: list, rnd: ParityRound, report: dict, tols: dict) -> None:
    """One round on fresh slots of every side; the slots are given back at the end. refs[0] is the reference,
    refs[1] (if any) its emulation of the engine's activation rounding."""
    backend = engine.backend
    with _fresh_slots(backend, refs, len(prompts)) as slots:
        wants = [ref.prefill_rows(prompts, slots) for ref in refs]
        _record(report, "prefill.logits", backend.prefill_rows(prompts, slots), *wants, tol=tols["logits"])
        for layer in range(man.num_layers):  # ragged slots: row b's prompt sits at columns [0, len_b), no padding
            keys, values = backend.kv.read(layer)
            for b, slot in enumerate(slots):
                m = len(prompts[b])
                _record(report, "prefill.kv", keys[slot, :, :m], *(r.cache[slot].keys[layer][0] for r in refs),
                        tol=tols["kv"])
                _record(report, "prefill.kv", values[slot, :, :m],
                        *(r.cache[slot].values[layer][0] for r in refs), tol=tols["kv"])
        if man.verify() is not None:
            _verify_step(backend, refs, man, slots, wants[0], report, tols)
        for bucket in rnd.buckets:
            for _ in range(rnd.steps):
                wants = _decode_step(backend, refs, man, slots, wants[0], bucket, report, tols)


@contextmanager
def _fresh_slots(backend, refs: list, n: int):
    """The same `n` fresh slots on the engine and every reference, given back at the end."""
    slots = backend.slots.allocate(n)
    ref_slots = [ref.slots.allocate(n) for ref in refs]
    assert all(s == slots for s in ref_slots)  # all tables hand out the lowest free slots
    try:
        yield slots
    finally:
        backend.slots.free(slots)
        for ref, s in zip(refs, ref_slots, strict=True):
            ref.slots.free(s)


def _decode_step(backend, refs: list, man, slots: list, want, bucket: int, report: dict, tols: dict,
                 draft: bool = False) -> list:
    """Every side decodes the reference's greedy tokens through `bucket` (`draft`: its quantized draft graph);
    -> every reference's logits."""
    n = len(slots)
    tokens = np.argmax(want[:n], axis=-1).astype(np.int64)
    columns = backend.slots.lengths[slots].copy()
    gates = np.ones((n, bucket), dtype=bool)
    wants = [ref.decode_rows(slots, tokens, bucket, gates, draft=draft)[slots] for ref in refs]
    got = backend.decode_rows(slots, tokens, bucket, gates, draft=draft)[slots]
    label = f"draft.{bucket}" if draft else f"decode.{bucket}"
    _record(report, f"{label}.logits", got, *wants, tol=tols["logits"])
    for layer in (man.draft if draft else man.decode)(bucket).layers:
        keys, values = backend.kv.read(layer)
        for b, slot in enumerate(slots):
            c = int(columns[b])
            _record(report, f"{label}.kv", keys[slot, :, c],
                    *(r.cache[slot].keys[layer][0, :, -1] for r in refs), tol=tols["kv"])
            _record(report, f"{label}.kv", values[slot, :, c],
                    *(r.cache[slot].values[layer][0, :, -1] for r in refs), tol=tols["kv"])
    return wants


def _verify_step(backend, refs: list, man, slots: list, want, report: dict, tols: dict) -> None:
    """Every side verifies [greedy token, two more] at full depth (lossless mode's pass), compare the logits of every
    column and every layer's new K/V, then forget those columns (the decode steps that follow start from the
    prompts)."""
    n = len(slots)
    columns = backend.slots.lengths[slots].copy()
    S = int(max(1, min(3, backend.max_length - columns.max())))
    tokens = np.zeros((n, S), dtype=np.int64)
    tokens[:, 0] = np.argmax(want[:n], axis=-1)
    tokens[:, 1:] = (tokens[:, :1] + np.arange(1, S)[None, :] * 7) % man.model.vocab_size
    _compare_verify(backend, refs, man, "verify", slots, tokens, columns, report, tols)
    if man.verify("verify_row") is not None:  # one row: the in-place graph of gqa engines
        _compare_verify(backend, refs, man, "verify_row", slots[-1:], tokens[-1:], columns[-1:], report, tols)


def _compare_verify(backend, refs: list, man, label: str, slots: list, tokens: np.ndarray, columns: np.ndarray,
                    report: dict, tols: dict) -> None:
    """One verify call on every side over `slots` (which graph runs follows from the row count); logits and every
    layer's new K/V recorded under `label`; then all forget the verified columns."""
    S = tokens.shape[1]
    wants = [ref.verify_rows(slots, tokens)[slots] for ref in refs]
    _record(report, f"{label}.logits", backend.verify_rows(slots, tokens)[slots], *wants, tol=tols["logits"])
    for layer in range(man.num_layers):
        keys, values = backend.kv.read(layer)
        for b, slot in enumerate(slots):
            c = int(columns[b])
            _record(report, f"{label}.kv", keys[slot, :, c: c + S],
                    *(r.cache[slot].keys[layer][0, :, -S:] for r in refs), tol=tols["kv"])
            _record(report, f"{label}.kv", values[slot, :, c: c + S],
                    *(r.cache[slot].values[layer][0, :, -S:] for r in refs), tol=tols["kv"])
    backend.rewind(slots, columns.tolist())
    for ref in refs:
        ref.rewind(slots, columns.tolist())


def _describe(entry: dict) -> str:
    if not entry["finite"]:
        return "non-finite values (NaN or inf)"
    return f"{entry['max_abs_diff']:.3g} > {entry['limit']:.3g}"
