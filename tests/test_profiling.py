"""NVTX ranges: names, categories and payloads on the `skipdecode` domain, nesting, and the no-op paths.

A recorder with the `nvtx.Domain` methods the module calls stands in for a live Nsight session (no tool can be
attached in tests); `nvtx_domain` is checked against the real package, which hands out no domain without a tool.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from skipdecode.runtime import profiling
from skipdecode.runtime.profiling import (
    DOMAIN,
    NO_RANGE,
    STEP_PAYLOAD,
    Annotator,
    graph_range,
    nvtx_domain,
    step_range,
    use_domain,
)

from .recorders import RecordingDomain


def test_step_and_graph_ranges_nest_with_names_and_payload():
    rec = RecordingDomain()
    with use_domain(rec):
        with step_range(column=9, bucket=12, batch=3):
            with graph_range("decode_b012"):
                pass
    kinds = [e[0] for e in rec.events]
    assert kinds == ["push", "push", "pop", "pop"]
    step, graph = rec.events[0][1], rec.events[1][1]
    assert (step["message"], step["category"]) == ("step", "step")
    assert (graph["message"], graph["category"]) == ("decode_b012", "graph")
    payload = step["payload"]
    assert payload.dtype == STEP_PAYLOAD and payload.shape == ()
    assert (int(payload["column"]), int(payload["bucket"]), int(payload["batch"])) == (9, 12, 3)


def test_graph_attributes_are_registered_once_per_name():
    rec = RecordingDomain()
    with use_domain(rec):
        for _ in range(5):
            with graph_range("prefill"):
                pass
    assert rec.attribute_calls == 1
    assert len(rec.events) == 10


def test_range_is_popped_when_the_body_raises():
    rec = RecordingDomain()
    with use_domain(rec), pytest.raises(ValueError):
        with step_range(4, 6, 1):
            raise ValueError("boom")
    assert [e[0] for e in rec.events] == ["push", "pop"]


def test_use_domain_restores_the_previous_annotator():
    before = profiling.annotator()
    with use_domain(RecordingDomain()):
        assert profiling.active()
    assert profiling.annotator() is before


def test_no_domain_means_shared_no_op():
    ann = Annotator(None)
    assert ann.step(1, 2, 3) is NO_RANGE and ann.graph("prefill") is NO_RANGE
    with ann.step(1, 2, 3), ann.graph("prefill"):
        pass


def test_no_tool_attached_gives_no_domain():
    pytest.importorskip("nvtx", reason="the nvtx package (gpu extra) is not installed")
    # pytest runs without Nsight: the package hands out a dummy domain, which must turn into "no ranges"
    assert nvtx_domain(DOMAIN) is None


def test_disabled_or_missing_nvtx_gives_no_domain(monkeypatch):
    monkeypatch.setenv("SKIPDECODE_NVTX", "0")
    assert nvtx_domain() is None
    monkeypatch.delenv("SKIPDECODE_NVTX")
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    assert nvtx_domain() is None


def test_payload_layout_is_stable():
    # nsys shows payload fields by these names; the layout is part of what a profile reader relies on
    assert STEP_PAYLOAD.names == ("column", "bucket", "batch")
    assert STEP_PAYLOAD.itemsize == 16
    np.array((1, 2, 3), dtype=STEP_PAYLOAD)
