"""Prometheus metrics of the service, with `prometheus_client`.

Each app has a registry of its own (several apps in one process, as in tests, do not collide). When
``PROMETHEUS_MULTIPROC_DIR`` is set (several worker processes behind one port), the counters and
histograms are written there by every worker and /metrics aggregates them with prometheus_client's
multi-process collector; the index size is read from the index at scrape time either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _IndexCollector:
    """``polyclip_index_vectors{space}``: read from the index when scraped, so it follows live adds."""

    def __init__(self, vector_counts: Callable[[], dict[str, int]]) -> None:
        self.vector_counts = vector_counts

    def collect(self):
        family = GaugeMetricFamily(
            "polyclip_index_vectors", "Vectors in the index by space.", labels=["space"]
        )
        for space, count in sorted(self.vector_counts().items()):
            family.add_metric([space], float(count))
        yield family


class ServiceMetrics:
    def __init__(self, vector_counts: Callable[[], dict[str, int]]) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # in multi-process mode the values live in the shared folder; the registry only names them
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "polyclip_requests",
            "HTTP requests by route and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "polyclip_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "polyclip_encoder_batch_size",
            "Items per encoder forward pass by input kind.",
            ["input"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.search_batch_size = Histogram(
            "polyclip_search_batch_size",
            "Queries per batched index search.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._index = _IndexCollector(vector_counts)
        if self.multiprocess:
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition)
            self.exposition.register(self._index)
        else:
            self.registry.register(self._index)
            self.exposition = self.registry

    def render(self) -> bytes:
        return generate_latest(self.exposition)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when absent), e.g. ``value("polyclip_search_batch_size_count")``."""
        return self.exposition.get_sample_value(name, labels) or 0.0
