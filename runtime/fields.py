"""Strict readers for fields of a JSON document (the engine manifest): each returns the value with the type the
runtime needs or raises EngineError naming the field, the value and what was expected. No coercion: `1e9` is not
an integer, `"8"` is not a number, `[]` is not an object."""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath

from .errors import EngineError, check_int


def need(d: object, key: str, where: str):
    """d[key] of the object `d` found at `where` (e.g. "manifest.graphs[2]")."""
    obj(d, where)
    if key not in d:
        raise EngineError(f"{where}.{key} is missing")
    return d[key]


def obj(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise EngineError(f"{where} must be a JSON object, got {_show(value)}")
    return value


def seq(value: object, where: str) -> list:
    if not isinstance(value, list):
        raise EngineError(f"{where} must be a JSON list, got {_show(value)}")
    return value


def integer(value: object, where: str, lo: int | None = None, hi: int | None = None) -> int:
    return check_int(where, value, lo, hi, error=EngineError)


def number(value: object, where: str) -> float:
    """A JSON number (an integer or a float, never a boolean); its range is the caller's to check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EngineError(f"{where} must be a number, got {_show(value)}")
    return float(value)


def text(value: object, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise EngineError(f"{where} must be a string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise EngineError(f"{where}={value!r} is not one of {list(choices)}")
    return value


def file_name(value: object, where: str) -> str:
    """A path relative to the engine directory that stays inside it: a manifest must never make the runtime read
    (or hash) a file elsewhere."""
    name = text(value, where)
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if not name or posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise EngineError(f"{where}={value!r} must be a file name inside the engine directory (not absolute, "
                          "no '..')")
    return name


def _show(value: object) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}"
