"""The service's Prometheus metrics: what the gateway sees of requests, and what the backbones do with them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class RequestMetrics:
    """Requests by route and status, their latency and their inputs (kept by the gateway)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("restuning_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("restuning_request_seconds", "time from request to answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inputs = Histogram("restuning_request_inputs", "inputs per predict request", buckets=SIZE_BUCKETS,
                                registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def export(self) -> bytes:
        return generate_latest(self.registry)


class BatchMetrics:
    """Batches run by the backbone deployments: their sizes and the backbone forwards they took."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.forwards = Counter("restuning_backbone_forwards", "backbone forwards run", ["backbone"],
                                registry=self.registry)
        self.batches = Counter("restuning_batches", "batches answered", ["backbone"], registry=self.registry)
        self.batch_inputs = Histogram("restuning_batch_inputs", "inputs per batch", ["backbone"],
                                      buckets=SIZE_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("restuning_batch_requests", "requests per batch", ["backbone"],
                                        buckets=SIZE_BUCKETS, registry=self.registry)

    def record(self, backbone: str, requests: int, inputs: int, forwards: int) -> None:
        self.batches.labels(backbone).inc()
        self.forwards.labels(backbone).inc(forwards)
        self.batch_inputs.labels(backbone).observe(inputs)
        self.batch_requests.labels(backbone).observe(requests)

    def export(self) -> bytes:
        return generate_latest(self.registry)
