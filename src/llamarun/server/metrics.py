"""GET /metrics in Prometheus text format (prometheus-client), one registry per app so several
servers in one process (tests) never share counters. What is counted where:
- HTTP requests by endpoint (the route's path) and status: `CountRequests`, an ASGI middleware;
- prompt and generated tokens, time to first token and time per output token: the scheduler
  reports each job's tokens to `Metrics` on the engine thread (prometheus-client is thread-safe);
- running and waiting requests, KV cache use, the prefix cache's and speculative decoding's
  figures (with the steps it fell back to plain decoding because requests shared the batch):
  read from the scheduler and the engine at scrape time (`EngineCollector`), never stale."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .scheduler import Job, Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The app's registry and the figures the scheduler reports (see `Scheduler.observer`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llamarun_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llamarun_prompt_tokens", "Prompt tokens of the requests answered", registry=r
        )
        self.generation_tokens = Counter(
            "llamarun_generation_tokens", "Tokens generated (stop tokens included)", registry=r
        )
        self.time_to_first_token = Histogram(
            "llamarun_time_to_first_token_seconds",
            "From a request reaching the engine thread to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "llamarun_time_per_output_token_seconds",
            "Between two tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch(self, scheduler: Scheduler) -> None:
        self.registry.register(EngineCollector(scheduler))

    # called by the scheduler on the engine thread
    def token(self, job: Job, now: float) -> None:
        if job.last_token_at is None:
            self.time_to_first_token.observe(now - job.submitted_at)
        else:
            self.time_per_output_token.observe(now - job.last_token_at)

    def finished(self, job: Job) -> None:
        self.prompt_tokens.inc(len(job.prompt_ids))
        self.generation_tokens.inc(job.n_tokens)


class EngineCollector(Collector):
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        scheduler, engine = self.scheduler, self.scheduler.engine
        yield GaugeMetricFamily(
            "llamarun_requests_running", "Requests holding a cache row", len(scheduler.running)
        )
        waiting = len(scheduler.waiting) + scheduler.inbox.qsize()
        yield GaugeMetricFamily("llamarun_requests_waiting", "Requests queued for a row", waiting)
        held = sum(s.pos for s in list(engine.slots) if s is not None)
        capacity = len(engine.slots) * engine.max_seq_len
        yield GaugeMetricFamily("llamarun_kv_cache_tokens", "Positions running requests hold", held)
        yield GaugeMetricFamily(
            "llamarun_kv_cache_usage_ratio",
            "Share of the KV cache running requests hold",
            held / capacity,
        )
        yield CounterMetricFamily(
            "llamarun_prompt_tokens_prefilled",
            "Prompt tokens run through the model (not reused from the prefix cache)",
            engine.prefilled_tokens,
        )
        yield from self.prefix_cache(engine)
        yield from self.speculation(engine)

    @staticmethod
    def prefix_cache(engine) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        prefix = engine.prefix
        if prefix is None:
            return
        stats, pool = prefix.stats, prefix.pool
        for name, text, value in (
            ("queries", "Prompts looked up in the prefix cache", stats.prompts),
            ("hits", "Prompts that reused at least one cached chunk", stats.hits),
            ("cached_tokens", "Prompt tokens reused instead of prefilled", stats.cached_tokens),
        ):
            yield CounterMetricFamily(f"llamarun_prefix_cache_{name}", text, value)
        yield GaugeMetricFamily(
            "llamarun_prefix_cache_bytes", "Bytes of saved prefix chunks", pool.used_bytes
        )
        yield GaugeMetricFamily(
            "llamarun_prefix_cache_capacity_bytes",
            "Bytes the saved prefix chunks may take (--prefix-cache-mb)",
            pool.capacity * pool.bytes_per_page,
        )

    @staticmethod
    def speculation(engine) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Speculative decoding's counts; `fallback_steps` are the steps it could not run because
        other requests shared the batch (they decode plainly together)."""
        spec = engine.speculator
        if spec is None:
            return
        stats = spec.stats
        for name, text, value in (
            ("rounds", "Forwards that checked a draft", stats.rounds),
            ("draft_tokens", "Draft tokens checked", stats.proposed),
            ("accepted_tokens", "Draft tokens kept", stats.accepted),
            ("emitted_tokens", "Tokens the checking forwards produced", stats.emitted),
            (
                "plain_steps",
                "Steps of a lone request with no draft worth checking",
                stats.plain_steps,
            ),
            (
                "fallback_steps",
                "Steps with several requests running, decoded plainly without speculation",
                stats.batched_steps,
            ),
        ):
            yield CounterMetricFamily(f"llamarun_speculative_{name}", text, value)
        yield GaugeMetricFamily(
            "llamarun_speculative_acceptance_ratio",
            "Share of checked draft tokens kept",
            stats.acceptance_rate,
        )


class CountRequests:
    """ASGI middleware: counts each HTTP request by its route's path and its status. Pure ASGI
    (not BaseHTTPMiddleware), so streaming and client disconnects pass through untouched."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app fails before answering

        async def send_counting(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = scope.get("route")  # set by the router on a match: bounded label values
            endpoint = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()


router = APIRouter()  # behind the server's --api-key, as app.py includes it


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.server.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
