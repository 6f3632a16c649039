"""The graph I/O contract: the one owner of tensor names, dtypes and symbolic shapes.

The exporter traces graphs with exactly these names; the runtime binds buffers by these names and checks them
against each loaded session. Symbolic dims: `batch`, `seq` (prompt length of a prefill), `max_length` (columns
of a KV slot).

KV layout (ragged): every layer owns K and V buffers [slots, heads, max_length, head_dim]; row i is KV slot i and
a sequence's tokens occupy columns [0, n) of its slot with no padding, so token j of a sequence sits at column j
and has position j. A decode graph gets `past_length` [batch] (n of each row: the new token's column and
position) and the slots' buffers; rows may have different lengths (continuous batching needs nothing else).

Decode attention comes in two flavours (manifest field `attention`):
* `gqa` (onnxruntime): com.microsoft GroupQueryAttention with the past and present K/V bound to the same
  buffer. Each row attends over its own n + 1 columns only and the op writes the new column in place, so a
  step costs attention over the real length and copies nothing. Outputs `present.<l>.key/value` (= the
  buffers). `kv_length` is the op's total sequence length, max(past_length) + 1.
* `matmul` (standard ONNX ops, for TensorRT): attends over the whole bound buffer with a mask built from
  `past_length` and returns the new token's K/V as `new.<l>.key/value` [batch, heads, 1, head_dim]; the
  runtime writes them into column past_length[i] of row i.

The verify graph (lossless mode, docs/DESIGN.md) runs `seq` new tokens per row through every layer: inputs
`input_ids` [batch, seq] (row i's tokens at columns past_length[i] ..), `past_length` and every layer's K/V buffers;
outputs `logits` [batch, seq, vocab] and the new tokens' K/V `new.<l>.key/value` [batch, heads, seq, head_dim] in
standard ops for every engine (onnxruntime's GroupQueryAttention takes several new tokens only at batch 1); the
runtime writes the accepted rows' columns into the buffers. gqa engines also carry `verify_row`, the same pass for one
row with GroupQueryAttention writing in place (inputs as above plus `kv_length`; outputs `present.*`), which the
runtime uses for calls that verify a single row.

`gate` [batch, layers of the graph] (bool) lets rows of one call run different layer sets: a row whose gate is
off for a layer passes through it unchanged (continuous batching runs the deepest row's graph; static batches
set every gate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
PAST_LENGTH = "past_length"
KV_LENGTH = "kv_length"
GATE = "gate"
LOGITS = "logits"
ATTENTIONS = ("gqa", "matmul")


def past_key(layer: int) -> str:
    return f"past.{layer}.key"


def past_value(layer: int) -> str:
    return f"past.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def new_key(layer: int) -> str:
    return f"new.{layer}.key"


def new_value(layer: int) -> str:
    return f"new.{layer}.value"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[int | str, ...]  # ints are fixed dims, strings symbolic

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


def prefill_io(num_layers: int, heads: int, head_dim: int, vocab: int, dtype: str
               ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Prefill: the whole prompt at full depth; logits of the last column and every layer's K/V."""
    ids = [TensorSpec(n, "int64", ("batch", "seq")) for n in (INPUT_IDS, POSITION_IDS, ATTENTION_MASK)]
    kv = ("batch", heads, "seq", head_dim)
    outs = [TensorSpec(LOGITS, "float32", ("batch", vocab))]
    for layer in range(num_layers):
        outs += [TensorSpec(present_key(layer), dtype, kv), TensorSpec(present_value(layer), dtype, kv)]
    return ids, outs


def decode_io(layers: Sequence[int], heads: int, head_dim: int, vocab: int, dtype: str, attention: str
              ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Decode: one new token per row through `layers`; K/V in and out only for those layers."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTIONS}")
    kv = ("batch", heads, "max_length", head_dim)
    ins = [TensorSpec(INPUT_IDS, "int64", ("batch", 1)), TensorSpec(PAST_LENGTH, "int32", ("batch",))]
    if attention == "gqa":
        ins.append(TensorSpec(KV_LENGTH, "int32", ()))
    ins.append(TensorSpec(GATE, "bool", ("batch", len(layers))))
    outs = [TensorSpec(LOGITS, "float32", ("batch", vocab))]
    for layer in layers:
        ins += [TensorSpec(past_key(layer), dtype, kv), TensorSpec(past_value(layer), dtype, kv)]
        if attention == "gqa":
            outs += [TensorSpec(present_key(layer), dtype, kv), TensorSpec(present_value(layer), dtype, kv)]
        else:
            outs += [TensorSpec(new_key(layer), dtype, ("batch", heads, 1, head_dim)),
                     TensorSpec(new_value(layer), dtype, ("batch", heads, 1, head_dim))]
    return ins, outs


def verify_io(num_layers: int, heads: int, head_dim: int, vocab: int, dtype: str, attention: str = "matmul"
              ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Verify: `seq` new tokens per row through every layer against the slot buffers; logits of every new column.
    matmul: outputs the new columns' K/V (written into the buffers by the runtime), any batch. gqa (the `verify_row`
    graph of gqa engines): one row, the K/V written in place (present = past), `kv_length` = past_length + seq."""
    kv = ("batch", heads, "max_length", head_dim)
    new = ("batch", heads, "seq", head_dim)
    ins = [TensorSpec(INPUT_IDS, "int64", ("batch", "seq")), TensorSpec(PAST_LENGTH, "int32", ("batch",))]
    if attention == "gqa":
        ins.append(TensorSpec(KV_LENGTH, "int32", ()))
    outs = [TensorSpec(LOGITS, "float32", ("batch", "seq", vocab))]
    for layer in range(num_layers):
        ins += [TensorSpec(past_key(layer), dtype, kv), TensorSpec(past_value(layer), dtype, kv)]
        if attention == "gqa":
            outs += [TensorSpec(present_key(layer), dtype, kv), TensorSpec(present_value(layer), dtype, kv)]
        else:
            outs += [TensorSpec(new_key(layer), dtype, new), TensorSpec(new_value(layer), dtype, new)]
    return ins, outs


def dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for these specs."""
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}
