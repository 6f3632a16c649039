"""`Engine`: load an engine directory and generate with the compiled graphs. No torch import.

    engine = Engine.load("engines/opt-1.3b")
    results = engine.generate([engine.encode("Hello")], GenerateOptions(max_new_tokens=32, speedup=2))
    for event in engine.stream(prompts, opts): ...   # a TokenEvent per token, a FinishEvent per row
    engine.close()                                     # or `with Engine.load(...) as engine:`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from .errors import BackendError
from .generator import Generator
from .integrity import verify_files
from .kernels import MODES, Choice, candidates, choose, measure_steps, with_candidate
from .manifest import Manifest, load_manifest
from .ort_backend import OrtBackend
from .tokenizer import TextCodec


class Engine(Generator):
    manifest: Manifest
    kernel_choice: Choice | None = None  # quantized engines on onnxruntime: the kernel path chosen and why

    @classmethod
    def load(cls, directory: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
             threads: int | None = None, max_batch: int | None = None, max_length: int | None = None,
             prepack: str | None = None, backend: str = "onnxruntime", device: int = 0, verify: bool = True,
             kernel: str | None = None) -> Engine:
        """Validate the manifest and its files, open one session per graph, allocate the KV cache once.

        `max_batch`/`max_length` may lower the exported limits to save KV memory, never raise them.
        `prepack` (onnxruntime CPU): "shared" (default where available) pre-packs each weight once for all graphs,
        "private" once per graph (same speed, a packed copy per graph), "off" not at all (see ort_backend).
        `backend`: "onnxruntime" (with `providers`), "cuda" (onnxruntime CUDA, device-resident KV) or "tensorrt"
        (the plans built by `skipdecode export --backend tensorrt`); GPU backends run on CUDA device `device`.
        All three offer the same slot API (runtime/slot_backend.py), so each can serve continuous batches.
        `verify` checks the content hash of every file the manifest names (runtime/integrity.py; about a second
        per 4 GB of weights): corrupted weights otherwise load fine and generate garbage. Skip it only for a
        directory just checked (the exporter's own parity run) or when load time matters more than that.
        """
        directory = Path(directory)
        man = load_manifest(directory)
        if verify:
            verify_files(directory, man.integrity)
        choice = None
        if backend == "onnxruntime" and man.quantization:
            full = man

            def open_backend(cand, batch: int, length: int) -> OrtBackend:
                return OrtBackend(directory, with_candidate(full, cand), list(providers), threads, batch,
                                  min(length, full.max_length), prepack)

            choice = choose(directory, man, kernel, min(max_batch or man.max_batch, man.max_batch),
                            lambda cands, bands: measure_steps(open_backend, cands, bands), ort.__version__)
            man = with_candidate(man, next(c for c in candidates(man) if c.name == choice.name))
        elif kernel not in (None, *MODES):  # float engines and GPU backends run their graphs as exported
            raise BackendError(f"kernel={kernel!r} names a candidate; only quantized engines on the onnxruntime "
                               "backend have kernel candidates")
        if backend == "onnxruntime":
            step_backend = OrtBackend(directory, man, list(providers), threads, max_batch, max_length, prepack)
        elif backend == "cuda":
            from .cuda_backend import CudaBackend  # import-guarded: needs onnxruntime-gpu and cuda-python
            step_backend = CudaBackend(directory, man, device, max_batch, max_length)
        elif backend == "tensorrt":
            from .trt_backend import TrtBackend  # import-guarded: needs tensorrt and cuda-python
            step_backend = TrtBackend(directory, man, device, max_batch, max_length)
        else:
            raise BackendError(f"backend={backend!r} is not one of ['onnxruntime', 'cuda', 'tensorrt']")
        codec = TextCodec.from_file(directory / man.tokenizer) if man.tokenizer else None
        m = man.model
        engine = cls(step_backend, codec, m.pad_token_id, m.eos_token_id, m.vocab_size)
        engine.manifest = man
        engine.kernel_choice = choice
        return engine

    def close(self) -> None:
        """Free the sessions and KV memory now (not at garbage collection); later calls raise EngineError."""
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
