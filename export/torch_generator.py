"""`TorchGenerator`: the PyTorch reference behind the same `Generator` face as the compiled runtime."""

from __future__ import annotations

from ..runtime.generator import Generator
from ..runtime.manifest import OPTShape
from ..runtime.request import GenerateOptions
from .models import load_model
from .reference import TorchReference


class TorchGenerator(Generator):
    backend: TorchReference

    @classmethod
    def load(cls, name: str, max_batch: int = 64) -> TorchGenerator:
        model, codec = load_model(name)
        return cls.from_model(model, codec, max_batch)

    @classmethod
    def from_model(cls, model, codec=None, max_batch: int = 64) -> TorchGenerator:
        shape = OPTShape.from_config(model.config)
        return cls(TorchReference(model, max_batch), codec, shape.pad_token_id, shape.eos_token_id,
                   shape.vocab_size)

    def stream(self, prompts, opts: GenerateOptions):
        # the reference runs any warm-up: its "graphs" follow the one asked for (engines have theirs built in)
        if opts.warmup_layers is not None:
            self.backend.use_warmup(opts.warmup_layers)
        return super().stream(prompts, opts)
