"""Typed errors. Every message names the offending value and the limit it broke.

The CLI turns any `SkipDecodeError` into a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations


class SkipDecodeError(ValueError):
    """Base class of every error this package raises on bad input or a bad artefact."""


class ScheduleError(SkipDecodeError):
    """Invalid schedule parameters (budgets, warm-up, speedup, lengths)."""


class InputError(SkipDecodeError):
    """Invalid request: prompts, lengths, batch size or sampling values."""


class EngineError(SkipDecodeError):
    """Missing, corrupted or incompatible engine directory."""


class BackendError(SkipDecodeError):
    """A requested backend or execution provider cannot be used."""


class ModelError(SkipDecodeError):
    """A model name or checkpoint that cannot be resolved or is not an OPT model."""


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None,
              error: type[SkipDecodeError] = InputError) -> int:
    """Return `value` as an int if lo <= value <= hi; raise `error` naming the value and the limit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise error(f"{name}={value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise error(f"{name}={value} is above the maximum {hi}")
    return value
