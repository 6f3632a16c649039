"""`Engine`: load an engine directory and generate with the compiled graphs. No torch import.

    engine = Engine.load("engines/opt-1.3b")
    results = engine.generate([engine.encode("Hello")], GenerateOptions(max_new_tokens=32, speedup=2))
    for event in engine.stream(prompts, opts): ...   # one StepEvent per produced column
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .generation import Generator
from .manifest import Manifest, load_manifest
from .ort_backend import OrtBackend
from .tokenizer import TextCodec


class Engine(Generator):
    manifest: Manifest

    @classmethod
    def load(cls, directory: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
             threads: int | None = None, max_batch: int | None = None, max_length: int | None = None,
             prepack: bool = False) -> Engine:
        """Validate the manifest and its files, open one session per graph, allocate the KV arena once.

        `max_batch`/`max_length` may lower the exported limits to save KV memory, never raise them.
        `prepack=True` lets onnxruntime pre-pack weights per session: faster steps, but one private copy of the
        weights per graph (see ort_backend.session_options).
        """
        directory = Path(directory)
        man = load_manifest(directory)
        backend = OrtBackend(directory, man, list(providers), threads, max_batch, max_length, prepack)
        codec = TextCodec.from_file(directory / man.tokenizer) if man.tokenizer else None
        m = man.model
        engine = cls(backend, codec, m["pad_token_id"], m["eos_token_id"], m["vocab_size"])
        engine.manifest = man
        return engine
