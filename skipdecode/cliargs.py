"""argparse value types shared by every `skipdecode` subcommand module."""

from __future__ import annotations

import argparse


def floats(text: str) -> tuple[float, ...]:
    """'2,3,5' -> (2.0, 3.0, 5.0)"""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def ints(text: str) -> tuple[int, ...]:
    """'1 2 3' or '1,2,3' -> (1, 2, 3)"""
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers separated by spaces or commas, got {text!r}") from exc
