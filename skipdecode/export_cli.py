"""Subcommands that need the export extra (torch, transformers, onnx). Parsers are built without importing
torch; handlers import it when they run."""

from __future__ import annotations

import argparse


def add_export_parsers(sub: argparse._SubParsersAction) -> None:
    pass


EXPORT_COMMANDS: dict = {}
