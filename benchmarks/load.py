"""Load test of the Label Studio backend on tiny models, loopback only, bounded in time.

    HF_HUB_OFFLINE=1 python -m benchmarks.load [--clients 64] [--duration 60] [--out benchmarks/results/load.json] [--smoke]

Starts the real server in its own process on 127.0.0.1, then `--clients` concurrent clients for `--duration` seconds
mix batch predictions (4 tasks: boxes, brush masks, polygons) and interactive clicks (a keypoint on one of a few
images, so the SAM embedding cache is exercised). Reports requests, failures (anything but 200, or a 200 holding a
task error; deliberate 503s are counted apart), latency percentiles per kind, the server's /metrics (queue, batch
sizes, cache hit rate) and its RSS growth from the first to the last 10 s. Exit status 1 when a target is missed:
0 failures, RSS growth <= 5 %. `--smoke`: 4 clients for 6 s (RSS compared over the first and last 2 s); the same
requests, measurements and JSON; a failed request still fails it, the RSS growth is not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Person"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
</View>"""

SERVER = """
import sys, uvicorn
from ml_backend.labelstudio.server import create_app
from ml_backend.engine import Engine
from ml_backend.settings import Settings
settings = Settings(detector=sys.argv[1], segmenter=sys.argv[2], model_dir=sys.argv[3])
uvicorn.run(create_app(Engine.from_settings(settings)), host="127.0.0.1", port=int(sys.argv[4]), log_level="error")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"batch": [], "interactive": []}
        self.status: dict[str, int] = {}
        self.failures: list[str] = []
        self.rejected = 0  # deliberate 503s

    def record(self, kind: str, seconds: float, response: httpx.Response | None, error: str | None = None) -> None:
        code = str(response.status_code) if response is not None else "exception"
        self.status[code] = self.status.get(code, 0) + 1
        if response is not None and response.status_code == 503 and response.headers.get("retry-after"):
            self.rejected += 1
            return
        if error or response is None or response.status_code != 200:
            self.failures.append(f"{kind}: {code} {error or response.text[:200]}")
            return
        errors = [r["error"] for r in response.json()["results"] if "error" in r]
        if errors:
            self.failures.append(f"{kind}: task errors {errors[:2]}")
            return
        self.latency[kind].append(seconds)


async def client(http: httpx.AsyncClient, url: str, stop: float, images: list[str], stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop:
        if rng.random() < 0.4:
            kind, image = "interactive", images[rng.randrange(4)]  # a few images: clicks mostly hit the cache
            region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                      "value": {"x": rng.uniform(5, 95), "y": rng.uniform(5, 95), "keypointlabels": ["Car"]}}
            body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG, "params": {"context": {"result": [region]}}}
        else:
            kind = "batch"
            tasks = [{"id": i, "data": {"image": rng.choice(images)}} for i in range(4)]
            body = {"tasks": tasks, "label_config": CONFIG, "project": "1.1700000000"}
        start = time.perf_counter()
        try:
            response = await http.post(f"{url}/predict", json=body)
            stats.record(kind, time.perf_counter() - start, response)
            if response.status_code == 503:
                await asyncio.sleep(float(response.headers.get("retry-after", 1)))
        except httpx.HTTPError as exc:
            stats.record(kind, time.perf_counter() - start, None, f"{type(exc).__name__}: {exc}")


def sample_rss(pid: int, samples: list[tuple[float, int]], stop: threading.Event, start: float) -> None:
    process = psutil.Process(pid)
    while not stop.wait(0.5):
        samples.append((time.monotonic() - start, process.memory_info().rss))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 90, 99)} | {"max": round(max(values), 4)}


async def run(url: str, clients: int, duration: float, images: list[str]) -> Stats:
    stats = Stats()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        stop = time.monotonic() + duration
        await asyncio.gather(*(client(http, url, stop, images, stats, seed) for seed in range(clients)))
    return stats


def main(argv: list[str] | None = None) -> int:
    from .harness import SMOKE_HELP, blocks_data_uri, result_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="default: results/load.json (results/smoke/ with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.duration = 4, 6.0
    args.out = args.out or result_path("load.json", args.smoke)
    window = min(10.0, args.duration / 3)  # seconds of RSS samples at the start and at the end
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ml_backend.models.tiny import write_tiny_models

    work = Path(tempfile.mkdtemp(prefix="prelabel-load-"))
    models = write_tiny_models(work / "models")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", SERVER, str(models["detector"]), str(models["segmenter"]), str(work / "model-dir"), str(port)]
    server = subprocess.Popen(cmd, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        images = [blocks_data_uri(w, h, i) for i, (w, h) in enumerate([(160, 120), (200, 150), (128, 96), (240, 180), (96, 128), (180, 140)])]
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        start = time.monotonic()
        sampler = threading.Thread(target=sample_rss, args=(server.pid, samples, stop, start), daemon=True)
        sampler.start()
        stats = asyncio.run(run(url, args.clients, args.duration, images))
        elapsed = time.monotonic() - start
        stop.set()
        sampler.join()
        metrics = httpx.get(f"{url}/metrics", timeout=10).json()
    finally:
        server.terminate()
        server.wait(20)
    first = [rss for t, rss in samples if t <= window]
    last = [rss for t, rss in samples if t >= elapsed - window]
    growth = (np.mean(last) - np.mean(first)) / np.mean(first) if first and last else float("nan")
    done = {k: len(v) for k, v in stats.latency.items()}
    result = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": args.smoke,
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests_ok": done,
        "throughput_rps": round(sum(done.values()) / elapsed, 2),
        "rejected_503": stats.rejected,
        "failed": len(stats.failures),
        "failures_sample": stats.failures[:10],
        "status_codes": stats.status,
        "latency_s": {k: percentiles(v) for k, v in stats.latency.items()},
        "rss_window_s": window,
        "rss_first_10s_mib": round(float(np.mean(first)) / 2**20, 1) if first else None,  # (the first `rss_window_s`)
        "rss_last_10s_mib": round(float(np.mean(last)) / 2**20, 1) if last else None,
        "rss_growth": round(float(growth), 4),
        "server": {k: metrics.get(k) for k in ("queue", "batch_size", "requests_per_batch", "timings_s", "errors", "embedding_cache")},
        "targets": {"failed": "== 0", "rss_growth": "<= 0.05"},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("requests_ok", "throughput_rps", "rejected_503", "failed", "latency_s", "rss_growth")}, indent=2))
    print(f"written to {args.out}")
    # a smoke run judges failed requests (they are bugs at any size) but not the RSS growth of a few seconds
    return 0 if result["failed"] == 0 and (args.smoke or growth <= 0.05) else 1


if __name__ == "__main__":
    raise SystemExit(main())
