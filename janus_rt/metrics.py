"""`janus-rt serve`'s GET /metrics: the server's requests and its engine's state in Prometheus' text format
(prometheus_client, one registry per server).

    janus_rt_http_responses_total{path, code}     counter    responses by path (others: "other") and status code
    janus_rt_http_stream_errors_total{path, code} counter    streams ended by an `event: error` (their status line
                                                              said 200), by the error's code
    janus_rt_request_latency_seconds{endpoint}    histogram  submission to the last token, per finished request
    janus_rt_time_to_first_token_seconds{endpoint} histogram  submission to the first token
    janus_rt_images_total                          counter    images returned (/v1/images, /v1/images/generations)
    janus_rt_requests_open                         gauge      requests received (bodies read) and not yet
                                                              answered (serve's --max-requests bounds it)
    janus_rt_engine_*                              the BackgroundEngine's state() at scrape time: requests running /
                                                   waiting / pending, rows running, KV blocks used / total and their
                                                   usage ratio, decode steps, preemptions, prefill and decode seconds,
                                                   requests resolved by outcome, tokens sampled by kind, and up (0 once
                                                   the engine thread has stopped: an error, or the server closing)
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds: a tiny model's image takes ~0.1 s, a 1B one on a 2-core CPU ~1 min, a batch of 7B ones longer
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    """The counters a server updates from its connections' threads (prometheus_client's are thread-safe), and its
    engine's state read when scraped. render() -> (body, content type)."""

    def __init__(self, state, open_requests, paths):
        """state() -> a BackgroundEngine.state() dict, open_requests() -> the server's open requests (each called at
        each scrape); paths: those labelled by name (any other is "other")."""
        self.paths = frozenset(paths)
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter("janus_rt_http_responses", "HTTP responses by path and status code", ["path", "code"],
                                 registry=r)
        self.stream_errors = Counter("janus_rt_http_stream_errors", "Streamed responses (200) that ended with an "
                                     "error event, by path and the error's code", ["path", "code"], registry=r)
        self.latency = Histogram("janus_rt_request_latency_seconds", "Seconds from a request's submission to its last "
                                 "token (finished requests)", ["endpoint"], buckets=BUCKETS, registry=r)
        self.first_token = Histogram("janus_rt_time_to_first_token_seconds", "Seconds from a request's submission to "
                                     "its first token (finished requests)", ["endpoint"], buckets=BUCKETS, registry=r)
        self.images = Counter("janus_rt_images", "Images returned (/v1/images, /v1/images/generations)", registry=r)
        Gauge("janus_rt_requests_open", "Requests received (bodies read) and not yet answered",
              registry=r).set_function(open_requests)
        r.register(_EngineCollector(state))

    def response(self, path: str, code: int) -> None:
        self.responses.labels(self._label(path), str(code)).inc()

    def stream_error(self, path: str, code: int) -> None:
        self.stream_errors.labels(self._label(path), str(code)).inc()

    def _label(self, path: str) -> str:
        path = path.split("?")[0]  # (a query is ignored)
        return path if path in self.paths else "other"

    def request(self, endpoint: str, time_to_first_token: float, latency: float) -> None:
        self.first_token.labels(endpoint).observe(time_to_first_token)
        self.latency.labels(endpoint).observe(latency)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's state() as metric families, read at each scrape."""

    GAUGES = (("requests_running", "Requests in the running batch"),
              ("requests_waiting", "Requests waiting for KV blocks (a preempted one waits again)"),
              ("requests_pending", "Requests submitted, not yet taken in at a step boundary"),
              ("rows_running", "Rows of the running batch (an image request has 2 an image: CFG)"),
              ("kv_cache_blocks_used", "KV cache blocks in use"),
              ("kv_cache_blocks", "KV cache blocks in the pool"))
    COUNTERS = (("decode_steps", "Decode steps run"), ("preemptions", "Requests preempted for KV blocks"),
                ("prefill_seconds", "Seconds spent in prefills"), ("decode_seconds", "Seconds spent in decode steps"))

    def __init__(self, state):
        self._state = state

    def describe(self):  # (register() would otherwise collect once, reading the engine at start-up)
        return []

    def collect(self):
        st = self._state()
        for name, doc in self.GAUGES:
            yield GaugeMetricFamily(f"janus_rt_engine_{name}", doc, value=st[name])
        yield GaugeMetricFamily("janus_rt_engine_kv_cache_usage_ratio", "KV cache blocks in use / in the pool",
                                value=st["kv_cache_usage"])
        yield GaugeMetricFamily("janus_rt_engine_up", "1 while the engine thread runs (0: stopped on an error or "
                                "closed; restart the server)", value=int(st["up"]))
        for name, doc in self.COUNTERS:
            yield CounterMetricFamily(f"janus_rt_engine_{name}", doc, value=st[name])
        outcomes = CounterMetricFamily("janus_rt_engine_requests", "Requests resolved, by outcome (refused: too big "
                                       "for the KV cache or bad values)", labels=["outcome"])
        for outcome in ("finished", "aborted", "failed", "refused"):
            outcomes.add_metric([outcome], st[outcome])
        yield outcomes
        tokens = CounterMetricFamily("janus_rt_engine_tokens", "Tokens sampled, by kind (an image request samples n a "
                                     "step)", labels=["kind"])
        for kind in ("image", "text"):
            tokens.add_metric([kind], st[f"{kind}_tokens"])
        yield tokens
