"""NVTX ranges for Nsight Systems: one `skipdecode` domain, a range per generation step and per graph call.

    with step_range(column, bucket, batch):       # payload {column, bucket, batch}, category "step"
        with graph_range("decode_b012"):          # message = the manifest's graph name, category "graph"
            session.run_with_iobinding(binding)

Ranges cost nothing unless a tool is recording: without the `nvtx` package, with `NVTX_DISABLE` or
`SKIPDECODE_NVTX=0` set, or when no NVTX tool (nsys) is attached, both functions return one shared no-op context
manager. The domain is looked up on first use, after an attached tool has injected itself at process start.

The step payload is a structured NVTX payload (numpy dtype `STEP_PAYLOAD`), so `nsys` shows the three fields by
name instead of a number packed into the message; the message stays constant ("step") so one registered string
serves every step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

DOMAIN = "skipdecode"
STEP_MESSAGE = "step"
STEP_CATEGORY = "step"
GRAPH_CATEGORY = "graph"
STEP_PAYLOAD = np.dtype([("column", np.int64), ("bucket", np.int32), ("batch", np.int32)])


class _NoRange:
    """The shared no-op context manager returned while nothing records."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return False


NO_RANGE = _NoRange()


class _Range:
    """Push on enter, pop on exit (also when the body raises), on one domain."""

    __slots__ = ("_domain", "_attributes")

    def __init__(self, domain, attributes) -> None:
        self._domain, self._attributes = domain, attributes

    def __enter__(self) -> None:
        self._domain.push_range(self._attributes)

    def __exit__(self, *exc) -> bool:
        self._domain.pop_range()
        return False


class Annotator:
    """Ranges on one NVTX domain object (`nvtx.Domain` or anything with its `get_event_attributes`,
    `push_range(attributes)` and `pop_range()`), or no-ops when `domain` is None."""

    def __init__(self, domain) -> None:
        self.domain = domain
        self._graph_attributes: dict[str, object] = {}  # one registered message per graph name

    @property
    def active(self) -> bool:
        return self.domain is not None

    def step(self, column: int, bucket: int, batch: int):
        if self.domain is None:
            return NO_RANGE
        payload = np.array((column, bucket, batch), dtype=STEP_PAYLOAD)
        attributes = self.domain.get_event_attributes(message=STEP_MESSAGE, category=STEP_CATEGORY, payload=payload)
        return _Range(self.domain, attributes)

    def graph(self, name: str):
        if self.domain is None:
            return NO_RANGE
        attributes = self._graph_attributes.get(name)
        if attributes is None:
            attributes = self.domain.get_event_attributes(message=name, category=GRAPH_CATEGORY)
            self._graph_attributes[name] = attributes
        return _Range(self.domain, attributes)


def nvtx_domain(name: str = DOMAIN):
    """The `nvtx` package's domain `name`, or None when nothing would record (see the module docstring)."""
    if os.environ.get("SKIPDECODE_NVTX", "1") == "0":
        return None
    try:
        import nvtx
    except ImportError:  # the package is optional (the `gpu` extra); ranges are then no-ops
        return None
    if not nvtx.enabled():
        return None
    domain = nvtx.get_domain(name)
    # Without an attached tool the package hands out a dummy domain whose attributes are None: skip the work.
    if domain.get_event_attributes(message=STEP_MESSAGE) is None:
        return None
    return domain


_annotator: Annotator | None = None


def annotator() -> Annotator:
    """The process-wide annotator, created on first use."""
    global _annotator
    if _annotator is None:
        _annotator = Annotator(nvtx_domain())
    return _annotator


def step_range(column: int, bucket: int, batch: int):
    """Range around one generation step: step number `column` of its batcher, the deepest graph `bucket` it runs
    (the full depth for a prefill-only step), over `batch` rows (decoded plus prefilled)."""
    return annotator().step(column, bucket, batch)


def graph_range(name: str):
    """Range around one call of the graph `name` (the manifest's graph name: "prefill", "decode_b012")."""
    return annotator().graph(name)


def active() -> bool:
    return annotator().active


@contextmanager
def use_domain(domain) -> Iterator[Annotator]:
    """Route ranges to `domain` (an NVTX domain or a recorder with the same methods) for the block; tests and
    tools that drive their own NVTX domain use this."""
    global _annotator
    previous, _annotator = _annotator, Annotator(domain)
    try:
        yield _annotator
    finally:
        _annotator = previous
