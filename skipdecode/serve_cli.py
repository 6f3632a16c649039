"""`skipdecode serve`: the HTTP server (skipdecode/serve/) as a subcommand. Parser only at import time: its flags
derive from `ServeConfig`, and the server libraries are imported when the command runs.

Also runnable alone (`python -m skipdecode.serve_cli --engine DIR --port N`), which the soak benchmark uses to
measure the server in its own process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from skipdecode.serve.config import ServeConfig, add_arguments


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="HTTP server: OpenAI-style /v1/completions with continuous batching")
    add_arguments(p)


def run_serve(args) -> int:
    """Load the engine, start the service and serve until SIGINT/SIGTERM; then drain and stop. With --ray: the
    same server on Ray Serve replicas (skipdecode/serve/ray.py)."""
    config = ServeConfig.from_args(args)
    if not config.ray:
        from skipdecode.serve.build import run
        return run(config)
    from skipdecode.runtime.errors import InputError
    from skipdecode.serve.net import warn_if_exposed
    try:
        from skipdecode.serve import ray
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Serve ({exc}): pip install -e '.[ray]'") from None
    warn_if_exposed(config.host, config.api_key)
    return ray.run(config)


def main(argv: Sequence[str] | None = None) -> int:
    from skipdecode.runtime.errors import SkipDecodeError

    parser = argparse.ArgumentParser(prog="skipdecode-serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except SkipDecodeError as exc:
        print(f"skipdecode serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while Ray or the engine was still loading
        print("skipdecode serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
