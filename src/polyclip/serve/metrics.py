"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters and histograms with labels; histograms expose cumulative ``_bucket{le=...}``, ``_sum`` and
``_count`` series as Prometheus expects (https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = tuple[tuple[str, str], ...]


def _format_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, value in pairs)
    return "{" + ",".join(f'{key}="{value}"' for (key, _), value in zip(pairs, escaped)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for labels, value in sorted(self._values.items()):
                lines.append(f"{self.name}{_format_labels(labels)} {_number(value)}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1  # bucket i counts values <= buckets[i]
            self._sums[key] += value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(tuple(sorted(labels.items())), []))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for labels, counts in sorted(self._counts.items()):
                running = 0
                for bound, count in zip(self.buckets, counts):
                    running += count
                    lines.append(
                        f"{self.name}_bucket{_format_labels(labels, (('le', _number(bound)),))} {running}"
                    )
                running += counts[-1]
                lines.append(f"{self.name}_bucket{_format_labels(labels, (('le', '+Inf'),))} {running}")
                lines.append(f"{self.name}_sum{_format_labels(labels)} {_number(self._sums[labels])}")
                lines.append(f"{self.name}_count{_format_labels(labels)} {running}")
        return lines


class Gauge:
    """A value read when the metrics are scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], dict[Labels, float]]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for labels, value in sorted(self.read().items()):
            lines.append(f"{self.name}{_format_labels(labels)} {_number(value)}")
        return lines


class ServiceMetrics:
    def __init__(self, index_sizes: Callable[[], dict[Labels, float]]) -> None:
        self.requests = Counter("polyclip_requests_total", "HTTP requests by route and status code.")
        self.latency = Histogram(
            "polyclip_request_duration_seconds", "HTTP request latency by route.", LATENCY_BUCKETS
        )
        self.batch_size = Histogram(
            "polyclip_encoder_batch_size", "Items per encoder forward pass by input kind.", BATCH_BUCKETS
        )
        self.search_batch_size = Histogram(
            "polyclip_search_batch_size", "Queries per batched index search.", BATCH_BUCKETS
        )
        self.items = Gauge("polyclip_index_vectors", "Vectors in the index by space.", index_sizes)

    def render(self) -> str:
        lines = []
        for metric in (self.requests, self.latency, self.batch_size, self.search_batch_size, self.items):
            lines += metric.render()
        return "\n".join(lines) + "\n"
