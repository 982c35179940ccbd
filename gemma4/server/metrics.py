"""Prometheus metrics of one server: requests, tokens, queue depth, time to first token, decode speed,
and speculative decoding's drafted and accepted tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _SpeculativeCounters:
    """Counters the engine keeps as plain numbers (Stats), read at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        yield CounterMetricFamily("gemma4_speculative_draft_tokens", "tokens drafted for speculative decoding",
                                  value=stats.draft_tokens)
        yield CounterMetricFamily("gemma4_speculative_accepted_tokens", "drafted tokens the model accepted",
                                  value=stats.accepted_tokens)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gemma4_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gemma4_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("gemma4_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("gemma4_time_to_first_token_seconds", "from request to its first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        Gauge("gemma4_queue_depth", "requests waiting for a batch row", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("gemma4_running_requests", "requests in the running batch", registry=r).set_function(
            lambda: engine.running)
        Gauge("gemma4_decode_tokens_per_second", "tokens per second of the last decode step",
              registry=r).set_function(lambda: engine.stats.decode_tokens_per_s)
        r.register(_SpeculativeCounters(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
