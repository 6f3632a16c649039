"""The engine directory's self-description (`manifest.json`), versioned and validated on load.

The exporter writes it; the runtime never re-derives what the exporter knew (layers per graph, I/O names,
weights offsets, model shape, schedule defaults). A manifest of another format version is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .contract import ATTENTIONS, TensorSpec
from .errors import EngineError, ModelError

FORMAT = "skipdecode-engine"
FORMAT_VERSION = 2  # 2: ragged slot KV layout, past_length/gate inputs, `attention` flavour
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
WEIGHTS_ALIGN = 64  # bytes; every tensor starts on a cache-line boundary of the shared weights file


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


@dataclass(frozen=True)
class GraphSpec:
    name: str
    kind: str  # "prefill" | "decode"
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

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(self.to_json())


def _graph_from_dict(d: dict) -> GraphSpec:
    return GraphSpec(name=d["name"], kind=d["kind"], file=d["file"], budget=int(d["budget"]),
                     layers=tuple(d["layers"]), inputs=tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
                     outputs=tuple(TensorSpec.from_dict(x) for x in d["outputs"]), weights=tuple(d["weights"]))


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/manifest.json` and the files it names; raise EngineError naming the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"engine directory {directory} does not exist (build it with `skipdecode export`)")
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{path} is missing: {directory} is not an engine directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is corrupted: {exc}") from exc
    fmt = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    if fmt != FORMAT:
        raise EngineError(f"{path} is not a {FORMAT} manifest (format={fmt!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path} has format_version={raw.get('format_version')!r}; this runtime reads version "
                          f"{FORMAT_VERSION}: re-export the model with this version of skipdecode")
    try:
        man = Manifest(
            model=OPTShape(**raw["model"]), dtype=raw["dtype"], warmup_layers=int(raw["warmup_layers"]),
            attention=raw["attention"], max_batch=int(raw["max_batch"]), max_length=int(raw["max_length"]),
            graphs=tuple(_graph_from_dict(g) for g in raw["graphs"]), weights_file=raw["weights_file"],
            weights_size=int(raw["weights_size"]),
            weights={k: WeightEntry(v["dtype"], tuple(v["shape"]), int(v["offset"]), int(v["nbytes"]))
                     for k, v in raw["weights"].items()},
            schedule_defaults=raw.get("schedule_defaults", {}), tokenizer=raw.get("tokenizer"),
            tools=raw.get("tools", {}), parity=raw.get("parity", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{path} is corrupted: missing or invalid field {exc}") from exc
    _check_files(directory, man)
    return man


def _check_files(directory: Path, man: Manifest) -> None:
    L = man.num_layers
    if man.attention not in ATTENTIONS:
        raise EngineError(f"manifest attention={man.attention!r} is not one of {list(ATTENTIONS)}")
    kinds = [g.kind for g in man.graphs]
    if kinds.count("prefill") != 1:
        raise EngineError(f"manifest lists {kinds.count('prefill')} prefill graphs; expected exactly 1")
    if L not in man.buckets:
        raise EngineError(f"manifest decode buckets {list(man.buckets)} lack the full-depth budget {L}")
    weights = directory / man.weights_file
    if not weights.is_file():
        raise EngineError(f"shared weights file {weights} is missing")
    size = weights.stat().st_size
    if size != man.weights_size:
        raise EngineError(f"shared weights file {weights} has {size} bytes; the manifest expects {man.weights_size}")
    for g in man.graphs:
        if not (directory / g.file).is_file():
            raise EngineError(f"graph file {directory / g.file} ({g.name}) is missing")
        missing = [w for w in g.weights if w not in man.weights]
        if missing:
            raise EngineError(f"graph {g.name} uses weight {missing[0]!r} that the manifest does not list")
    for name, w in man.weights.items():
        if w.offset + w.nbytes > man.weights_size:
            raise EngineError(f"weight {name!r} ends at byte {w.offset + w.nbytes}, past the file size {size}")
    if man.tokenizer is not None and not (directory / man.tokenizer).is_file():
        raise EngineError(f"tokenizer file {directory / man.tokenizer} is missing")
