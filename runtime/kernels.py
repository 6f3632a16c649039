"""Per-machine choice of a quantized engine's kernel path: which of the graph forms the exporter wrote runs fastest on
this CPU, among those that passed the export's parity check. No torch, no onnx.

Why: onnxruntime picks MatMulNBits kernels by CPU. At accuracy level 4 it rounds activations per block to int8 and
runs int8 dot products (fast with VNNI / AMX); on an AVX2-only CPU that path can be slower than float32. Level 1
dequantizes each weight block and runs a float32 GEMM (exact: the dequantized model's arithmetic). Which one wins
depends on the machine and the batch size, so it is measured here rather than fixed at export.

Candidates come from the manifest (`quantization["kernels"]`, export/quantize_export.py `quantize_files`): a name,
the graph files that differ from the engine's own (none for the exported form), for a form over a weight set of its
own the weights each graph reads and those it reads only pre-packed, and which part of the export's parity report
holds it ("engine": the unprefixed keys, "exact": the `exact.*` keys, "kernel.<name>": its own `kernel.<name>.*` and
`exact.kernel.<name>.*` keys). The forms today: the exported one (`a4`: MatMulNBits, int8 activations per block),
`dyn8` (written by default for int8 engines: DynamicQuantizeMatMul over 7-bit per-column weights, uint8 activations
per tensor; on CPUs without VNNI its kernels are the faster ones at batch 8) and `a1` (on request: MatMulNBits at
accuracy level 1). A candidate is eligible only when its part exists and every entry in it is finite and within its
limit; an ineligible one is never chosen, however fast, and cannot be forced. Only the chosen form's weights stay
resident: the backend gives back the pages of weights none of its graphs reads.

Modes (`Engine.load(kernel=...)`, `--kernel`, env `SKIPDECODE_KERNEL`):
* "exported" (the library default): the exported graphs, nothing measured.
* "auto" (the CLI default): the cached choice for this machine and engine, else measure and cache it.
* "measure": measure again and overwrite the cache.
* a candidate's name: that candidate (refused if it did not pass parity).

Measurement (`measure_steps`): each candidate loaded with a small KV window; one full-depth decode step at each batch
band (1 and 8, capped at the engine's max batch), the candidates interleaved in every round, medians over the
rounds; a candidate 3x slower than the best at every band after the first round is not timed further (8-bit
MatMulNBits at accuracy level 1 dequantizes every weight on every call in onnxruntime 1.31: 9-24x slower). A few
seconds on a small model. One candidate runs per engine: the one fastest at the band of the engine's
max batch (holding a second set of sessions for the other band would double the packed weights); the report names
both bands' winners.

Cache: one JSON file per key under `SKIPDECODE_CACHE_DIR` (else `$XDG_CACHE_HOME/skipdecode`, else
`~/.cache/skipdecode`), `kernels/<key>.json`. The key hashes the CPU model and flags (/proc/cpuinfo), the onnxruntime
version and the manifest's bytes (which name every graph file and its content hash), so a new CPU, a new onnxruntime
or a re-export measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import EngineError
from .manifest import MANIFEST, Manifest

ENV_KERNEL = "SKIPDECODE_KERNEL"
ENV_CACHE_DIR = "SKIPDECODE_CACHE_DIR"
MODES = ("exported", "auto", "measure")
BANDS = (1, 8)
ROUNDS = 7
SLOWER = 3.0  # measuring stops after one round for a candidate this many times slower than the best at every band
# the instruction-set extensions that decide which MLAS kernels run (recorded with every choice and bench report)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")


@dataclass(frozen=True)
class Candidate:
    name: str
    files: dict  # graph name -> file, for the graphs whose file differs from the exported one
    # which part of the export's parity report checked this form: "engine" (the unprefixed keys), "exact" (the
    # "exact.*" keys) or "kernel.<name>" (the "kernel.<name>.*" and "exact.kernel.<name>.*" keys)
    parity: str
    weights: dict = field(default_factory=dict)  # graph name -> the weights it reads, where they differ
    prepacked: tuple | None = None  # the weights this form reads only pre-packed (None: keep every byte resident)


def candidates(man: Manifest) -> list[Candidate]:
    """The manifest's kernel candidates (the exported form first); one for engines without the field."""
    raw = man.quantization.get("kernels") if man.quantization else None
    if not raw:
        return [Candidate("exported", {}, "engine")]
    out = []
    names = {g.name for g in man.graphs}
    for i, k in enumerate(raw):
        where = f"manifest.quantization.kernels[{i}]"
        if not isinstance(k, dict) or not isinstance(k.get("name"), str) or not isinstance(k.get("files"), dict) \
                or k.get("parity") not in ("engine", "exact", f"kernel.{k.get('name')}"):
            raise EngineError(f"{where} must be {{name, files, parity: engine|exact|kernel.<name>}}; got {k!r}")
        unknown = sorted((set(k["files"]) | set(k.get("weights", {}))) - names)
        if unknown:
            raise EngineError(f"{where} names graph {unknown[0]!r}, which the manifest does not have")
        for f in k["files"].values():
            if not isinstance(f, str) or f not in man.integrity.get("files", {}):
                raise EngineError(f"{where}: file {f!r} is not among the engine's hashed files")
        weights, prepacked = k.get("weights", {}), k.get("prepacked")
        lists = [*(weights.values() if isinstance(weights, dict) else [None]), *([prepacked] if prepacked else [])]
        if any(not isinstance(x, list) or any(w not in man.weights for w in x) for x in lists):
            raise EngineError(f"{where}: weights and prepacked must list weights of this engine")
        out.append(Candidate(k["name"], dict(k["files"]), k["parity"], {g: tuple(w) for g, w in weights.items()},
                             None if prepacked is None else tuple(prepacked)))
    return out


def _parity_part(key: str) -> str:
    """The part of the parity report an entry belongs to (see `Candidate.parity`)."""
    rest = key.removeprefix("exact.")
    if rest.startswith("kernel."):
        return ".".join(rest.split(".")[:2])
    return "exact" if key.startswith("exact.") else "engine"


def parity_passed(man: Manifest, cand: Candidate) -> bool:
    """Every parity entry of `cand`'s part of the report is finite and within its limit (and there is at least one)."""
    entries = [v for k, v in man.parity.items() if _parity_part(k) == cand.parity]
    try:
        return bool(entries) and all(e["finite"] and e["max_abs_diff"] <= e["limit"] for e in entries)
    except (KeyError, TypeError):
        return False


def with_candidate(man: Manifest, cand: Candidate) -> Manifest:
    """`man` with the graphs of `cand` in place of the exported ones (same names and I/O; its own weights where it
    has a weight set of its own)."""
    if not cand.files:
        return man
    # `prepacked` lists the weights the exported graphs read only in packed form; a form without its own list keeps
    # every unpacked byte resident (onnxruntime 1.31 does not pre-pack 8-bit MatMulNBits weights at accuracy level 1)
    graphs = tuple(replace(g, file=cand.files.get(g.name, g.file), weights=cand.weights.get(g.name, g.weights))
                   for g in man.graphs)
    return replace(man, graphs=graphs, prepacked=cand.prepacked or ())


# ------------------------------------------------------------------------------------------------------ machine

def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """{"model", "flags": sorted list} of the first CPU in `path` (platform.processor() and no flags elsewhere)."""
    model, flags = None, []
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = sorted(value.split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return {"model": model or platform.processor() or "unknown", "flags": flags}


def isa(flags: Sequence[str]) -> dict:
    """{extension: present} for the extensions that select MLAS kernels (ISA_FLAGS)."""
    have = set(flags)
    return {f: f in have for f in ISA_FLAGS}


def manifest_hash(directory: Path) -> str:
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def cache_key(cpu: dict, ort_version: str, engine_hash: str) -> str:
    blob = json.dumps({"cpu": cpu["model"], "flags": sorted(cpu["flags"]), "onnxruntime": ort_version,
                       "engine": engine_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "skipdecode")
    return Path(root) / "kernels"


def _read_cache(key: str) -> dict | None:
    try:
        data = json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _write_cache(key: str, data: dict) -> None:
    """Atomic (a reader sees the old file or the new one); a cache that cannot be written only costs a re-measure."""
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, suffix=".tmp", delete=False) as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, d / f"{key}.json")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------------ choice

@dataclass
class Choice:
    name: str  # the candidate the engine runs
    source: str  # "exported" | "only" | "forced" | "measured" | "cached"
    reason: str
    max_batch: int = 1
    per_band: dict = field(default_factory=dict)  # batch band -> fastest eligible candidate
    timings_ms: dict = field(default_factory=dict)  # candidate -> {batch: median ms per decode step}
    rejected: dict = field(default_factory=dict)  # candidate -> why it may not run
    cpu: dict = field(default_factory=dict)  # {"model", "isa": {extension: present}}
    key: str = ""

    def line(self) -> str:
        """One line for stderr: what runs and why."""
        flags = " ".join(k for k, v in self.cpu.get("isa", {}).items() if v) or "none"
        return f"kernel: {self.name} ({self.source}: {self.reason}) [cpu: {self.cpu.get('model', '?')}; {flags}]"

    def to_dict(self) -> dict:
        return asdict(self)


Measure = Callable[[list[Candidate], tuple[int, ...]], dict]


def choose(directory: Path, man: Manifest, mode: str | None, max_batch: int, measure: Measure,
           ort_version: str, cpu: dict | None = None) -> Choice:
    """The candidate to run for `mode` (None: env SKIPDECODE_KERNEL, else "exported"). `measure(candidates, bands)`
    -> {name: {band: ms}} runs only where a measurement is needed."""
    mode = mode or os.environ.get(ENV_KERNEL) or "exported"
    cpu = cpu or cpu_info()
    cpu_rec = {"model": cpu["model"], "isa": isa(cpu["flags"])}
    cands = candidates(man)
    by_name = {c.name: c for c in cands}
    if mode not in MODES and mode not in by_name:
        raise EngineError(f"kernel={mode!r} is not one of {list(MODES)} or this engine's candidates {list(by_name)}")
    rejected = {c.name: "failed the export's parity check" if man.parity else "has no parity record"
                for c in cands if not parity_passed(man, c)}
    eligible = [c for c in cands if c.name not in rejected]
    common = {"max_batch": max_batch, "rejected": rejected, "cpu": cpu_rec}
    if mode == "exported" or len(cands) == 1:
        why = "as exported, nothing measured" if mode == "exported" else "the engine offers no other kernel path"
        return Choice(cands[0].name, "exported" if mode == "exported" else "only", why, **common)
    if mode in by_name:
        if mode in rejected:
            raise EngineError(f"kernel={mode!r} {rejected[mode]}: it may not run (eligible: "
                              f"{[c.name for c in eligible]})")
        return Choice(mode, "forced", "requested", **common)
    if not eligible:
        raise EngineError(f"no kernel candidate of this engine passed parity ({rejected})")
    if len(eligible) == 1:
        return Choice(eligible[0].name, "only", "the only candidate that passed parity", **common)
    key = cache_key(cpu, ort_version, manifest_hash(directory))
    bands = tuple(sorted({min(b, max_batch) for b in BANDS}))
    cached = _read_cache(key) if mode == "auto" else None
    if cached is not None and cached.get("bands") == list(bands) \
            and set(cached.get("timings_ms", {})) == {c.name for c in eligible}:
        timings = {n: {int(b): float(ms) for b, ms in t.items()} for n, t in cached["timings_ms"].items()}
        source = "cached"
    else:
        timings = measure(eligible, bands)
        source = "measured"
        _write_cache(key, {"key": key, "bands": list(bands), "timings_ms": timings, "cpu": cpu_rec,
                           "onnxruntime": ort_version, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return _pick(eligible, bands, timings, source, key, common)


def _pick(eligible: list[Candidate], bands: tuple[int, ...], timings: dict, source: str, key: str,
          common: dict) -> Choice:
    per_band = {b: min(eligible, key=lambda c: timings[c.name][b]).name for b in bands}
    band = max(bands)  # the engine's max batch (bands are capped at it)
    name = per_band[band]
    ms = ", ".join(f"{c.name} {timings[c.name][band]:.2f}" for c in eligible)
    reason = f"fastest at batch {band} (ms/step: {ms})"
    others = {b: n for b, n in per_band.items() if n != name}
    if others:
        reason += "; " + ", ".join(f"batch {b} would pick {n}" for b, n in others.items()) + \
            " (one kernel per engine, for its max batch)"
    return Choice(name, source, reason, per_band=per_band, timings_ms=timings, key=key, **common)


# ------------------------------------------------------------------------------------------------------ measuring

def measure_steps(open_backend: Callable[[Candidate, int, int], object], cands: list[Candidate],
                  bands: tuple[int, ...], rounds: int = ROUNDS, timer: Callable[[], float] = time.perf_counter
                  ) -> dict:
    """{name: {band: median ms}} of one full-depth decode step per band, candidates interleaved in each round.
    `open_backend(candidate, max_batch, max_length)` -> a slot backend (closed here)."""
    # one set of slots: band b decodes the first b of them, so slot 0 takes a column per band per round (plus the
    # 1-token prompt and one warm-up step per band)
    max_batch, length = max(bands), 1 + (rounds + 1) * len(bands)
    backends = {}
    try:
        for c in cands:
            backends[c.name] = open_backend(c, max_batch, length)
        length = min(be.max_length for be in backends.values())
        rounds = max(1, min(rounds, (length - 1) // len(bands) - 1))
        state = {}
        for name, be in backends.items():
            bucket = max(be.buckets)
            token = be.pad_token_id + 1
            slots = be.slots.allocate(max_batch)
            be.prefill_rows([[token]] * max_batch, slots)
            per_band = {}
            for b in bands:
                per_band[b] = (slots[:b], np.full(b, token, dtype=np.int64), np.ones((b, bucket), dtype=bool))
                be.decode_rows(*per_band[b][:2], bucket, per_band[b][2])  # warm-up: bindings made
            state[name] = (bucket, per_band)
        times: dict = {c.name: {b: [] for b in bands} for c in cands}
        running = list(cands)
        for i in range(rounds):
            for b in bands:
                for c in running:
                    be, (bucket, per_band) = backends[c.name], state[c.name]
                    slots, tokens, gates = per_band[b]
                    t0 = timer()
                    be.decode_rows(slots, tokens, bucket, gates)
                    times[c.name][b].append((timer() - t0) * 1e3)
            if i == 0:  # a candidate SLOWER times the best at every band cannot win: its first reading stands
                best = {b: min(times[c.name][b][0] for c in running) for b in bands}
                running = [c for c in running if any(times[c.name][b][0] <= SLOWER * best[b] for b in bands)]
        return {n: {b: statistics.median(v) for b, v in t.items()} for n, t in times.items()}
    finally:
        for be in backends.values():
            be.close()
