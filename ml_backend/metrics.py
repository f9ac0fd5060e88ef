"""In-process counters for `/metrics`: requests, latencies, errors by kind, batch sizes, memory."""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter, defaultdict, deque

import numpy as np
import psutil


class Metrics:
    def __init__(self, window: int = 2048):
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self.batch_sizes: deque = deque(maxlen=window)

    def observe(self, route: str, seconds: float) -> None:
        with self._lock:
            self.requests[route] += 1
            self.latency[route].append(seconds)

    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.errors[kind] += n

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes.append(size)

    def snapshot(self) -> dict:
        with self._lock:
            latency = {
                route: {
                    f"p{q}": round(float(np.percentile(list(values), q)), 4) for q in (50, 90, 99)
                }
                for route, values in self.latency.items()
                if values
            }
            sizes = list(self.batch_sizes)
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": dict(self.requests),
                "latency_s": latency,
                "errors": dict(self.errors),
                "counts": dict(self.counts),
                "batch_size": {"mean": round(float(np.mean(sizes)), 2), "max": max(sizes)} if sizes else {},
                "memory": memory(),
            }


def memory() -> dict:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rss_bytes": psutil.Process().memory_info().rss, "peak_rss_bytes": peak_kib * 1024}

