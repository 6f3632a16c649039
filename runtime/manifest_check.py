"""Cross-field rules of a parsed manifest (runtime/manifest.py parses each field on its own) and the files it
names. Everything here is cheap; the content hashes are verified by runtime/integrity.py when an engine loads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import contract as C
from .errors import EngineError, ScheduleError
from .schedule import layers_for_budget

if TYPE_CHECKING:
    from .manifest import Manifest


def check_manifest(man: Manifest) -> None:
    """Graphs consistent with the model and budgets, weights inside the file and disjoint, hashes for every file."""
    _check_graphs(man)
    _check_drafts(man)
    _check_weights(man)
    _check_integrity(man)


def _check_graphs(man: Manifest) -> None:
    L, w = man.num_layers, man.warmup_layers
    kinds = [g.kind for g in man.graphs]
    if kinds.count("prefill") != 1:
        raise EngineError(f"manifest lists {kinds.count('prefill')} prefill graphs; expected exactly 1")
    for kind in ("verify", "verify_row"):
        if kinds.count(kind) > 1:
            raise EngineError(f"manifest lists {kinds.count(kind)} {kind} graphs; expected at most 1")
    if L not in man.buckets:
        raise EngineError(f"manifest decode buckets {list(man.buckets)} lack the full-depth budget num_layers={L}")
    if len(set(man.buckets)) != len(man.buckets):
        raise EngineError(f"manifest decode buckets {list(man.buckets)} list a budget twice")
    for g in man.graphs:
        if g.kind in ("prefill", "verify", "verify_row"):
            want = tuple(range(L))
        else:  # decode and draft graphs: one bucket's layers
            try:
                want = layers_for_budget(L, g.budget, w)
            except ScheduleError as exc:
                raise EngineError(f"manifest graph {g.name}: {exc} (num_layers={L}, warmup_layers={w})") from exc
        if g.budget != len(want) or g.layers != want:
            raise EngineError(f"manifest graph {g.name} has budget {g.budget} and layers {list(g.layers)}; "
                              f"num_layers={L} and warmup_layers={w} give layers {list(want)}")
        missing = [x for x in g.weights if x not in man.weights]
        if missing:
            raise EngineError(f"graph {g.name} uses weight {missing[0]!r} that the manifest does not list")
        _check_io(man, g)


def _check_io(man: Manifest, g) -> None:
    """A graph's inputs and outputs are those runtime/contract.py gives for the model's shape: an edited
    hidden_size, head count or vocab_size is refused here, not by the first request."""
    m = man.model
    if m.hidden_size % m.num_heads:
        raise EngineError(f"manifest.model.hidden_size={m.hidden_size} is not a multiple of num_heads={m.num_heads}")
    args = (m.num_heads, m.head_dim, m.vocab_size, man.dtype)
    if g.kind == "prefill":
        want = C.prefill_io(man.num_layers, *args)
    elif g.kind in ("decode", "draft"):
        want = C.decode_io(g.layers, *args, man.attention)
    else:
        want = C.verify_io(man.num_layers, *args, "gqa" if g.kind == "verify_row" else "matmul")
    for got, expected, what in ((g.inputs, want[0], "inputs"), (g.outputs, want[1], "outputs")):
        if tuple(got) != tuple(expected):
            pairs = enumerate(zip(got, expected, strict=False))
            bad = next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))
            have = got[bad] if bad < len(got) else "nothing"
            need = expected[bad] if bad < len(expected) else "nothing"
            raise EngineError(f"graph {g.name} {what}[{bad}] is {have}; the model in the manifest (hidden_size "
                              f"{m.hidden_size}, {m.num_heads} heads, vocab_size {m.vocab_size}, {man.dtype}) needs "
                              f"{need}")


def _check_drafts(man: Manifest) -> None:
    """Quantized draft graphs (lossless mode): each drafts for one exported bucket below full depth, and the `drafts`
    section names exactly those graphs. They only propose tokens that float verify graphs check, so an engine whose
    own weights are quantized (its verify pass too) has none."""
    drafts = [g for g in man.graphs if g.kind == "draft"]
    named = {int(k): v for k, v in man.drafts.get("graphs", {}).items()}
    have = {g.budget: g.name for g in drafts}
    if len(have) != len(drafts):
        raise EngineError(f"manifest lists two draft graphs for one bucket: {sorted(g.budget for g in drafts)}")
    if named != have:
        raise EngineError(f"manifest.drafts.graphs {dict(sorted(named.items()))} does not match the draft graphs "
                          f"{dict(sorted(have.items()))}")
    if not drafts:
        return
    if man.quantization:
        raise EngineError("manifest lists draft graphs on an engine whose own weights are quantized: drafts are "
                          "quantized copies for a float engine's lossless mode")
    if man.verify() is None:
        raise EngineError("manifest lists draft graphs but no verify graph to check their tokens")
    for g in drafts:
        if g.budget not in man.buckets or g.budget >= man.num_layers:
            raise EngineError(f"draft graph {g.name} drafts for bucket {g.budget}, which is not an exported bucket "
                              f"below full depth (buckets {list(man.buckets)})")


def _check_weights(man: Manifest) -> None:
    """Every range inside the file and no two overlapping: two weights aliased to one offset load and run, and
    generate garbage ("the the the ...")."""
    end, prev = 0, None
    for name, w in sorted(man.weights.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if w.offset + w.nbytes > man.weights_size:
            raise EngineError(f"weight {name!r} ends at byte {w.offset + w.nbytes}, past the weights file size "
                              f"{man.weights_size}")
        if w.nbytes and w.offset < end:
            raise EngineError(f"weights {prev!r} and {name!r} overlap: {name!r} starts at byte {w.offset}, before "
                              f"{prev!r} ends at byte {end}")
        if w.nbytes:
            end, prev = w.offset + w.nbytes, name
    unknown = [x for x in man.prepacked if x not in man.weights]
    if unknown:
        raise EngineError(f"manifest.prepacked names {unknown[0]!r}, which is not a weight of this engine")


def _check_integrity(man: Manifest) -> None:
    files = man.integrity["files"]
    needed = [man.weights_file, *(g.file for g in man.graphs), *([man.tokenizer] if man.tokenizer else [])]
    missing = [f for f in needed if f not in files]
    if missing:
        raise EngineError(f"manifest.integrity has no hash of {missing[0]!r}: every file the runtime reads is "
                          "hashed at export")


def check_files(directory: Path, man: Manifest) -> None:
    """The named files exist (and the weights file has the recorded size)."""
    weights = directory / man.weights_file
    if not weights.is_file():
        raise EngineError(f"shared weights file {weights} is missing")
    size = weights.stat().st_size
    if size != man.weights_size:
        raise EngineError(f"shared weights file {weights} has {size} bytes; the manifest expects {man.weights_size}")
    for g in man.graphs:
        if not (directory / g.file).is_file():
            raise EngineError(f"graph file {directory / g.file} ({g.name}) is missing")
    if man.tokenizer is not None and not (directory / man.tokenizer).is_file():
        raise EngineError(f"tokenizer file {directory / man.tokenizer} is missing")
    for name in man.integrity["files"]:
        if not (directory / name).is_file():
            raise EngineError(f"manifest.integrity hashes {name!r}, which is not a file of {directory}")
