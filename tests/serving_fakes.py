"""A deterministic numpy stand-in for the onnxruntime backend's slot API, with a KV-invariant checker.

`FakeSlotBackend` keeps, per layer, which token each (slot, column) K/V entry was computed from, or EMPTY /
POISON (written by a gated-off layer: a pass-through value that must never be read). A row that runs a layer
over a column that is not a real entry of its own sequence raises `KVInvariantError`. Logits are a seeded
function of (the context tokens, the layers the row ran), so a row that runs a different layer set than its
schedule gives different tokens. It is a `SlotBackend`, so `Generator(fake, ...).generate([prompt], opts)` (the
static path) is the solo-run reference. `FakeVerifyBackend` adds the full-depth verify pass (several new tokens per
row), so lossless rounds and chunked prefill run on it too. Every backend call is logged in order (`log`).
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from contextlib import contextmanager

import numpy as np
from skipdecode.runtime.generator import Generator
from skipdecode.runtime.schedule import layers_for_budget
from skipdecode.runtime.slot_backend import SlotBackend

EMPTY, POISON = -1, -2
VOCAB = 50
EOS = 2


class KVInvariantError(AssertionError):
    """A row read K/V that its own sequence never computed in that layer."""


class FakeSlotBackend(SlotBackend):
    def __init__(self, num_layers: int = 6, buckets: tuple[int, ...] = (2, 3, 4, 6), warmup: int = 1,
                 max_batch: int = 4, max_length: int = 64, vocab: int = VOCAB, delay_s: float = 0.0) -> None:
        self.num_layers, self.buckets, self.warmup_layers = num_layers, buckets, warmup
        self.max_batch, self.max_length, self.vocab, self.delay_s = max_batch, max_length, vocab, delay_s
        self.vocab_size, self.pad_token_id = vocab, 1
        self._init_slots()
        self.kv = np.full((num_layers, max_batch, max_length), EMPTY, dtype=np.int64)
        self._out = np.zeros((max_batch, vocab), dtype=np.float32)
        self.calls: list[tuple[int, int, int]] = []  # (bucket, rows, rows with any gate on) per decode call
        # every call in order: ("prefill", prompt tokens), ("decode", {slots with a gate on}),
        # ("verify", {slot: tokens})
        self.log: list[tuple[str, object]] = []

    def logits(self, context, layers) -> np.ndarray:
        key = np.asarray(list(context) + [-7] + list(layers), dtype=np.int64).tobytes()
        return (np.random.default_rng(zlib.crc32(key)).standard_normal(self.vocab) * 3).astype(np.float32)

    # -- SlotBackend primitives -----------------------------------------------------------------------------
    def _prefill(self, ids, pos, mask, slots) -> np.ndarray:
        assert len(ids) == len(slots) == len(set(slots)) and len(ids) <= self.max_batch
        prompts = [[int(t) for t in row[m.astype(bool)]] for row, m in zip(ids, mask, strict=True)]
        self.log.append(("prefill", sum(len(p) for p in prompts)))
        for prompt, slot in zip(prompts, slots, strict=True):
            self.kv[:, slot, :] = EMPTY
            self.kv[:, slot, : len(prompt)] = prompt
        return np.stack([self.logits(p, range(self.num_layers)) for p in prompts])

    def _decode(self, token_ids, lengths, bucket, gates) -> np.ndarray:
        n = len(token_ids)
        graph = layers_for_budget(self.num_layers, bucket, self.warmup_layers)
        assert bucket in self.buckets and gates.shape == (n, bucket) and gates.dtype == bool, (bucket, gates.shape)
        assert n <= self.max_batch and lengths.shape == (n,)
        self.calls.append((bucket, n, int(gates.any(axis=1).sum())))
        self.log.append(("decode", set(np.flatnonzero(gates.any(axis=1)).tolist())))
        if self.delay_s:
            time.sleep(self.delay_s)
        for i in range(n):
            c, tok = int(lengths[i]), int(token_ids[i])
            assert 0 <= c < self.max_length, c
            on = [layer for layer, g in zip(graph, gates[i], strict=True) if g]
            if on:
                self._out[i] = self.logits(self._context(i, c, on) + [tok], on)
            else:
                self._out[i] = 0.0
            for layer, g in zip(graph, gates[i], strict=True):  # like the gqa graphs: every graph layer writes
                self.kv[layer, i, c] = tok if g else POISON
        return self._out[:n]

    def _context(self, slot: int, c: int, layers) -> list[int]:
        ctx = self.kv[layers[0], slot, :c]
        for layer in layers:
            row = self.kv[layer, slot, :c]
            if (row < 0).any() or not (row == ctx).all():
                bad = int(np.argmax((row < 0) | (row != ctx)))
                raise KVInvariantError(f"slot {slot} layer {layer} column {bad} holds {int(row[bad])}: not "
                                       "K/V of this sequence")
        return [int(t) for t in ctx]


class FakeVerifyBackend(FakeSlotBackend):
    """With the full-depth verify pass: S new tokens per row, each attending (through every layer) to its row's
    columns and the new tokens before it, so its logits are those a prefill or a full-depth step gives the same
    context."""

    def _verify(self, ids, lengths, rows) -> np.ndarray:
        n, S = ids.shape
        out = np.zeros((n, S, self.vocab), dtype=np.float32)
        every = list(range(self.num_layers))
        self.log.append(("verify", {int(r): S for r in rows}))
        for r in map(int, rows):
            c = int(lengths[r])
            context = self._context(r, c, every)
            for j in range(S):
                context.append(int(ids[r, j]))
                if c + j < self.max_length:
                    self.kv[:, r, c + j] = context[-1]
                out[r, j] = self.logits(context, every)
        return out


def fake_generator(verify: bool = False, **kw) -> Generator:
    """A `Generator` over a fresh fake backend (pad 1, eos 2): what the service and the solo runs take. `verify`: a
    `FakeVerifyBackend`."""
    backend = (FakeVerifyBackend if verify else FakeSlotBackend)(**kw)
    return Generator(backend, None, pad_token_id=1, eos_token_id=EOS, vocab_size=kw.get("vocab", VOCAB))


def solo(prompt, opts, **backend_kw) -> tuple[list[int], list[int], str]:
    """(tokens, budgets, finish_reason) of `prompt` generated alone on a fresh fake backend: what any batched or
    served run of it must equal."""
    r = fake_generator(**backend_kw).generate([prompt], opts)[0]
    return r.tokens, r.budgets, r.finish_reason


class FailingBackend(FakeSlotBackend):
    """Raises on the decode call number `fail_on` (counting from 1): a backend failure mid-generation."""

    def __init__(self, fail_on: int, **kw) -> None:
        super().__init__(**kw)
        self.fail_on, self.decodes = fail_on, 0

    def _decode(self, token_ids, lengths, bucket, gates):
        self.decodes += 1
        if self.decodes == self.fail_on:
            raise RuntimeError("injected backend failure")
        return super()._decode(token_ids, lengths, bucket, gates)


@contextmanager
def serve_in_thread(app, graceful_s: int = 5, **net):
    """Run an ASGI app under uvicorn on a free loopback port in a daemon thread -> (base url, server). `net`:
    `ServeConfig` connection options (header_timeout, keep_alive_timeout, max_connections)."""
    import uvicorn

    from skipdecode.serve.config import ServeConfig
    from skipdecode.serve.net import uvicorn_config
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, ServeConfig(**net), log_level="warning",
                                           timeout_graceful_shutdown=graceful_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def mixed_bodies(n: int, seed: int = 0, max_prompt: int = 24, max_tokens: tuple[int, int] = (1, 25)) -> list[dict]:
    """Completion request bodies of mixed kinds: prompts of 1..max_prompt - 1 token ids, plain and streamed,
    full depth and speedups 2 and 3, greedy and sampled (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = {"prompt": [int(t) for t in rng.integers(3, 200, int(rng.integers(1, max_prompt)))],
                "max_tokens": int(rng.integers(*max_tokens)), "stream": bool(i % 2)}
        if i % 3:
            body["speedup"] = [2.0, 3.0][i % 2]
        if i % 4 == 1:
            body.update(temperature=0.8, top_p=0.9, seed=i)
        out.append(body)
    return out
