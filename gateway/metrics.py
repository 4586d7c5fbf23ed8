"""Prometheus metrics of one gateway, in a registry of its own (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "corral_requests",
            "Generation requests by outcome",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "From request received to first token sent",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.output_tokens = Counter(
            "corral_output_tokens", "Completion tokens sent to clients", ["model"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "corral_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "corral_queue_depth", "Requests waiting for a worker", ["model"], registry=self.registry
        )
        self.live_workers = Gauge(
            "corral_live_workers", "Workers with a live heartbeat", ["model"], registry=self.registry
        )

        # From the live workers' heartbeats: requests dropped because their client left (or their
        # deadline passed), and the tokens generated for them before they were dropped.
        self.worker_cancelled = Gauge(
            "corral_worker_cancelled_requests",
            "Requests live workers dropped unfinished",
            ["model"],
            registry=self.registry,
        )
        self.worker_tokens_wasted = Gauge(
            "corral_worker_tokens_wasted",
            "Tokens live workers generated for dropped requests",
            ["model"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
