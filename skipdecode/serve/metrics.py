"""The server's Prometheus metrics as plain snapshots, so that several servers' (Ray replicas') can be summed.

A `Snapshot` is a JSON-able dict of raw sums: the service's counters (`Service.stats()`), the app's request
counters and its latency histogram's bucket counts. The text at `/metrics` is rendered from one snapshot: the
server's own, or on Ray the sum over every live replica's (`merge`), so a scrape through Ray's proxy describes the
whole application whichever replica answers it. Ratios (mean batch size, layers per token, draft acceptance) are
computed from the summed numerators and denominators, never averaged.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from skipdecode.runtime.service import Service, ServiceStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds; +Inf is implied
Snapshot = dict[str, Any]


class RequestCounters:
    """The app's own counts (thread-safe): refused requests, early hang-ups, request latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.invalid = self.gone = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket (not cumulative), the last is +Inf
        self.latency_sum = 0.0

    def refused(self) -> None:
        with self._lock:
            self.invalid += 1

    def hung_up(self) -> None:
        with self._lock:
            self.gone += 1

    def observe(self, seconds: float) -> None:
        with self._lock:
            i = next((k for k, le in enumerate(LATENCY_BUCKETS) if seconds <= le), len(LATENCY_BUCKETS))
            self.latency_counts[i] += 1
            self.latency_sum += seconds

    def snapshot(self, service: Service) -> Snapshot:
        with self._lock:
            return {"service": dataclasses.asdict(service.stats()), "invalid": self.invalid, "gone": self.gone,
                    "latency_counts": list(self.latency_counts), "latency_sum": self.latency_sum, "replicas": 1}


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of several servers' snapshots (every field is additive: counts, and gauges such as queue depth,
    running requests or tokens per second that add up over servers)."""
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("no snapshot to merge")
    out = {"service": {}, "invalid": 0, "gone": 0, "latency_counts": [0] * (len(LATENCY_BUCKETS) + 1),
           "latency_sum": 0.0, "replicas": 0}
    for snap in snapshots:
        for key, value in snap["service"].items():
            if isinstance(value, dict):
                bucket = out["service"].setdefault(key, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            else:
                out["service"][key] = out["service"].get(key, 0) + value
        for key in ("invalid", "gone", "latency_sum", "replicas"):
            out[key] += snap[key]
        out["latency_counts"] = [a + b for a, b in zip(out["latency_counts"], snap["latency_counts"], strict=True)]
    return out


class SnapshotCollector:
    """Prometheus families of one snapshot (taken at scrape time: nothing is updated on hot paths)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot
        s = ServiceStats(**snap["service"])
        done = CounterMetricFamily("skipdecode_requests_finished", "Finished requests by outcome", labels=["outcome"])
        for outcome, n in sorted(s.finished.items()):
            done.add_metric([outcome], n)
        yield done
        yield CounterMetricFamily("skipdecode_requests_submitted", "Requests accepted", value=s.submitted)
        yield CounterMetricFamily("skipdecode_requests_overloaded", "Requests refused: queue full",
                                  value=s.rejected_overloaded)
        yield CounterMetricFamily("skipdecode_requests_invalid", "Requests refused as invalid (4xx)",
                                  value=snap["invalid"])
        yield CounterMetricFamily("skipdecode_client_disconnects_before_body", "Clients that hung up before sending "
                                  "their whole request body (nothing was submitted for them)", value=snap["gone"])
        yield CounterMetricFamily("skipdecode_generated_tokens", "Tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("skipdecode_prefill_tokens", "Prompt tokens prefilled (long prompts in chunks of "
                                  "at most --max-prefill-tokens per step)", value=s.prefill_tokens)
        yield CounterMetricFamily("skipdecode_layers_executed", "Decoder layers run, summed over generated tokens",
                                  value=s.layers_executed)
        yield GaugeMetricFamily("skipdecode_tokens_per_second", "Tokens generated per second (trailing window)",
                                value=s.tokens_per_s)
        yield GaugeMetricFamily("skipdecode_queue_depth", "Requests waiting for admission", value=s.queue_depth)
        yield GaugeMetricFamily("skipdecode_running_requests", "Requests holding a KV slot", value=s.running)
        yield GaugeMetricFamily("skipdecode_batch_size", "Rows in the last decode step (summed over replicas)",
                                value=s.last_batch_size)
        yield GaugeMetricFamily("skipdecode_mean_batch_size", "Mean rows per decode step",
                                value=s.decoded_rows / s.decode_steps if s.decode_steps else 0.0)
        yield GaugeMetricFamily("skipdecode_mean_layers_per_token", "Mean decoder layers executed per token",
                                value=s.mean_layers_per_token)
        yield CounterMetricFamily("skipdecode_draft_tokens", "Lossless mode: tokens drafted by the shallow graphs",
                                  value=s.draft_tokens)
        yield CounterMetricFamily("skipdecode_accepted_draft_tokens",
                                  "Lossless mode: drafted tokens the full-depth verifier accepted",
                                  value=s.accepted_draft_tokens)
        yield GaugeMetricFamily("skipdecode_draft_acceptance_rate",
                                "Lossless mode: accepted / drafted tokens since start (0 before any draft)",
                                value=s.accepted_draft_tokens / s.draft_tokens if s.draft_tokens else 0.0)
        yield GaugeMetricFamily("skipdecode_graph_layers_per_row",
                                "Mean graph layers per decoded row (> layers per token when shallow rows are gated "
                                "inside a deeper graph)",
                                value=s.graph_row_layers / s.decoded_rows if s.decoded_rows else 0.0)
        cumulative, buckets = 0, []
        for le, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], snap["latency_counts"], strict=True):
            cumulative += n
            buckets.append((le, cumulative))
        yield HistogramMetricFamily("skipdecode_request_seconds", "Time from submit to the last token",
                                    buckets=buckets, sum_value=snap["latency_sum"])
        yield GaugeMetricFamily("skipdecode_replicas", "Servers these figures sum (Ray replicas that reported in "
                                "the last few seconds; 1 for `skipdecode serve`)", value=snap["replicas"])


def render(snapshot: Snapshot) -> tuple[bytes, str]:
    """-> (Prometheus text of `snapshot`, its content type)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST
