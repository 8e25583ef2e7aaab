"""Prometheus metrics of the server, with vLLM's names under the `pagedjax:` prefix.

Histograms and token counters are fed on the engine thread as steps finish
(prometheus_client is thread-safe); pool and queue gauges and the engine's cumulative
counters (preemptions, prefix cache) are read from `LLM.memory_stats()` at scrape time.
Each server has its own registry, so tests can run several in one process.
"""

from __future__ import annotations

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "pagedjax:"
prom.disable_created_metrics()  # no *_created series (as vLLM)

# Buckets as vLLM's (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)


class _StatsCollector:
  """Gauges and cumulative counters from the latest memory_stats() snapshot."""

  def __init__(self, model_name: str):
    self.model_name = model_name
    self.stats: dict = {}

  def collect(self):
    s = self.stats
    if not s:
      return
    label = ["model_name"]
    value = [self.model_name]

    def gauge(name, doc, v):
      g = GaugeMetricFamily(PREFIX + name, doc, labels=label)
      g.add_metric(value, float(v))
      return g

    used = s["num_blocks"] - s["num_free_blocks"]
    yield gauge("num_requests_running", "Requests in the running batch.",
                s["num_running_requests"])
    yield gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                s["num_waiting_requests"])
    yield gauge("num_requests_swapped", "Requests swapped out to the host pool.",
                s["num_swapped_requests"])
    yield gauge("kv_cache_usage_perc", "Fraction of device KV blocks in use (1 = full).",
                used / max(1, s["num_blocks"]))
    yield gauge("kv_blocks_total", "Device KV blocks.", s["num_blocks"])
    yield gauge("kv_blocks_used", "Device KV blocks referenced by a sequence.",
                s["num_blocks"] - s["num_free_blocks"])
    yield gauge("kv_blocks_free", "Device KV blocks free or evictable (cached, unreferenced).",
                s["num_free_blocks"])
    yield gauge("kv_blocks_cached", "Device KV blocks holding a cached prefix block.",
                s["num_cached_blocks"])
    yield gauge("host_blocks_used", "Host swap-pool blocks in use.", s["host_blocks_used"])
    yield gauge("host_blocks_total", "Host swap-pool blocks.", s["total_host_blocks"])
    c = CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions by kind.",
                            labels=label + ["kind"])
    for kind in ("recompute", "swap"):
      c.add_metric(value + [kind], float(s[f"num_preemptions_{kind}"]))
    yield c
    for name, key, doc in (
        ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
        ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens served from the prefix cache."),
        ("num_evicted_blocks", "num_evicted_blocks", "Cached blocks evicted for reuse.")):
      c = CounterMetricFamily(PREFIX + name, doc, labels=label)
      c.add_metric(value, float(s[key]))
      yield c


class Metrics:
  """The server's registry and the metrics fed from the engine loop."""

  def __init__(self, model_name: str):
    self.registry = prom.CollectorRegistry()
    self.model_name = model_name
    kw = dict(labelnames=["model_name"], registry=self.registry)
    self.prompt_tokens = prom.Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                      "and running requests.", **kw).labels(model_name)
    self.generation_tokens = prom.Counter(PREFIX + "generation_tokens", "Generated tokens.",
                                          **kw).labels(model_name)
    self.request_success = prom.Counter(PREFIX + "request_success", "Finished requests by "
                                        "finish reason.", labelnames=["model_name", "finished_reason"],
                                        registry=self.registry)
    self.ttft = prom.Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token.",
                               buckets=TTFT_BUCKETS, **kw).labels(model_name)
    self.itl = prom.Histogram(PREFIX + "inter_token_latency_seconds", "Time between a request's "
                              "consecutive output steps.", buckets=ITL_BUCKETS, **kw).labels(model_name)
    self.e2e = prom.Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish.",
                              buckets=E2E_BUCKETS, **kw).labels(model_name)
    self.http_errors = prom.Counter(PREFIX + "http_errors", "Error responses by status.",
                                    labelnames=["model_name", "status"], registry=self.registry)
    self._stats = _StatsCollector(model_name)
    self.registry.register(self._stats)

  def update(self, stats: dict) -> None:
    self._stats.stats = stats

  def render(self) -> bytes:
    return prom.generate_latest(self.registry)
