"""The HTTP API's request and response shapes, with no web framework: parsing, validation, stop strings.

`parse_completion` turns an OpenAI-style /v1/completions body into a `CompletionRequest` or raises `InputError`
(HTTP 400) whose one-line message names the field, the value and the limit. Everything after it trusts the data.
`TextStream` detokenizes incrementally and applies OpenAI `stop` strings, releasing only text that cannot
turn out to be the start of a stop string.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from skipdecode.runtime.errors import InputError
from skipdecode.runtime.generation import GenerateOptions
from skipdecode.runtime.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n",
          "user", "speedup", "max_layers", "min_layers", "stop_token_ids", "ignore_eos", "timeout")


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts. `max_length` is the engine's positions per sequence (prompt + new tokens)."""

    max_length: int
    vocab_size: int
    eos_token_id: int | None
    max_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class CompletionRequest:
    prompt: tuple[int, ...]
    options: GenerateOptions
    stream: bool
    stop: tuple[str, ...]  # text stop strings (need a tokenizer)
    timeout_s: float
    model: str | None


def parse_completion(body: object, limits: ServerLimits, codec) -> CompletionRequest:
    """Validate a decoded JSON body. `codec` is the engine's TextCodec or None (token-id prompts only)."""
    if not isinstance(body, dict):
        raise InputError(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}; allowed fields: {', '.join(FIELDS)}")
    prompt = _prompt(body.get("prompt"), limits, codec)
    room = limits.max_length - len(prompt)
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, room,
                      f" for a {len(prompt)}-token prompt (model limit {limits.max_length} positions)")
    _int(body, "n", 1, 1, 1)  # one choice per request
    stop = _stop(body.get("stop"), codec)
    stop_ids = body.get("stop_token_ids", [])
    if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < limits.vocab_size for t in stop_ids):
        raise InputError(f"stop_token_ids={stop_ids!r} must be a list of token ids in [0, {limits.vocab_size})")
    sampling = SamplingParams(temperature=_num(body, "temperature", 0.0), top_p=_num(body, "top_p", 1.0),
                              top_k=_int(body, "top_k", 0, 0, limits.vocab_size),
                              seed=_int(body, "seed", None, 0, 2**63 - 1))
    max_layers, min_layers = _int(body, "max_layers", None, 1, None), _int(body, "min_layers", None, 1, None)
    options = GenerateOptions(
        max_new_tokens=max_tokens, speedup=_num(body, "speedup", None), max_layers=max_layers,
        min_layers=min_layers, sampling=sampling, stop_token_ids=tuple(stop_ids),
        eos_token_id=None if _bool(body, "ignore_eos", False) else limits.eos_token_id)
    timeout = _num(body, "timeout", limits.max_timeout_s)
    if not 0 < timeout <= limits.max_timeout_s:
        raise InputError(f"timeout={timeout!r} must be in (0, {limits.max_timeout_s:g}] seconds")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f"model must be a string, got {model!r}")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InputError(f"user must be a string, got {body['user']!r}")
    return CompletionRequest(prompt, options, _bool(body, "stream", False), stop, float(timeout), model)


def _prompt(value: object, limits: ServerLimits, codec) -> tuple[int, ...]:
    if isinstance(value, str):
        if codec is None:
            raise InputError("this engine has no tokenizer: send prompt as a list of token ids")
        ids = codec.encode(value)
    elif isinstance(value, list) and all(_is_int(t) for t in value):
        bad = [t for t in value if not 0 <= t < limits.vocab_size]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})")
        ids = value
    else:
        raise InputError(f"prompt must be a string or a list of token ids, got {_show(value)} "
                         "(batches of prompts are not supported: send one request per prompt)")
    if not ids:
        raise InputError("prompt is empty: it needs at least 1 token")
    if len(ids) > limits.max_length - 1:
        raise InputError(f"prompt has {len(ids)} tokens, above the limit of {limits.max_length - 1} "
                         f"(model limit {limits.max_length} positions, at least 1 for a new token)")
    return tuple(int(t) for t in ids)


def _stop(value: object, codec) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a non-empty string or a list of them, got {_show(value)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise InputError(f"stop has {len(stops)} strings, above the maximum {MAX_STOP_STRINGS}")
    if codec is None:
        raise InputError("stop strings need a tokenizer and this engine has none: use stop_token_ids")
    return tuple(stops)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: dict, name: str, default, lo: int | None, hi: int | None, why: str = ""):
    v = body.get(name)
    if v is None:  # absent or JSON null (as OpenAI clients send): the default
        return default
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {_show(v)}")
    if lo is not None and v < lo:
        raise InputError(f"{name}={v} is below the minimum {lo}")
    if hi is not None and v > hi:
        raise InputError(f"{name}={v} is above the maximum {hi}{why}")
    return v


def _num(body: dict, name: str, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {_show(v)}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{name} must be true or false, got {_show(v)}")
    return v


class TextStream:
    """Incremental text of a token stream, cut at the first stop string. Text that could still become a stop
    string (a suffix that is a stop string's prefix) or an unfinished UTF-8 character is held back."""

    def __init__(self, codec, stops: Sequence[str]) -> None:
        self.codec, self.stops = codec, tuple(stops)
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly released text ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        full = self.codec.decode(self.tokens)
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[: min(hits)])
        keep = len(full)
        while keep > 0 and full[keep - 1] == "\ufffd":  # a multi-byte character still incomplete
            keep -= 1
        hold = max((n for s in self.stops for n in range(1, len(s)) if full[:keep].endswith(s[:n])), default=0)
        return self._release(full[: keep - hold])

    def flush(self) -> str:
        """At the end of generation: release what was held back (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._release(self.codec.decode(self.tokens))

    def _release(self, upto: str) -> str:
        # decoding a longer token list never rewrites released text except for replacement characters
        delta = upto[len(self.text):] if upto.startswith(self.text) else ""
        if delta:
            self.text += delta
        return delta
