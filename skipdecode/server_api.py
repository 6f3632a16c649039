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
from skipdecode.runtime.logprobs import MAX_LOGPROBS
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.slot_backend import MAX_VERIFY_TOKENS

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_TOKEN_IDS = 256
MAX_NAME_CHARS = 256  # model and user strings
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n",
          "user", "speedup", "max_layers", "min_layers", "stop_token_ids", "ignore_eos", "timeout",
          "logprobs", "echo", "stream_options", "lossless", "draft_speedup", "draft_tokens",
          # OpenAI fields not implemented: accepted only with a value that leaves the result unchanged
          "best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix")


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts. `max_length` is the engine's positions per sequence (prompt + new tokens).
    `max_prompt_chars` bounds a text prompt before it is tokenized (None: 32 characters per position)."""

    max_length: int
    vocab_size: int
    eos_token_id: int | None
    max_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int | None = None
    max_stop_chars: int = 512  # per stop string: the text held back while streaming is shorter than this
    body_timeout_s: float = 30.0  # the whole request body must arrive within this

    @property
    def prompt_chars(self) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * self.max_length


@dataclass(frozen=True)
class CompletionRequest:
    prompt: tuple[int, ...]
    options: GenerateOptions
    stream: bool
    stop: tuple[str, ...]  # text stop strings (need a tokenizer)
    timeout_s: float
    model: str | None
    max_tokens: int = 1  # 0 only with echo: the scored prompt alone (options then hold max_new_tokens 1, unused)
    logprobs: int | None = None
    echo: bool = False
    include_usage: bool = False  # streaming: a last chunk with usage and no choices
    prompt_text: str | None = None  # the prompt as sent, when it was text


def parse_completion(body: object, limits: ServerLimits, codec) -> CompletionRequest:
    """Validate a decoded JSON body. `codec` is the engine's TextCodec or None (token-id prompts only). A text
    prompt is tokenized here: call it off the event loop."""
    if not isinstance(body, dict):
        raise InputError(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field {show(unknown[0])}; allowed fields: {', '.join(FIELDS)}")
    _neutral(body)
    stop = _stop(body.get("stop"), limits, codec)  # cheap checks before the tokenizer runs
    stop_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else stop_ids
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP_TOKEN_IDS or not all(
            _is_int(t) and 0 <= t < limits.vocab_size for t in stop_ids):
        raise InputError(f"stop_token_ids={show(stop_ids)} must be a list of at most {MAX_STOP_TOKEN_IDS} token "
                         f"ids in [0, {limits.vocab_size})")
    model = _name(body, "model")
    _name(body, "user")  # accepted as OpenAI clients send it; not used
    sampling = SamplingParams(temperature=_num(body, "temperature", 0.0), top_p=_num(body, "top_p", 1.0),
                              top_k=_int(body, "top_k", 0, 0, limits.vocab_size),
                              seed=_int(body, "seed", None, 0, 2**63 - 1))
    max_layers, min_layers = _int(body, "max_layers", None, 1, None), _int(body, "min_layers", None, 1, None)
    timeout = _num(body, "timeout", limits.max_timeout_s)
    if not 0 < timeout <= limits.max_timeout_s:
        raise InputError(f"timeout={show(timeout)} must be in (0, {limits.max_timeout_s:g}] seconds")
    stream, ignore_eos, speedup = _bool(body, "stream", False), _bool(body, "ignore_eos", False), _num(
        body, "speedup", None)
    logprobs, echo = _int(body, "logprobs", None, 0, MAX_LOGPROBS), _bool(body, "echo", False)
    include_usage = _stream_options(body.get("stream_options"))
    prompt = _prompt(body.get("prompt"), limits, codec)
    room = limits.max_length - len(prompt)
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0 if echo else 1, room,
                      f" for a {len(prompt)}-token prompt (model limit {limits.max_length} positions)")
    options = GenerateOptions(
        max_new_tokens=max(max_tokens, 1), speedup=speedup, max_layers=max_layers,
        min_layers=min_layers, sampling=sampling, stop_token_ids=tuple(stop_ids),
        eos_token_id=None if ignore_eos else limits.eos_token_id, logprobs=logprobs,
        lossless=_bool(body, "lossless", False), draft_speedup=_num(body, "draft_speedup", None),
        draft_tokens=_int(body, "draft_tokens", None, 1, MAX_VERIFY_TOKENS - 1))
    text = _one_prompt(body.get("prompt"))
    return CompletionRequest(prompt, options, stream, stop, float(timeout), model, max_tokens, logprobs, echo,
                             include_usage, text if isinstance(text, str) else None)


def _stream_options(value: object) -> bool:
    """-> include_usage."""
    if value is None:
        return False
    if not isinstance(value, dict) or not set(value) <= {"include_usage"} or not isinstance(
            value.get("include_usage", False), (bool, type(None))):
        raise InputError(f'stream_options={show(value)} must be null or {{"include_usage": true or false}}')
    return bool(value.get("include_usage"))


def _one_prompt(value: object) -> object:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return value[0]  # a one-prompt batch, as OpenAI clients send
    return value


def _neutral(body: dict) -> None:
    """OpenAI fields this server does not implement: their neutral values pass, others are refused."""
    _int(body, "n", 1, 1, 1)  # one choice per request
    _int(body, "best_of", 1, 1, 1)
    for name in ("frequency_penalty", "presence_penalty"):
        if _num(body, name, 0) != 0:
            raise InputError(f"{name}={show(body[name])} is not supported: only 0 (or null)")
    checks = {"suffix": (lambda v: v is None or v == "", '"" (or null)'),
              "logit_bias": (lambda v: v is None or v == {}, "{} (or null)")}
    for name, (ok, accepted) in checks.items():
        if name in body and not ok(body[name]):
            raise InputError(f"{name}={show(body[name])} is not supported: only {accepted}")


def _name(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and (not isinstance(v, str) or len(v) > MAX_NAME_CHARS):
        raise InputError(f"{name} must be a string of at most {MAX_NAME_CHARS} characters, got {show(v)}")
    return v


def _unicode(text: str, what: str) -> None:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer or UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} holds a lone surrogate ({show(text[exc.start])} at character {exc.start}): "
                         "text must be valid Unicode") from None


def _prompt(value: object, limits: ServerLimits, codec) -> tuple[int, ...]:
    value = _one_prompt(value)
    if isinstance(value, str):
        if codec is None:
            raise InputError("this engine has no tokenizer: send prompt as a list of token ids")
        if len(value) > limits.prompt_chars:  # before the tokenizer spends time on it
            raise InputError(f"prompt has {len(value)} characters, above the limit of {limits.prompt_chars} "
                             f"(model limit {limits.max_length} tokens)")
        if not value:
            raise InputError("prompt is empty: it needs at least 1 token")
        _unicode(value, "prompt")
        ids = codec.encode(value)
    elif isinstance(value, list) and all(_is_int(t) for t in value):
        if len(value) > limits.max_length - 1:
            ids = value  # the length check below names it
        else:
            bad = [t for t in value if not 0 <= t < limits.vocab_size]
            if bad:
                raise InputError(f"prompt token id {show(bad[0])} is outside the vocabulary "
                                 f"[0, {limits.vocab_size})")
            ids = value
    else:
        raise InputError(f"prompt must be a string or a list of token ids, got {show(value)} "
                         "(batches of prompts are not supported: send one request per prompt)")
    if not ids:
        raise InputError("prompt is empty: it needs at least 1 token")
    if len(ids) > limits.max_length - 1:
        raise InputError(f"prompt has {len(ids)} tokens, above the limit of {limits.max_length - 1} "
                         f"(model limit {limits.max_length} positions, at least 1 for a new token)")
    return tuple(int(t) for t in ids)


def _stop(value: object, limits: ServerLimits, codec) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a non-empty string or a list of them, got {show(value)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise InputError(f"stop has {len(stops)} strings, above the maximum {MAX_STOP_STRINGS}")
    for s in stops:
        if len(s) > limits.max_stop_chars:
            raise InputError(f"stop string {show(s)} has {len(s)} characters, above the limit of "
                             f"{limits.max_stop_chars}")
        _unicode(s, "stop")
    if stops and codec is None:
        raise InputError("stop strings need a tokenizer and this engine has none: use stop_token_ids")
    return tuple(stops)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def show(v: object, limit: int = 80) -> str:
    """A value for an error message, bounded: never echo unbounded input."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 256:
        return f"<integer of about {int(v.bit_length() * 0.30103)} digits>"  # repr of a huge int is slow
    if isinstance(v, (list, dict)) and len(v) > limit:
        v = v[:limit] if isinstance(v, list) else dict(list(v.items())[:limit])
    try:
        text = repr(v)
    except RecursionError:
        text = f"<deeply nested {type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(body: dict, name: str, default, lo: int | None, hi: int | None, why: str = ""):
    v = body.get(name)
    if v is None:  # absent or JSON null (as OpenAI clients send): the default
        return default
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {show(v)}")
    if lo is not None and v < lo:
        raise InputError(f"{name}={show(v)} is below the minimum {lo}")
    if hi is not None and v > hi:
        raise InputError(f"{name}={show(v)} is above the maximum {hi}{why}")
    return v


def _num(body: dict, name: str, default):
    v = body.get(name)
    if v is None:
        return default
    try:
        finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise InputError(f"{name} must be a finite number, got {show(v)}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{name} must be true or false, got {show(v)}")
    return v


class TextStream:
    """Incremental text of a token stream, cut at the first stop string.

    Work per token is bounded by the longest stop string, not by the text so far: only the tokens since the last
    complete character are decoded again, and only the held-back tail (the longest suffix that is a proper prefix
    of a stop string, shorter than the longest stop string) is searched again. An unfinished UTF-8 character is
    held back too (for at most `MAX_PENDING_TOKENS` tokens; then it is released as U+FFFD)."""

    MAX_PENDING_TOKENS = 8

    def __init__(self, codec, stops: Sequence[str]) -> None:
        self.codec, self.stops = codec, tuple(stops)
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False
        self._start = self._done = 0  # tokens[_start:_done] decode to text already taken in (the decode context)
        self._taken = ""  # decode(tokens[_start:_done])
        self._tail = ""  # taken in, not released: could still be the start of a stop string

    def push(self, token: int) -> str:
        """Add a token; return the newly released text ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        return self._scan(self._decode(final=False), final=False)

    def push_many(self, tokens: Sequence[int]) -> list[str]:
        return [self.push(t) for t in tokens]

    def flush(self) -> str:
        """At the end of generation: release what was held back (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._scan(self._decode(final=True), final=True)

    def _decode(self, final: bool) -> str:
        """Text of the tokens not taken in yet ("" while a multi-byte character is unfinished)."""
        if self._done == len(self.tokens):
            return ""
        text = self.codec.decode(self.tokens[self._start:])
        pending = len(self.tokens) - self._done
        if not final and text.endswith("\ufffd") and pending < self.MAX_PENDING_TOKENS:
            return ""
        new = text[len(self._taken):]
        # the next decode context starts at the tokens just taken in (a character can span a token boundary)
        self._start, self._done = self._done, len(self.tokens)
        self._taken = self.codec.decode(self.tokens[self._start:])
        return new

    def _scan(self, new: str, final: bool) -> str:
        buf = self._tail + new
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._tail = True, ""
            return self._release(buf[: min(hits)])
        keep = 0 if final else self._held(buf)
        self._tail = buf[len(buf) - keep:] if keep else ""
        return self._release(buf[: len(buf) - keep])

    def _held(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            first, i = s[0], max(0, len(buf) - len(s) + 1)
            while i < len(buf) - best:  # only suffixes longer than the best so far
                i = buf.find(first, i, len(buf) - best)
                if i < 0:
                    break
                if s.startswith(buf[i:]):
                    best = len(buf) - i
                    break
                i += 1
        return best

    def _release(self, out: str) -> str:
        self.text += out
        return out
