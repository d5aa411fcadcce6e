"""Prometheus metrics of the HTTP service, in a registry of its own per app (so two apps in one
process, as in the tests, never share or clash over counters)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.guard import Guard, GuardResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Score buckets are offsets from the detector's threshold (the "+0" bucket splits accepted from
# flagged); scores differ in scale between families (logits, distances), hence the decades.
SCORE_OFFSETS = (-1000.0, -100.0, -10.0, -1.0, -0.1, 0.0, 0.1, 1.0, 10.0, 100.0, 1000.0)


class _GuardCollector(Collector):
    """The guard's running counts (`Guard.stats`), read at scrape time, and its threshold."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        stats = self.guard.stats
        for name, value, text in (
            ("inputs", stats.inputs, "Inputs the guard scored"),
            ("flagged", stats.flagged, "Inputs flagged: score above the threshold, or the detector failed"),
            ("rejected", stats.rejected, "Inputs rejected (flagged under the reject policy)"),
            ("detector_errors", stats.detector_errors, "Inputs the detector failed on (scored NaN or raised)"),
        ):
            yield CounterMetricFamily(f"safetynet_guard_{name}", text, value=value)
        yield GaugeMetricFamily("safetynet_guard_threshold", "The detector's calibrated threshold",
                                value=self.guard.detector.threshold)


class _QuarantineCollector(Collector):
    """The quarantine's counters (`Quarantine.stats`), read at scrape time: a reject counts as stored
    only once its transaction committed, so after a crash the store holds at least that many."""

    def __init__(self, quarantine: Any) -> None:
        self.quarantine = quarantine

    def collect(self) -> Iterator[Metric]:
        stats = self.quarantine.stats()
        stored = CounterMetricFamily("safetynet_quarantine_stored", "Records committed to the quarantine store, "
                                     "by verdict", labels=["verdict"])
        for verdict in ("rejected", "accepted"):
            stored.add_metric([verdict], stats[f"stored_{verdict}"])
        yield stored
        yield GaugeMetricFamily("safetynet_quarantine_queue_depth", "Records queued, not yet committed",
                                value=stats["queue_depth"])
        for name, text in (("dropped", "Records lost: a failed write, or recorded after close"),
                           ("refused", "Records turned away with 503 because the queue was full"),
                           ("commits", "Quarantine transactions committed")):
            yield CounterMetricFamily(f"safetynet_quarantine_{name}", text, value=stats[name])


class ServiceMetrics:
    """Requests by endpoint and status code, latency, batch sizes, detector scores, upstream and
    quarantine failures, the quarantine's counters and the guard's own counts."""

    def __init__(self, guard: Guard, max_batch: int, quarantine: Any | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("safetynet_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("safetynet_http_request_duration_seconds", "Time to answer a request, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        sizes = sorted({2**k for k in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("safetynet_batch_size", "Instances per guarded request",
                                    buckets=sizes, registry=self.registry)
        threshold = guard.detector.threshold
        self.scores = Histogram("safetynet_detector_score", "Detector scores (finite ones; buckets are offsets "
                                "from the threshold)", buckets=[threshold + d for d in SCORE_OFFSETS],
                                registry=self.registry)
        self.upstream_errors = Counter("safetynet_upstream_errors", "Failed calls to the upstream model server",
                                       registry=self.registry)
        self.quarantine_errors = Counter("safetynet_quarantine_errors", "Answered batches the quarantine did not "
                                         "confirm as stored (a write error or a commit slower than the wait)",
                                         registry=self.registry)
        self.registry.register(_GuardCollector(guard))
        if quarantine is not None:
            self.registry.register(_QuarantineCollector(quarantine))
        ProcessCollector(registry=self.registry)  # memory, CPU and open files of the server process

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_result(self, result: GuardResult) -> None:
        self.batch_size.observe(len(result.scores))
        for score in result.scores[np.isfinite(result.scores)]:
            self.scores.observe(float(score))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
