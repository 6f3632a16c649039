"""The engine directory's self-description (`manifest.json`), versioned and validated on load.

The exporter writes it; the runtime never re-derives what the exporter knew (layers per graph, I/O names,
weights offsets, model shape, schedule defaults). A manifest of another format version is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from . import fields as F
from .contract import ATTENTIONS, TensorSpec
from .errors import EngineError, ModelError
from .manifest_check import check_files, check_manifest
from .speculative import MAX_POLICY_TOKENS, DraftPolicy

FORMAT = "skipdecode-engine"
# 2: ragged slot KV layout, past_length/gate inputs, `attention` flavour; 3: `integrity` (content hashes of every
# file, runtime/integrity.py), every field validated strictly at load; 4: lossless mode's quantized draft graphs
# (graph kind "draft", the `drafts` section). Version 3 engines load unchanged (they have neither).
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
WEIGHTS_ALIGN = 64  # bytes; every tensor starts on a cache-line boundary of the shared weights file
# what the exporter writes (export/onnx_export.py; uint8/int8 packed weights of --quantize, export/quantize.py)
WEIGHT_DTYPES = ("float32", "float16", "int64", "uint8", "int8")
IO_DTYPES = ("int64", "int32", "float32", "float16", "bool")
MAX_BATCH = 4096  # KV slots an engine may declare


@dataclass(frozen=True)
class OPTShape:
    """The subset of an OPT config the exporter and runtime need: the manifest's typed `model` section."""

    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    vocab_size: int
    word_embed_proj_dim: int
    max_positions: int
    pre_layer_norm: bool  # do_layer_norm_before: True for most sizes, False for opt-350m
    pad_token_id: int
    eos_token_id: int | None
    bos_token_id: int | None
    name: str = ""  # the engine's name (its directory when exported)
    source: str = ""  # what it was exported from: a hub id or a checkpoint directory

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "ffn_dim", "vocab_size", "word_embed_proj_dim",
                  "max_positions"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{f}={v!r} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        for f in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size):
                raise ValueError(f"model.{f}={v!r} must be a token id in [0, {self.vocab_size})")
        if not isinstance(self.pre_layer_norm, bool):
            raise ValueError(f"model.pre_layer_norm={self.pre_layer_norm!r} must be true or false")
        for f in ("name", "source"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"model.{f}={getattr(self, f)!r} must be a string")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, cfg, name: str = "", source: str = "") -> OPTShape:
        """From a transformers `OPTConfig` (read by attribute: no transformers import here)."""
        if getattr(cfg, "model_type", None) != "opt":
            raise ModelError(f"model_type={getattr(cfg, 'model_type', None)!r} is not supported: only 'opt' models")
        return cls(
            num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size, word_embed_proj_dim=cfg.word_embed_proj_dim,
            max_positions=cfg.max_position_embeddings, pre_layer_norm=bool(cfg.do_layer_norm_before),
            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 1,
            eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id, name=name, source=source)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WeightEntry:
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


GRAPH_KINDS = ("prefill", "decode", "verify", "verify_row", "draft")


@dataclass(frozen=True)
class GraphSpec:
    name: str
    # "prefill" | "decode" | "verify" (lossless mode's full-depth check of drafted tokens, any batch) | "verify_row"
    # (the same for one row, in place: gqa engines) | "draft" (lossless mode's draft: a decode graph of one bucket on
    # the quantized copy of the weights named in `Manifest.drafts`; never a SkipDecode bucket)
    kind: str
    file: str
    budget: int  # layers executed
    layers: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: tuple[str, ...]  # names of the shared-weights entries this graph uses


@dataclass(frozen=True)
class Manifest:
    model: OPTShape
    dtype: str
    warmup_layers: int
    attention: str  # decode attention flavour, runtime/contract.py ("gqa" | "matmul")
    max_batch: int
    max_length: int
    graphs: tuple[GraphSpec, ...]
    weights_file: str
    weights_size: int
    weights: dict[str, WeightEntry]
    schedule_defaults: dict
    tokenizer: str | None = None
    tools: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    # {"algorithm", "chunk_bytes", "files": {name: hex digest}} of weights, graphs and tokenizer (runtime/integrity.py)
    integrity: dict = field(default_factory=dict)
    attention_reason: str = ""  # why the exporter chose `attention` ("requested", or the automatic choice's reason)
    # weight quantization (`skipdecode export --quantize`): scheme, op, bits, block size, quantized tensors
    # (export/quantize.py); {} for float weights. The graphs carry the quantized ops: the runtime needs nothing else.
    quantization: dict = field(default_factory=dict)
    # weights every graph reads only as the weight operand of an operator that onnxruntime's CPU kernels pre-pack
    # (MatMul, Gemm, MatMulNBits, DynamicQuantizeMatMul): with shared pre-packing the runtime releases their
    # unpacked bytes after load (ort_backend.py). Empty for engines exported before the field existed.
    prepacked: tuple[str, ...] = ()
    # lossless mode's quantized drafts, {} when the engine has none: {"scheme": the quantization scheme, "graphs":
    # {bucket (a string, JSON keys are): graph name}, "quantization": what `quantization` holds for a quantized
    # engine, for the draft graphs' weights}. Those graphs draft; "verify"/"verify_row" (float weights) verify.
    drafts: dict = field(default_factory=dict)
    # lossless mode's automatic drafting policy, measured on this model at export (export/lossless_tune.py):
    # {"draft_speedup", "draft_tokens", "stop_below", "measured": the timings it was chosen by}; {} (engines exported
    # before it, or without measuring): the runtime's defaults (`DraftPolicy()`)
    lossless: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(g.budget for g in self.graphs if g.kind == "decode"))

    def prefill(self) -> GraphSpec:
        return next(g for g in self.graphs if g.kind == "prefill")

    def decode(self, budget: int) -> GraphSpec:
        return next(g for g in self.graphs if g.kind == "decode" and g.budget == budget)

    @property
    def draft_buckets(self) -> tuple[int, ...]:
        """Buckets with a quantized draft graph (lossless mode); () for engines without."""
        return tuple(sorted(g.budget for g in self.graphs if g.kind == "draft"))

    def draft(self, budget: int) -> GraphSpec:
        return next(g for g in self.graphs if g.kind == "draft" and g.budget == budget)

    @property
    def draft_policy(self) -> DraftPolicy:
        if not self.lossless:
            return DraftPolicy()
        return DraftPolicy(self.lossless["draft_speedup"], self.lossless["draft_tokens"], self.lossless["stop_below"])

    def without_drafts(self) -> Manifest:
        """The engine as a backend that does not run the quantized draft graphs sees it (lossless mode then drafts
        with the float buckets)."""
        return replace(self, graphs=tuple(g for g in self.graphs if g.kind != "draft"), drafts={})

    def unread_weights(self) -> tuple[str, ...]:
        """The weights of the file that none of these graphs reads (another kernel form's weight set, or the drafts'
        when a backend leaves them out): a backend need not keep their bytes."""
        read = {w for g in self.graphs for w in g.weights}
        return tuple(n for n in self.weights if n not in read)

    def verify(self, kind: str = "verify") -> GraphSpec | None:
        """A verify graph of lossless mode ("verify" or "verify_row"); None for engines exported without one."""
        return next((g for g in self.graphs if g.kind == kind), None)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(self.to_json())


def aside_prefix(directory: Path) -> str:
    """Name prefix of the copy an export moves an existing engine to while it swaps in the new one (export/target.py
    appends the exporting process's id): `load_manifest` names it when the engine itself is missing."""
    return f".{directory.name}.old-"


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/manifest.json` and the files it names; raise EngineError naming the problem.
    Content hashes are not checked here (that reads every byte): `Engine.load` does, runtime/integrity.py."""
    directory = Path(directory)
    if not directory.is_dir():
        pattern = f"{glob.escape(aside_prefix(directory))}*"
        aside = sorted(directory.parent.glob(pattern)) if directory.parent.is_dir() else []
        if aside:  # an export was killed between moving the old engine aside and renaming the new one in
            raise EngineError(f"engine directory {directory} does not exist, but an interrupted export left the "
                              f"previous engine at {aside[-1]}: restore it with `mv {aside[-1]} {directory}` (the "
                              f"next export to {directory} also restores it)")
        raise EngineError(f"engine directory {directory} does not exist (build it with `skipdecode export`)")
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{path} is missing: {directory} is not an engine directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is corrupted: {exc}") from exc
    except RecursionError:
        raise EngineError(f"{path} is corrupted: its JSON nests deeper than Python's recursion limit") from None
    fmt = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    if fmt != FORMAT:
        raise EngineError(f"{path} is not a {FORMAT} manifest (format={fmt!r})")
    version = raw.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise EngineError(f"{path} has format_version={version!r}; this runtime reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}: re-export the model with this version of "
                          "skipdecode")
    man = parse_manifest(raw)
    check_manifest(man)
    check_files(directory, man)
    return man


def parse_manifest(raw: dict) -> Manifest:
    """Typed fields from the JSON object; every field strictly (runtime/fields.py). Cross-field rules:
    runtime/manifest_check.py."""
    m = "manifest"
    model = _model(F.need(raw, "model", m))
    graphs = F.seq(F.need(raw, "graphs", m), f"{m}.graphs")
    tokenizer = raw.get("tokenizer")
    return Manifest(
        model=model, dtype=F.text(F.need(raw, "dtype", m), f"{m}.dtype", ("float32", "float16")),
        warmup_layers=F.integer(F.need(raw, "warmup_layers", m), f"{m}.warmup_layers", 0, model.num_layers),
        attention=F.text(F.need(raw, "attention", m), f"{m}.attention", ATTENTIONS),
        max_batch=F.integer(F.need(raw, "max_batch", m), f"{m}.max_batch", 1, MAX_BATCH),
        max_length=F.integer(F.need(raw, "max_length", m), f"{m}.max_length", 2, model.max_positions),
        graphs=tuple(_graph(g, f"{m}.graphs[{i}]") for i, g in enumerate(graphs)),
        weights_file=F.file_name(F.need(raw, "weights_file", m), f"{m}.weights_file"),
        weights_size=F.integer(F.need(raw, "weights_size", m), f"{m}.weights_size", 0),
        weights={F.text(k, f"{m}.weights key"): _weight(v, f"{m}.weights[{k!r}]")
                 for k, v in F.obj(F.need(raw, "weights", m), f"{m}.weights").items()},
        schedule_defaults=F.obj(raw.get("schedule_defaults", {}), f"{m}.schedule_defaults"),
        tokenizer=None if tokenizer is None else F.file_name(tokenizer, f"{m}.tokenizer"),
        tools=F.obj(raw.get("tools", {}), f"{m}.tools"), parity=F.obj(raw.get("parity", {}), f"{m}.parity"),
        integrity=_integrity(F.need(raw, "integrity", m), f"{m}.integrity"),
        attention_reason=F.text(raw.get("attention_reason", ""), f"{m}.attention_reason"),
        quantization=F.obj(raw.get("quantization", {}), f"{m}.quantization"),
        prepacked=tuple(F.text(x, f"{m}.prepacked") for x in F.seq(raw.get("prepacked", []), f"{m}.prepacked")),
        drafts=_drafts(raw.get("drafts", {}), f"{m}.drafts"),
        lossless=_lossless(raw.get("lossless", {}), f"{m}.lossless"),
        format_version=raw.get("format_version", FORMAT_VERSION))


_MODEL_FIELDS = {f.name: f for f in fields(OPTShape)}


def _model(raw: object) -> OPTShape:
    d = F.obj(raw, "manifest.model")
    unknown = sorted(set(d) - set(_MODEL_FIELDS))
    if unknown:
        raise EngineError(f"manifest.model has an unknown field {unknown[0]!r}")
    for name, f in _MODEL_FIELDS.items():
        if name not in d and f.default is MISSING:
            raise EngineError(f"manifest.model.{name} is missing")
    try:
        return OPTShape(**d)
    except ValueError as exc:
        raise EngineError(f"manifest {exc}") from exc


def _tensor(raw: object, where: str) -> TensorSpec:
    shape = F.seq(F.need(raw, "shape", where), f"{where}.shape")
    for i, dim in enumerate(shape):
        if not isinstance(dim, str):
            F.integer(dim, f"{where}.shape[{i}]", lo=1)
    return TensorSpec(F.text(F.need(raw, "name", where), f"{where}.name"),
                      F.text(F.need(raw, "dtype", where), f"{where}.dtype", IO_DTYPES), tuple(shape))


def _graph(raw: object, where: str) -> GraphSpec:
    return GraphSpec(
        name=F.text(F.need(raw, "name", where), f"{where}.name"),
        kind=F.text(F.need(raw, "kind", where), f"{where}.kind", GRAPH_KINDS),
        file=F.file_name(F.need(raw, "file", where), f"{where}.file"),
        budget=F.integer(F.need(raw, "budget", where), f"{where}.budget", 1),
        layers=tuple(F.integer(x, f"{where}.layers", 0) for x in F.seq(F.need(raw, "layers", where),
                                                                        f"{where}.layers")),
        inputs=tuple(_tensor(x, f"{where}.inputs[{i}]")
                     for i, x in enumerate(F.seq(F.need(raw, "inputs", where), f"{where}.inputs"))),
        outputs=tuple(_tensor(x, f"{where}.outputs[{i}]")
                      for i, x in enumerate(F.seq(F.need(raw, "outputs", where), f"{where}.outputs"))),
        weights=tuple(F.text(x, f"{where}.weights") for x in F.seq(F.need(raw, "weights", where),
                                                                   f"{where}.weights")))


def _weight(raw: object, where: str) -> WeightEntry:
    dtype = F.text(F.need(raw, "dtype", where), f"{where}.dtype", WEIGHT_DTYPES)
    shape = tuple(F.integer(x, f"{where}.shape", 0) for x in F.seq(F.need(raw, "shape", where), f"{where}.shape"))
    offset = F.integer(F.need(raw, "offset", where), f"{where}.offset", 0)
    nbytes = F.integer(F.need(raw, "nbytes", where), f"{where}.nbytes", 0)
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes != want:
        raise EngineError(f"{where}.nbytes={nbytes} does not match its shape {list(shape)} x {dtype} = {want} bytes")
    return WeightEntry(dtype, shape, offset, nbytes)


def _drafts(raw: object, where: str) -> dict:
    d = F.obj(raw, where)
    if not d:
        return {}
    graphs = F.obj(F.need(d, "graphs", where), f"{where}.graphs")
    for key, name in graphs.items():
        if not key.isdigit():
            raise EngineError(f"{where}.graphs key {key!r} must be a bucket (a positive integer)")
        F.text(name, f"{where}.graphs[{key!r}]")
    return {"scheme": F.text(F.need(d, "scheme", where), f"{where}.scheme"), "graphs": dict(graphs),
            "quantization": F.obj(F.need(d, "quantization", where), f"{where}.quantization")}


def _lossless(raw: object, where: str) -> dict:
    d = F.obj(raw, where)
    if not d:
        return {}
    stop = d.get("stop_below")
    policy = DraftPolicy(F.number(F.need(d, "draft_speedup", where), f"{where}.draft_speedup"),
                         F.integer(F.need(d, "draft_tokens", where), f"{where}.draft_tokens", 0, MAX_POLICY_TOKENS),
                         None if stop is None else F.number(stop, f"{where}.stop_below"))
    return policy.as_dict() | {"measured": F.obj(d.get("measured", {}), f"{where}.measured")}


def _integrity(raw: object, where: str) -> dict:
    # fixed-length digests only (shake_* need a length)
    algorithm = F.text(F.need(raw, "algorithm", where), f"{where}.algorithm",
                       tuple(sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))))
    chunk = F.integer(F.need(raw, "chunk_bytes", where), f"{where}.chunk_bytes", 2**12, 2**34)
    files = F.obj(F.need(raw, "files", where), f"{where}.files")
    return {"algorithm": algorithm, "chunk_bytes": chunk,
            "files": {F.file_name(k, f"{where}.files key"): F.text(v, f"{where}.files[{k!r}]")
                      for k, v in files.items()}}
