"""Conditional-generation data: JSONL records `{"prompt": ..., "completion": ...}` and their training batches.

A record is encoded the way inference sees it: the prompt with the tokenizer's special tokens (OPT's `</s>`
first, as `TextCodec.encode` does for every prompt), the completion without them plus `</s>` (so the model learns
where to stop). A batch is one static inference batch: prompts left-padded to the longest prompt of the batch
(`P`, the schedule's prompt length, as the runtime pads a static batch), completions after them, right-padded to
`T = seq_len` (the schedule's max length). The loss covers completion tokens only; a completion longer than
`T - P` is cut, as a generation of that batch could not be longer either.

Length bucketing: each epoch's seeded permutation is cut into windows of `BUCKET_BATCHES` batches; a window is
sorted by prompt length, cut into batches, and its batches are shuffled. Batches then hold similar prompt lengths
(little padding, a P close to each row's own), while the order stays a pure function of (seed, step).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import InputError
from .corpus import jsonl_lines

PAD_ID = 1  # OPT's pad id: left padding of prompts, right padding after the completion
EOS_ID = 2
BUCKET_BATCHES = 16


@dataclass(frozen=True)
class TaskRecord:
    prompt: str
    completion: str
    source: str  # "file:line", for error messages


def is_task_file(path: str | Path) -> bool:
    """A `.jsonl` file whose first record has a `prompt` field (a `text` field is plain text)."""
    p = Path(path)
    if p.suffix not in (".jsonl", ".json") or not p.is_file():
        return False
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the text reader reports the bad line
                return isinstance(obj, dict) and "prompt" in obj
    return False


def read_task_records(paths: Sequence[str | Path]) -> list[TaskRecord]:
    """Every record of every file; a bad one is a one-line error naming its file and line."""
    if not paths:
        raise InputError("no task files given: pass at least one JSONL file of {\"prompt\", \"completion\"}")
    records = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(f"task file {p} does not exist (or is not a file)")
        for n, obj in jsonl_lines(p):
            if not isinstance(obj, dict):
                raise InputError(f"{p}:{n} is a JSON {type(obj).__name__}, not an object with 'prompt' and "
                                 "'completion'")
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise InputError(f"{p}:{n} has no non-empty string field {key!r} (task records are "
                                     "{\"prompt\": ..., \"completion\": ...})")
            records.append(TaskRecord(obj["prompt"], obj["completion"], f"{p}:{n}"))
    if not records:
        raise InputError(f"the task files {', '.join(map(str, paths))} hold no records")
    return records


@dataclass(frozen=True)
class TaskData:
    """Encoded records: prompt ids (with `</s>` first) and completion ids (ending with `</s>`)."""

    prompts: tuple[tuple[int, ...], ...]
    completions: tuple[tuple[int, ...], ...]
    seq_len: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.array([len(p) for p in self.prompts])

    @property
    def target_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def encode_records(records: Sequence[TaskRecord], tokenizer, seq_len: int, vocab_size: int | None = None) -> TaskData:
    """Tokenize; a prompt that leaves no room for one completion token in `seq_len` is an error naming its line."""
    prompts = tokenizer.encode_batch([r.prompt for r in records])
    comps = tokenizer.encode_batch([r.completion for r in records], add_special_tokens=False)
    out_p, out_c = [], []
    for r, p, c in zip(records, prompts, comps, strict=True):
        if len(p.ids) > seq_len - 2:
            raise InputError(f"{r.source}: the prompt has {len(p.ids)} tokens, above the limit of seq_len - 2 = "
                             f"{seq_len - 2}: raise --seq-len or shorten the prompt")
        ids = (*p.ids, *c.ids, EOS_ID)
        if vocab_size is not None and max(ids) >= vocab_size:
            raise InputError(f"{r.source}: the tokenizer produced id {max(ids)}, outside the model's vocabulary "
                             f"[0, {vocab_size})")
        out_p.append(tuple(p.ids))
        out_c.append((*c.ids, EOS_ID))
    return TaskData(tuple(out_p), tuple(out_c), seq_len)


def collate(data: TaskData, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows as one static batch -> (ids [B, T], attention [B, T], target mask [B, T - 1], P).

    Target mask column c scores the prediction of token c + 1 (the pass over column c): completion tokens only."""
    T = data.seq_len
    P = max(len(data.prompts[r]) for r in rows)
    ids = np.full((len(rows), T), PAD_ID, dtype=np.int64)
    attn = np.zeros((len(rows), T), dtype=np.int64)
    target = np.zeros((len(rows), T - 1), dtype=bool)
    for i, r in enumerate(rows):
        p, c = data.prompts[r], data.completions[r][: T - P]
        ids[i, P - len(p): P], ids[i, P: P + len(c)] = p, c
        attn[i, P - len(p): P + len(c)] = 1
        target[i, P - 1: P - 1 + len(c)] = True
    return ids, attn, target, P


def bucketed_order(epoch: int, prompt_lengths: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """One epoch's row order: seeded permutation, sorted by prompt length within windows, batches shuffled."""
    return _bucketed_order(epoch, tuple(int(x) for x in prompt_lengths), batch_size, seed)


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def _bucketed_order(epoch: int, lengths: tuple[int, ...], batch_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, 2])
    perm = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    out = []
    for start in range(0, len(perm), window):
        win = sorted(perm[start: start + window], key=lambda r: lengths[r])  # stable: ties keep the seeded order
        batches = [win[i: i + batch_size] for i in range(0, len(win), batch_size)]
        for b in rng.permutation(len(batches)):
            out += batches[b]
    return np.array(out, dtype=np.int64)
