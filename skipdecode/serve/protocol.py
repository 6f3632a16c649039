"""The OpenAI completions protocol, with no web framework: request parsing and validation, response shaping, stop
strings.

`parse_body` turns the bytes of an OpenAI-style /v1/completions body into a `CompletionRequest` or raises
`InputError` (HTTP 400) whose one-line message names the field, the value and the limit. Everything after it trusts
the data. The response side builds every body the server sends: a completion, a streamed chunk, `usage`, the
`logprobs` object and an error (`error_body`, from any `SkipDecodeError`, which carries its own HTTP status).
`TextStream` detokenizes incrementally and applies OpenAI `stop` strings, releasing only text that cannot turn out
to be the start of a stop string.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from skipdecode.runtime.errors import (
    InputError,
    RequestCancelledError,
    RequestFailedError,
    RequestTimeoutError,
    SkipDecodeError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    show,
)
from skipdecode.runtime.logprobs import MAX_LOGPROBS, TokenLogprob
from skipdecode.runtime.request import DRAFT_WEIGHTS, GenerateOptions
from skipdecode.runtime.sampling import SamplingParams
from skipdecode.runtime.slot_backend import MAX_VERIFY_TOKENS
from skipdecode.serve.config import ServeConfig

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_TOKEN_IDS = 256
MAX_NAME_CHARS = 256  # model and user strings
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n",
          "user", "speedup", "max_layers", "min_layers", "stop_token_ids", "ignore_eos", "timeout",
          "logprobs", "echo", "stream_options", "lossless", "draft_speedup", "draft_tokens",
          "draft_weights",
          # OpenAI fields not implemented: accepted only with a value that leaves the result unchanged
          "best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix")


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts: the engine's `max_length` (positions per sequence: prompt + new tokens), vocabulary
    and EOS token, the server options in `config` (timeouts, prompt characters) and the protocol's own bounds."""

    max_length: int
    vocab_size: int
    eos_token_id: int | None
    config: ServeConfig = field(default_factory=ServeConfig)
    max_body_bytes: int = 1 << 20
    max_stop_chars: int = 512  # per stop string: the text held back while streaming is shorter than this

    @classmethod
    def of(cls, engine, config: ServeConfig) -> ServerLimits:
        return cls(engine.backend.max_length, engine.vocab_size, engine.eos_token_id, config)

    @property
    def prompt_chars(self) -> int:
        """The longest text prompt: `max_prompt_chars`, else 32 characters per position."""
        chars = self.config.max_prompt_chars
        return chars if chars is not None else 32 * self.max_length


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


def parse_body(body: bytes, limits: ServerLimits, codec) -> CompletionRequest:
    """Decode and validate the bytes of a request body (tokenizing a text prompt: call it off the event loop)."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise InputError(f"request body is not valid UTF-8 (byte {exc.start}): send JSON text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON body: {exc}") from None
    except RecursionError:
        raise InputError("invalid JSON body: nested too deeply") from None
    except ValueError:  # the int-from-string limit (sys.get_int_max_str_digits)
        raise InputError(f"invalid JSON body: a number has more than {sys.get_int_max_str_digits()} "
                         "digits") from None
    return parse_completion(data, limits, codec)


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
    sampling = SamplingParams(temperature=_get(body, "temperature", 0.0, check_number),
                              top_p=_get(body, "top_p", 1.0, check_number),
                              top_k=_get(body, "top_k", 0, check_int, 0, limits.vocab_size),
                              seed=_get(body, "seed", None, check_int, 0, 2**63 - 1))
    max_layers, min_layers = _get(body, "max_layers", None, check_int, 1), _get(body, "min_layers", None, check_int, 1)
    max_timeout = limits.config.max_timeout
    timeout = _get(body, "timeout", max_timeout, check_number, None, max_timeout, above=0, unit=" seconds")
    stream, ignore_eos = _get(body, "stream", False, check_bool), _get(body, "ignore_eos", False, check_bool)
    speedup = _get(body, "speedup", None, check_number)
    logprobs = _get(body, "logprobs", None, check_int, 0, MAX_LOGPROBS)
    echo = _get(body, "echo", False, check_bool)
    include_usage = _stream_options(body.get("stream_options"))
    prompt = _prompt(body.get("prompt"), limits, codec)
    room = limits.max_length - len(prompt)
    max_tokens = _get(body, "max_tokens", DEFAULT_MAX_TOKENS, check_int, 0 if echo else 1, room,
                      hint=f" for a {len(prompt)}-token prompt (model limit {limits.max_length} positions)")
    options = GenerateOptions(
        max_new_tokens=max(max_tokens, 1), speedup=speedup, max_layers=max_layers,
        min_layers=min_layers, sampling=sampling, stop_token_ids=tuple(stop_ids),
        eos_token_id=None if ignore_eos else limits.eos_token_id, logprobs=logprobs,
        lossless=_get(body, "lossless", False, check_bool),
        draft_speedup=_get(body, "draft_speedup", None, check_number),
        draft_tokens=_get(body, "draft_tokens", None, check_int, 1, MAX_VERIFY_TOKENS - 1),
        draft_weights=_get(body, "draft_weights", None, check_choice, DRAFT_WEIGHTS))
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
    _get(body, "n", 1, check_int, 1, 1)  # one choice per request
    _get(body, "best_of", 1, check_int, 1, 1)
    for name in ("frequency_penalty", "presence_penalty"):
        if _get(body, name, 0, check_number) != 0:
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


def _get(body: dict, name: str, default, check, *args, **kw):
    """A field checked by `check` (a validator of runtime/errors.py); absent or JSON null (as OpenAI clients send
    it): the default."""
    v = body.get(name)
    return default if v is None else check(name, v, *args, **kw)


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


def advance(text: TextStream, tokens: list[int], final: bool) -> tuple[list[str], str]:
    """The text deltas of `tokens` (ending at the one that completes a stop string) and, at the end of generation
    (`final`), the held-back text. Detokenizes: call it off the event loop."""
    deltas = []
    for t in tokens:
        deltas.append(text.push(t))
        if text.stopped:
            break
    return deltas, text.flush() if final else ""


# -- responses ------------------------------------------------------------------------------------------------------
# OpenAI's finish reasons; ours ("eos", "timeout", "cancelled") are reported under "skipdecode"
OPENAI_REASON = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}
DONE = "data: [DONE]\n\n"  # the last event of every stream


@dataclass(frozen=True)
class Prefix:
    """What comes before the completion: the echoed prompt text (None without echo), its logprobs object (echo
    with logprobs) and the text offset the completion's tokens start at."""

    text: str | None
    block: dict | None
    offset: int


NO_PREFIX = Prefix(None, None, 0)


def make_prefix(codec, req: CompletionRequest, scored: Sequence[TokenLogprob] | None) -> Prefix:
    """The prefix of `req`; `scored`: the logprobs of its prompt tokens after the first (echo with logprobs).
    Detokenizes: call it off the event loop."""
    text = req.prompt_text if req.prompt_text is not None else (
        codec.decode(list(req.prompt)) if codec is not None else None)
    if not req.echo:
        return Prefix(None, None, len(text or ""))
    block, end = None, len(text or "")
    if req.logprobs is not None:
        block, end = logprobs_block(codec, list(zip(req.prompt, [None, *scored], strict=True)), 0)
    return Prefix(text, block, end)


def logprobs_block(codec, entries: Sequence[tuple[int, TokenLogprob | None]], offset: int) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` object for (token, its TokenLogprob or None), the text offsets counted from
    `offset`, plus the ids (token strings of two ids can be equal). -> (it, next offset). Detokenizes."""
    def piece(token: int) -> str:
        return codec.decode([token]) if codec is not None else str(token)

    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "token_ids": [],
           "top_token_ids": []}
    for token, e in entries:
        text = piece(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        out["token_ids"].append(token)
        offset += len(text)
        out["token_logprobs"].append(e.logprob if e is not None else None)
        out["top_logprobs"].append({piece(t): v for t, v in e.top} if e is not None else None)
        out["top_token_ids"].append([t for t, _ in e.top] if e is not None else None)
    return out, offset


def join_logprobs(prefix: Prefix, block: dict | None) -> dict | None:
    """The echoed prompt's logprobs object followed by the completion's."""
    if block is None or prefix.block is None:
        return block
    return {k: prefix.block[k] + v for k, v in block.items()}


def usage(req: CompletionRequest, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": completion_tokens,
            "total_tokens": len(req.prompt) + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason for ours (None: not finished)."""
    return OPENAI_REASON.get(reason, reason) if reason else None


def choice(text: str | None, logprobs: dict | None, reason: str | None, tokens: list[int] | None = None,
           **extra) -> dict:
    """One entry of `choices`: `tokens` all ids of a completion, `extra` the token and budget of a streamed one;
    `reason` is ours (None while streaming)."""
    out = {"index": 0, "text": text, **({"tokens": tokens} if tokens is not None else {})}
    return {**out, "logprobs": logprobs, "finish_reason": finish_reason(reason), **extra}


def skipdecode_block(reason: str, budgets: Sequence[int], drafts: tuple[int, int] | None = None) -> dict:
    """Our own part of a completion: the finish reason, each token's layer budget and their mean, and with
    lossless decoding the drafted and accepted token counts."""
    out = {"finish_reason": reason, "budgets": list(budgets),
           "mean_layers": sum(budgets) / len(budgets) if budgets else None}
    if drafts is not None:
        out["lossless"] = {"drafted": drafts[0], "accepted": drafts[1]}
    return out


def completion(rid: str, model: str, choice: dict, usage: dict, skipdecode: dict) -> dict:
    """A non-streamed completion body."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage, "skipdecode": skipdecode}


def chunk(rid: str, model: str, choices: list[dict], **extra) -> str:
    """One server-sent event of a stream: a completion chunk (`extra`: usage, skipdecode)."""
    return event({"id": rid, "object": "text_completion", "model": model, "created": int(time.time()),
                  "choices": choices, **extra})


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def error_body(exc: SkipDecodeError) -> dict:
    """The JSON of every error response, and of the error event that ends a failed stream."""
    return {"error": {"message": str(exc), "type": exc.kind, "param": None, "code": exc.code}}


def finish_error(reason: str, req: CompletionRequest, generated: int, failure: str) -> SkipDecodeError | None:
    """The error a non-streamed request that finished for `reason` is answered with (None: it completed)."""
    if reason == "timeout":
        return RequestTimeoutError(f"request timed out after {req.timeout_s:g} s ({generated} tokens generated); "
                                   "raise `timeout` or lower `max_tokens`")
    if reason == "cancelled":  # the server is shutting down and did not finish it in time
        return RequestCancelledError(f"request cancelled by the server shutting down ({generated} tokens "
                                     "generated)")
    if reason == "error":
        return generation_failed(failure)
    return None


def generation_failed(failure: str) -> RequestFailedError:
    return RequestFailedError(f"generation failed: {failure}")


def model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "skipdecode"}
