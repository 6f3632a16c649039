"""Training text: the offline King James Bible corpus, user text/JSONL files, and token chunks for training.

Source of the default corpus: the Debian package `bible-kjv` (Authorized King James Version, 1611; the text
is in the public domain, see the package's copyright file; the `bible` reader program itself is GPL-2+ and
is only run, never shipped). `bible -f Gen1:1-Rev22:21` prints the whole text, one verse per line as
`<Ref> <text>` (about 4.4 MB, 31,102 verses, 1,189 chapters).

Documents: a chapter of the KJV, a blank-line separated block of a plain text file, or the `text` field of
one JSONL line. Documents are joined with `</s>` (id 2) in the token stream, as OPT's pretraining data was.

Held-out split: every `HELDOUT_EVERY`-th chapter (global chapter index % 20 == 19, i.e. 5%) is held out.
Interleaving keeps the held-out text in the same mix of books as the training text; whole trailing books
(Revelation, ...) would measure a change of genre more than generalisation. The KJV repeats itself
(Kings/Chronicles, the synoptic gospels), so some held-out verses have near-copies in training: held-out
numbers are for comparing models and schedules, not a claim of generalisation to other text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import InputError

KJV_RANGE = "Gen1:1-Rev22:21"  # the whole text (the reader clamps to the last verse)
HELDOUT_EVERY = 20
_VERSE = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


@dataclass(frozen=True)
class CorpusFiles:
    """What `write_kjv_corpus` wrote: training and held-out text, one document per blank-line block."""

    train: Path
    heldout: Path
    train_docs: int
    heldout_docs: int


def kjv_chapters(reader: str = "bible") -> list[str]:
    """Every KJV chapter as one document (verses on their own lines, references dropped)."""
    exe = shutil.which(reader)
    if exe is None:
        raise InputError(f"the KJV reader {reader!r} is not installed: `apt-get install -y bible-kjv` "
                         f"(Debian package; the text is public domain)")
    out = subprocess.run([exe, "-f", KJV_RANGE], check=True, capture_output=True, text=True).stdout
    chapters: list[list[str]] = []
    key = None
    for line in out.splitlines():
        m = _VERSE.match(line)
        if m is None:
            continue  # the reader prints nothing else with -f; be strict about what we keep
        if (m["book"], m["chapter"]) != key:
            key = (m["book"], m["chapter"])
            chapters.append([])
        chapters[-1].append(m["text"].strip())
    if not chapters:
        raise InputError(f"`{reader} -f {KJV_RANGE}` printed no verses")
    return ["\n".join(verses) for verses in chapters]


def split_heldout(docs: Sequence[str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """Deterministic split: document i is held out when i % every == every - 1."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    heldout = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, heldout


def write_documents(docs: Iterable[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n\n".join(d.strip() for d in docs) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see a half-written corpus
    return path


def write_kjv_corpus(out_dir: str | Path, reader: str = "bible") -> CorpusFiles:
    """Write `kjv-train.txt` and `kjv-heldout.txt` into `out_dir`."""
    out = Path(out_dir)
    train, heldout = split_heldout(kjv_chapters(reader))
    return CorpusFiles(write_documents(train, out / "kjv-train.txt"),
                       write_documents(heldout, out / "kjv-heldout.txt"), len(train), len(heldout))


def write_sample(docs: Sequence[str], path: str | Path, max_bytes: int = 80_000) -> Path:
    """The first whole documents of `docs` up to `max_bytes` (a small held-out file that can be committed)."""
    kept, size = [], 0
    for d in docs:
        size += len(d.encode("utf-8")) + 2
        if kept and size > max_bytes:
            break
        kept.append(d)
    return write_documents(kept, Path(path))


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Documents of plain text files (blank-line blocks) and JSONL files (`text` field, `.jsonl`/`.json`)."""
    if not paths:
        raise InputError("no data files given: pass at least one text or JSONL file")
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(f"data file {p} does not exist (or is not a file)")
        docs += _read_jsonl(p) if p.suffix in (".jsonl", ".json") else _read_text(p)
    if not docs:
        raise InputError(f"the corpus {', '.join(map(str, paths))} is empty: no non-blank text found")
    return docs


def _read_text(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSONL file; a line that is not JSON is a one-line
    error naming the file and line."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not valid JSON: {exc.msg}") from exc


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, obj in jsonl_lines(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"{path}:{n} has no string field 'text' (JSONL lines must be {{\"text\": ...}})")
        if obj["text"].strip():
            docs.append(obj["text"].strip())
    return docs


def token_stream(tokenizer, docs: Sequence[str], sep_id: int = 2) -> np.ndarray:
    """All documents encoded without special tokens and joined by `sep_id` (OPT's `</s>`). int64 [N]."""
    encs = tokenizer.encode_batch(list(docs), add_special_tokens=False)
    parts = []
    for e in encs:
        parts += [[sep_id], e.ids]
    return np.fromiter((t for part in parts[1:] for t in part), dtype=np.int64)


def make_chunks(stream: np.ndarray, seq_len: int, bos_id: int = 2) -> np.ndarray:
    """Cut the stream into non-overlapping windows of `seq_len - 1` tokens, each prefixed by the BOS id, as
    OPT's tokenizer prefixes every prompt with `</s>`. -> int64 [n_chunks, seq_len]; the tail is dropped."""
    body = seq_len - 1
    n = len(stream) // body
    if n == 0:
        raise InputError(f"the corpus has {len(stream)} tokens, fewer than one chunk of {seq_len} tokens")
    chunks = np.empty((n, seq_len), dtype=np.int64)
    chunks[:, 0] = bos_id
    chunks[:, 1:] = stream[: n * body].reshape(n, body)
    return chunks
