"""Recorders shared by test modules: what a backend's slot API returned, and what an NVTX domain was asked to emit."""

from __future__ import annotations

import numpy as np


def record(backend) -> dict[int, list[np.ndarray]]:
    """Wrap a backend's slot API; -> {slot: logits of every call that advanced it} (copies: a backend's logits
    buffer is only valid until its next call)."""
    rec: dict[int, list[np.ndarray]] = {}
    prefill_rows, decode_rows = backend.prefill_rows, backend.decode_rows

    def prefill(prompts, slots):
        out = prefill_rows(prompts, slots)
        for i, slot in enumerate(slots):
            rec.setdefault(slot, []).append(out[i].copy())
        return out

    def decode(slots, tokens, bucket, gates):
        out = decode_rows(slots, tokens, bucket, gates)
        for slot in slots:
            rec[slot].append(out[slot].copy())
        return out

    backend.prefill_rows, backend.decode_rows = prefill, decode
    return rec


class RecordingDomain:
    """Records what a real `nvtx.Domain` would be asked to emit."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.attribute_calls = 0

    def get_event_attributes(self, message=None, color=None, category=None, payload=None):
        self.attribute_calls += 1
        return {"message": message, "category": category, "payload": payload}

    def push_range(self, attributes) -> None:
        self.events.append(("push", attributes))

    def pop_range(self) -> None:
        self.events.append(("pop",))
