"""Counters, gauges and histograms written in Prometheus' text format (version 0.0.4).

Small on purpose: the server needs a handful of series, and prometheus_client would be one more
dependency for users who never scrape. Updated from the event loop only, so no locks.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        if not self.values:
            yield f"{self.name} 0"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(dict(key))} {_number(value)}"


class Gauge:
    """A value read when scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_number(self.read())}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        self.name, self.help = name, help
        self.buckets = sorted(buckets) + [math.inf]
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for bound, count in zip(self.buckets, self.counts):
            yield f'{self.name}_bucket{{le="{_number(bound)}"}} {count}'
        yield f"{self.name}_sum {_number(self.sum)}"
        yield f"{self.name}_count {self.count}"


class ServerMetrics:
    """Every series /metrics shows; gauges read the live state through callables."""

    def __init__(self) -> None:
        self.prompt_tokens = Counter(
            "opencamp_prompt_tokens_total", "Prompt tokens of finished requests, cached ones included.")
        self.cached_prompt_tokens = Counter(
            "opencamp_prompt_tokens_cached_total",
            "Prompt tokens reused from the KV cache instead of recomputed.")
        self.generation_tokens = Counter(
            "opencamp_generation_tokens_total", "Tokens generated.")
        self.requests = Counter(
            "opencamp_requests_total",
            "Generation requests that ended, by endpoint and finish reason (stop, length, "
            "cancelled when the client went away, error).")
        self.http_errors = Counter(
            "opencamp_http_errors_total", "Requests answered with an error status, by status.")
        self.time_to_first_token = Histogram(
            "opencamp_time_to_first_token_seconds",
            "From a request's arrival (queueing included) to its first streamed text.",
            [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80])
        self.decode_speed = Histogram(
            "opencamp_decode_tokens_per_second",
            "Decode speed of each finished request (tokens after the first / decode time).",
            [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000])
        self.request_duration = Histogram(
            "opencamp_request_duration_seconds", "From arrival to the last token.",
            [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320])
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def render(self, extra: Iterable[str] = ()) -> str:
        lines: list[str] = []
        for series in (self.prompt_tokens, self.cached_prompt_tokens, self.generation_tokens,
                       self.requests, self.http_errors, *self.gauges, self.time_to_first_token,
                       self.decode_speed, self.request_duration):
            lines.extend(series.render())
        lines.extend(extra)
        return "\n".join(lines) + "\n"
