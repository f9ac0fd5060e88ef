"""In-process counters for `/metrics`: requests, latencies, errors by kind, batch sizes, queue, memory; as JSON or
in Prometheus' text format."""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter, defaultdict, deque

import numpy as np
import psutil

QUANTILES = (50, 90, 99)


def _percentiles(values) -> dict:
    return {f"p{q}": round(float(np.percentile(list(values), q)), 4) for q in QUANTILES}


class Metrics:
    def __init__(self, window: int = 2048):
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self.timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))  # queue wait, inference, ...
        self.batch_sizes: deque = deque(maxlen=window)
        self.batch_requests: deque = deque(maxlen=window)  # requests merged into one model batch

    def observe(self, route: str, seconds: float) -> None:
        with self._lock:
            self.requests[route] += 1
            self.latency[route].append(seconds)

    def timing(self, name: str, seconds: float) -> None:
        with self._lock:
            self.timings[name].append(seconds)

    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.errors[kind] += n

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes.append(size)

    def merged(self, requests: int) -> None:
        with self._lock:
            self.batch_requests.append(requests)

    def snapshot(self) -> dict:
        with self._lock:
            sizes, merged = list(self.batch_sizes), list(self.batch_requests)
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": dict(self.requests),
                "latency_s": {route: _percentiles(v) for route, v in self.latency.items() if v},
                "timings_s": {name: _percentiles(v) for name, v in self.timings.items() if v},
                "errors": dict(self.errors),
                "counts": dict(self.counts),
                "batch_size": {"mean": round(float(np.mean(sizes)), 2), "max": max(sizes)} if sizes else {},
                "requests_per_batch": {"mean": round(float(np.mean(merged)), 2), "max": max(merged)} if merged else {},
                "memory": memory(),
            }


def memory() -> dict:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rss_bytes": psutil.Process().memory_info().rss, "peak_rss_bytes": peak_kib * 1024}


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def prometheus(snapshot: dict) -> str:
    """The JSON snapshot of `/metrics` in Prometheus' text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        if not samples:
            return
        lines.extend([f"# HELP prelabel_{name} {help_}", f"# TYPE prelabel_{name} {kind}"])
        for labels, value in samples:
            tags = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"prelabel_{name}{{{tags}}} {value}" if tags else f"prelabel_{name} {value}")

    def quantiles(table: dict, key: str) -> list[tuple[dict, float]]:
        return [({key: k, "quantile": str(int(p[1:]) / 100)}, v) for k, ps in table.items() for p, v in ps.items()]

    metric("uptime_seconds", "gauge", "Seconds since start.", [({}, snapshot["uptime_s"])])
    metric("requests_total", "counter", "Requests by route.", [({"route": r}, n) for r, n in snapshot["requests"].items()])
    metric("request_latency_seconds", "summary", "Request latency by route.", quantiles(snapshot["latency_s"], "route"))
    metric("stage_seconds", "summary", "Queue wait and inference time.", quantiles(snapshot.get("timings_s", {}), "stage"))
    metric("errors_total", "counter", "Errors by kind.", [({"kind": k}, n) for k, n in snapshot["errors"].items()])
    metric("events_total", "counter", "Counted events.", [({"name": k}, n) for k, n in snapshot["counts"].items()])
    metric("batch_size", "gauge", "Images per model batch (recent window).", [({"stat": k}, v) for k, v in snapshot["batch_size"].items()])
    metric("requests_per_batch", "gauge", "Requests merged per model batch.", [({"stat": k}, v) for k, v in snapshot.get("requests_per_batch", {}).items()])
    queue = snapshot.get("queue", {})
    metric("queue_depth", "gauge", "Requests admitted and not answered, by lane.", [({"lane": k}, v) for k, v in queue.get("admitted", {}).items()])
    metric("queue_capacity", "gauge", "Admitted requests allowed per lane.", [({}, queue["capacity"])] if "capacity" in queue else [])
    cache = snapshot.get("embedding_cache") or {}
    metric("embedding_cache_hit_ratio", "gauge", "SAM image-embedding cache hit rate.", [({}, cache["hit_rate"])] if "hit_rate" in cache else [])
    metric("webhook_events_total", "counter", "Webhook events stored.", [({"action": a}, n) for a, n in snapshot.get("webhook_events", {}).items()])
    training = snapshot.get("training") or {}
    if training:
        progress = training.get("progress") or {}
        metric("training_state", "gauge", "Background distillation: 1 for its current state.",
               [({"state": training["state"], "project": training.get("project", "")}, 1)])
        metric("training_epoch", "gauge", "Epochs finished by the running or last distillation.",
               [({}, progress["epoch"])] if "epoch" in progress else [])
        metric("training_val_map", "gauge", "Best validation mAP@[.5:.95] of the running or last distillation.",
               [({}, progress["best_map"])] if "best_map" in progress else [])
    metric("memory_bytes", "gauge", "Resident memory.", [({"kind": k.removesuffix("_bytes")}, v) for k, v in snapshot["memory"].items()])
    return "\n".join(lines) + "\n"
