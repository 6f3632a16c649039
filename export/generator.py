"""`TorchGenerator`: the PyTorch reference behind the same `Generator` face as the compiled runtime."""

from __future__ import annotations

from ..runtime.generation import Generator
from .models import OPTShape, load_model
from .reference import TorchReference


class TorchGenerator(Generator):
    @classmethod
    def load(cls, name: str, max_batch: int = 64) -> TorchGenerator:
        model, codec = load_model(name)
        return cls.from_model(model, codec, max_batch)

    @classmethod
    def from_model(cls, model, codec=None, max_batch: int = 64) -> TorchGenerator:
        shape = OPTShape.from_config(model.config)
        return cls(TorchReference(model, max_batch), codec, shape.pad_token_id, shape.eos_token_id,
                   shape.vocab_size)
