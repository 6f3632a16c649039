"""The graph I/O contract: the one owner of tensor names, dtypes and symbolic shapes.

The exporter traces graphs with exactly these names; the runtime binds buffers by these names and checks them
against each loaded session. Symbolic dims: `batch`, `seq` (prompt length of a prefill), `max_length` (columns
of the KV buffer view of one generation call).

KV layout: every layer owns K and V buffers of shape [batch, heads, max_length, head_dim]. A decode graph reads
the whole buffer view (columns not yet written are masked out by `attention_mask`), computes the new token's
K/V itself, and returns them as `new.<l>.key/value` [batch, heads, 1, head_dim]; the runtime writes them into
column `c` of the buffer. Nothing proportional to the cache is copied per step outside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"


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


def decode_io(layers: Sequence[int], heads: int, head_dim: int, vocab: int, dtype: str
              ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Decode: one new token per row through `layers`; K/V in and out only for those layers."""
    ins = [TensorSpec(INPUT_IDS, "int64", ("batch", 1)), TensorSpec(POSITION_IDS, "int64", ("batch", 1)),
           TensorSpec(ATTENTION_MASK, "int64", ("batch", "max_length"))]
    outs = [TensorSpec(LOGITS, "float32", ("batch", vocab))]
    for layer in layers:
        ins += [TensorSpec(past_key(layer), dtype, ("batch", heads, "max_length", head_dim)),
                TensorSpec(past_value(layer), dtype, ("batch", heads, "max_length", head_dim))]
        outs += [TensorSpec(new_key(layer), dtype, ("batch", heads, 1, head_dim)),
                 TensorSpec(new_value(layer), dtype, ("batch", heads, 1, head_dim))]
    return ins, outs


def dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for these specs."""
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}
