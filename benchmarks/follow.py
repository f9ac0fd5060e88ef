"""`python -m benchmarks.follow [--events 10000] [--out PATH] [--smoke]`: following a Label Studio project under load
and faults (issue 19), on tiny models, loopback only, every loop bounded by count and time.

`prelabel serve` runs as a subprocess (tiny Grounding DINO + SAM, PRELABEL_FOLLOW=true, MODEL_DIR in a temporary
directory) against a stand-in for Label Studio's API in this process (`LabelStudioStub`: the endpoints the follower's
label-studio-sdk calls use, with the shapes the SDK parses; the real Label Studio cannot take 10,000 tasks times
several API calls in a benchmark's time, and its behaviour is covered by tests/test_follow_labelstudio.py). Measures:

- (a) a burst of TASKS_CREATED events (one task each, from a few concurrent clients): every task predicted exactly
  once (losses 0, duplicates 0), the time to drain, the webhook's answer latency, the peak backlog in /metrics;
- (b) interactive /predict (a smart keypoint -> SAM mask) p95 latency idle and during the burst; target ratio <= 2;
- (c) kill -9 of the server in the middle of a backlog (right after Label Studio stored a batch's predictions, before
  the server marked them done), a restart on the same MODEL_DIR: the backlog finishes, still exactly once;
- (d) the stand-in unreachable for a while (503s, then refused connections) in the middle of a backlog, with events
  still arriving: retried with backoff (retries seen in /metrics), nothing lost.

`--smoke`: 300 events, a shorter outage, seconds; losses and duplicates still fail it. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from .harness import SMOKE_HELP, BackendProcess, blocks_data_uri, exit_status, proc_rss, result_path

TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy-style token: `Authorization: Token <key>`
EARLIER_VERSION = "an-earlier-model"  # some tasks already carry a prediction of another model version
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
</View>"""
SIZES = [(160, 120), (200, 150), (128, 96), (240, 180), (96, 128), (180, 140)]  # never square (tiny Grounding DINO)
TARGET_INTERACTIVE_RATIO = 2.0
console = Console()


def data_uri(seed: int) -> tuple[str, int, int]:
    """A small PNG of a few coloured blocks as a data URI (no image fetching), and its size."""
    width, height = SIZES[seed % len(SIZES)]
    return blocks_data_uri(width, height, seed), width, height


# -- the stand-in for Label Studio's API -----------------------------------------------------------------------------


class LabelStudioStub:
    """Label Studio's API as the follower uses it, on 127.0.0.1, in a thread: projects get, the task list with the
    Data Manager's id filter (`fields`/`include`, pages of 100, 404 "Invalid page." past the end as Label Studio
    answers and the SDK's pager expects), projects import_predictions, tasks update (PATCH), ml list, webhooks
    list/create/delete. It records every prediction pushed per task and gives `predictions_model_versions` as Label
    Studio on PostgreSQL does ("a, b"; SQLite gives "a,b"). `outage("503")` answers every call with 503,
    `outage("refuse")` closes the port (connections refused), `outage(None)` restores it. `on_import(project,
    tasks)` runs after a prediction import is stored and before it is answered."""

    def __init__(self, token: str):
        self.token = token
        self.lock = threading.Lock()
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}  # id -> {"id", "project", "data"}
        self.versions: dict[int, list[str]] = defaultdict(list)  # task -> model versions of its predictions
        self.pushed: dict[int, Counter] = defaultdict(Counter)  # task -> model version -> predictions pushed
        self.webhooks: dict[int, dict] = {}
        self.ml_url: str | None = None  # the one ML backend of every project
        self.calls: Counter = Counter()  # "METHOD endpoint" -> count, answered while up
        self.refused_503 = 0
        self.on_import: Callable[[int, list[int]], None] | None = None
        self.mode: str | None = None
        handler = type("Handler", (_StubHandler,), {"stub": self})
        self._handler = handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._serve()

    def _serve(self) -> None:
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="ls-stub", daemon=True).start()

    def add_project(self, pid: int, title: str) -> None:
        self.projects[pid] = {"id": pid, "title": title, "label_config": CONFIG}

    def add_tasks(self, pid: int, ids: list[int], images: list[str], earlier_every: int = 3) -> None:
        """Tasks with images from `images` in turn; every `earlier_every`-th already predicted by an earlier model."""
        with self.lock:
            for n, t in enumerate(ids):
                self.tasks[t] = {"id": t, "project": pid, "data": {"image": images[t % len(images)]}}
                if n % earlier_every == 0:
                    self.versions[t].append(EARLIER_VERSION)

    def outage(self, mode: str | None) -> None:
        if mode == "refuse" and self.mode != "refuse":
            self.server.shutdown()
            self.server.server_close()
        elif mode != "refuse" and self.mode == "refuse":
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)  # the same port again
            self._serve()
        self.mode = mode

    def close(self) -> None:
        if self.mode != "refuse":
            self.server.shutdown()
            self.server.server_close()

    def counts(self, pid: int, version: str) -> dict:
        """Exactly once: per task of `pid`, the predictions of `version` pushed; any other version pushed is wrong."""
        with self.lock:
            ids = [t for t, task in self.tasks.items() if task["project"] == pid]
            per_task = [self.pushed[t][version] for t in ids]
            other = sum(n for t in ids for v, n in self.pushed[t].items() if v != version)
            twice = {t: self._task(self.tasks[t])["predictions_model_versions"] for t in ids if self.pushed[t][version] > 1}
        return {"tasks": len(ids), "predicted": sum(1 for n in per_task if n >= 1),
                "losses": sum(1 for n in per_task if n == 0), "duplicates": sum(n - 1 for n in per_task if n > 1),
                "other_versions_pushed": other, "duplicated_sample": dict(list(twice.items())[:5])}

    def predicted(self, pid: int) -> int:
        with self.lock:
            return sum(1 for t, task in self.tasks.items() if task["project"] == pid and self.pushed[t])

    # -- the API (called by the handler, lock not held) -------------------------------------------------------
    def answer(self, method: str, path: str, query: dict, body) -> tuple[int, object]:
        if m := re.fullmatch(r"/api/projects/(\d+)/", path):
            if method == "GET":
                project = self.projects.get(int(m[1]))
                return (200, project) if project else (404, {"detail": "Not found."})
        elif m := re.fullmatch(r"/api/projects/(\d+)/import/predictions", path):
            if method == "POST":
                return self._import(int(m[1]), body)
        elif path == "/api/tasks/" and method == "GET":
            return self._list(query)
        elif m := re.fullmatch(r"/api/tasks/(\d+)/", path):
            if method == "PATCH":
                with self.lock:
                    task = self.tasks.get(int(m[1]))
                    if task is None:
                        return 404, {"detail": "Not found."}
                    task["data"] = body.get("data", task["data"])
                    return 200, self._task(task)
        elif path == "/api/ml/" and method == "GET":
            pid = int(query.get("project", ["0"])[0])
            return 200, [{"id": pid, "url": self.ml_url, "project": pid, "title": "prelabel", "state": "CO"}]
        elif path == "/api/webhooks/":
            if method == "GET":
                pid = int(query.get("project", ["0"])[0])
                return 200, [h for h in self.webhooks.values() if h["project"] == pid]
            if method == "POST":
                with self.lock:
                    hid = max(self.webhooks, default=0) + 1
                    self.webhooks[hid] = {"id": hid, "project": body["project"], "url": body["url"],
                                          "send_payload": body.get("send_payload", True),
                                          "send_for_all_actions": body.get("send_for_all_actions", True),
                                          "actions": body.get("actions", []), "is_active": body.get("is_active", True),
                                          "headers": {}, "organization": 1}
                    return 201, self.webhooks[hid]
        elif m := re.fullmatch(r"/api/webhooks/(\d+)/", path):
            if method == "GET":
                hook = self.webhooks.get(int(m[1]))
                return (200, hook) if hook else (404, {"detail": "Not found."})
            if method == "DELETE":
                with self.lock:
                    return (204, None) if self.webhooks.pop(int(m[1]), None) else (404, {"detail": "Not found."})
        return 404, {"detail": f"the stand-in has no {method} {path}"}

    def _task(self, task: dict, include: list[str] | None = None) -> dict:
        full = {"id": task["id"], "project": task["project"], "data": task["data"],
                "predictions_model_versions": ", ".join(dict.fromkeys(self.versions[task["id"]])),
                "total_predictions": len(self.versions[task["id"]])}
        return {k: v for k, v in full.items() if k in include} if include else full

    def _list(self, query: dict) -> tuple[int, object]:
        pid = int(query.get("project", ["0"])[0])
        if pid not in self.projects:
            return 404, {"detail": "Not found."}
        ids = None
        if "query" in query:
            filters = json.loads(query["query"][0]).get("filters", {})
            items = filters.get("items", [])
            if any(i.get("filter") != "filter:tasks:id" or i.get("operator") != "equal" for i in items) or (
                    len(items) > 1 and filters.get("conjunction") != "or"):
                return 400, {"detail": f"the stand-in filters only by task id (equal, or): {filters}"}
            ids = {int(i["value"]) for i in items}
        include = query["include"][0].split(",") if "include" in query else None
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        with self.lock:
            tasks = [self._task(t, include) for t in self.tasks.values()
                     if t["project"] == pid and (ids is None or t["id"] in ids)]
        chunk = tasks[(page - 1) * size : page * size]
        if page > 1 and not chunk:
            return 404, {"detail": "Invalid page."}
        return 200, {"tasks": chunk, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}

    def _import(self, pid: int, predictions: list[dict]) -> tuple[int, object]:
        with self.lock:
            for p in predictions:
                task = self.tasks.get(p.get("task"))
                if task is None or task["project"] != pid:
                    return 400, {"detail": f'{p} contains invalid "task" field: task ID {p.get("task")} not found '
                                           f"in project {pid}"}
            for p in predictions:
                self.versions[p["task"]].append(p.get("model_version", "undefined"))
                self.pushed[p["task"]][p.get("model_version", "undefined")] += 1
        if self.on_import is not None:
            self.on_import(pid, [p["task"] for p in predictions])
        return 201, {"created": len(predictions)}


class _StubHandler(BaseHTTPRequestHandler):
    stub: LabelStudioStub

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        stub = self.stub
        if stub.mode == "503":
            with stub.lock:
                stub.refused_503 += 1
            return self._send(503, {"detail": "Service Unavailable"})
        if self.headers.get("Authorization") != f"Token {stub.token}":
            return self._send(401, {"detail": "Invalid token."})
        endpoint = re.sub(r"/\d+/", "/{id}/", split.path)
        with stub.lock:
            stub.calls[f"{method} {endpoint}"] += 1
        status, body = stub.answer(method, split.path, parse_qs(split.query), json.loads(raw) if raw else None)
        self._send(status, body)

    def _send(self, status: int, body) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (a killed server)
            pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's names
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass


# -- the server and its clients --------------------------------------------------------------------------------------


class Server:
    """`prelabel serve` on the tiny models, following, against the stand-in; restarted on the same MODEL_DIR."""

    def __init__(self, models: dict[str, Path], model_dir: Path, stub: LabelStudioStub, logs: Path,
                 env: dict[str, str] | None = None):
        self.models, self.model_dir, self.stub, self.logs, self.env = models, model_dir, stub, logs, env or {}
        self.starts = 0
        self.process: BackendProcess | None = None

    def start(self, http: httpx.Client) -> float:
        """Starts it and waits for /health; returns the seconds that took."""
        began = time.monotonic()
        self.starts += 1
        env = {"HF_HUB_OFFLINE": "1", "MODEL_DIR": str(self.model_dir), "LABEL_STUDIO_URL": self.stub.url,
               "LABEL_STUDIO_API_KEY": TOKEN, "PRELABEL_FOLLOW": "true", "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": ""} | self.env
        args = ["--detector", str(self.models["detector"]), "--segmenter", str(self.models["segmenter"])]
        self.process = BackendProcess(args, env, self.logs / f"server-{self.starts}.log", start_timeout=300)
        self.stub.ml_url = self.process.url
        self.process.wait_ready(http)
        return time.monotonic() - began

    @property
    def url(self) -> str:
        return self.process.url

    def kill(self) -> None:
        """kill -9."""
        self.process.proc.send_signal(signal.SIGKILL)
        self.process.proc.wait(30)
        self.process.log.close()

    def stop(self) -> int:
        """SIGTERM (the follower stops, its webhooks are removed); returns the exit status."""
        self.process.stop()
        return self.process.proc.returncode


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), **{f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 95, 99)},
            "max": round(max(values), 4)}


class Poller:
    """/metrics every `every_s` in a thread: peak backlog and retrying, samples, the server's peak RSS."""

    def __init__(self, server: Server, every_s: float = 0.5):
        self.server, self.every_s = server, every_s
        self.samples: list[dict] = []
        self.peak_backlog = self.peak_retrying = self.peak_rss = 0
        self.unanswered = 0  # polls the server did not answer (a kill, a restart)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._began = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(self.every_s):
                try:
                    follow = http.get(f"{self.server.url}/metrics").json()["follow"]
                    self.peak_rss = max(self.peak_rss, proc_rss(self.server.process.proc.pid)["VmRSS"])
                except (httpx.HTTPError, OSError, KeyError, ValueError):
                    self.unanswered += 1
                    continue
                self.peak_backlog = max(self.peak_backlog, follow["backlog"])
                self.peak_retrying = max(self.peak_retrying, follow["retrying"])
                self.samples.append({"t": round(time.monotonic() - self._began, 2)} | {
                    k: follow[k] for k in ("backlog", "retrying", "done", "rate_per_s", "oldest_waiting_s")})

    def last(self) -> dict:
        return self.samples[-1] if self.samples else {}

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(10)
        return {"peak_backlog": self.peak_backlog, "peak_retrying": self.peak_retrying, "unanswered_polls": self.unanswered,
                "peak_rss_mib": round(self.peak_rss / 2**20, 1), "samples": self.samples[:: max(1, len(self.samples) // 200)]}


def send_events(url: str, pid: int, ids: list[int], stub: LabelStudioStub, clients: int, deadline: float) -> dict:
    """TASKS_CREATED, one task each (as Label Studio sends it: the task object), from `clients` concurrent
    clients, until sent or `deadline` (monotonic); answer latencies and what was not acknowledged with 201."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    new = [0] * clients

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as http:
            for t in ids[k::clients]:
                if time.monotonic() > deadline:
                    failures.append(f"task {t}: not sent before the deadline")
                    continue
                event = {"action": "TASKS_CREATED", "project": {"id": pid, "title": stub.projects[pid]["title"]},
                         "tasks": [stub.tasks[t]]}
                start = time.perf_counter()
                try:
                    response = http.post(f"{url}/webhook", json=event)
                except httpx.HTTPError as exc:
                    failures.append(f"task {t}: {type(exc).__name__}: {exc}")
                    continue
                latencies[k].append(time.perf_counter() - start)
                if response.status_code != 201:
                    failures.append(f"task {t}: {response.status_code} {response.text[:200]}")
                else:
                    new[k] += response.json()["new"]

    began = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    flat = [x for k in latencies for x in k]
    return {"events": len(ids), "clients": clients, "acknowledged_new": sum(new), "not_acknowledged": len(failures),
            "failures_sample": failures[:5], "send_s": round(time.monotonic() - began, 2), "answer_latency_s": percentiles(flat)}


class Clicker:
    """Interactive /predict requests (a smart keypoint on a fresh image, so every click runs SAM's encoder: no
    embedding-cache hits), one after another with `gap_s` between them; each one's latency."""

    def __init__(self, url: str, seed: int, gap_s: float = 0.2):
        self.url, self.seed, self.gap_s = url, seed, gap_s
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def click(self, http: httpx.Client) -> None:
        self.seed += 1
        image, width, height = data_uri(self.seed)
        rng = np.random.default_rng(self.seed)
        region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": width,
                  "original_height": height, "is_positive": True,
                  "value": {"x": float(rng.uniform(20, 80)), "y": float(rng.uniform(20, 80)), "keypointlabels": ["Car"]}}
        body = {"tasks": [{"id": self.seed, "data": {"image": image}}], "label_config": CONFIG,
                "params": {"context": {"result": [region]}}}
        start = time.perf_counter()
        try:
            response = http.post(f"{self.url}/predict", json=body)
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - start
        results = response.json().get("results") if response.status_code == 200 else None
        if not results or "error" in results[0] or not results[0].get("result"):
            self.failures.append(f"{response.status_code} {response.text[:200]}")
            return
        self.latencies.append(seconds)

    def run(self, count: int) -> None:
        with httpx.Client(timeout=60) as http:
            for _ in range(count):
                self.click(http)
                time.sleep(self.gap_s)

    def run_until(self, done: threading.Event, max_count: int) -> None:
        with httpx.Client(timeout=60) as http:
            for _ in range(max_count):
                if done.is_set():
                    return
                self.click(http)
                done.wait(self.gap_s)


def wait_drained(stub: LabelStudioStub, pid: int, url: str, timeout_s: float) -> float | None:
    """Until every task of `pid` has a prediction and the server's backlog is empty; seconds waited, or None."""
    began = time.monotonic()
    n = sum(1 for t in stub.tasks.values() if t["project"] == pid)
    with httpx.Client(timeout=5) as http:
        while time.monotonic() - began < timeout_s:
            if stub.predicted(pid) >= n:
                try:
                    if http.get(f"{url}/metrics").json()["follow"]["backlog"] == 0:
                        return time.monotonic() - began
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
    return None


# -- the scenarios ---------------------------------------------------------------------------------------------------


def burst(server: Server, stub: LabelStudioStub, pid: int, ids: list[int], version: str, args) -> dict:
    """(a) + (b): the events from `args.clients` clients while a clicker clicks, until the backlog is drained."""
    poller, drained = Poller(server), threading.Event()
    clicker = Clicker(server.url, seed=2_000_000, gap_s=0.2)
    clicking = threading.Thread(target=clicker.run_until, args=(drained, 20_000), name="clicker", daemon=True)
    began = time.monotonic()
    clicking.start()
    sent = send_events(server.url, pid, ids, stub, args.clients, began + args.timeout_s / 2)
    clicks_while_sending = len(clicker.latencies)
    drain_s = wait_drained(stub, pid, server.url, args.timeout_s)
    drained.set()
    clicking.join(60)
    total_s = time.monotonic() - began
    console.log(f"burst: {len(ids)} events sent in {sent['send_s']} s, drained after {total_s:.1f} s")
    return {"sent": sent, "drained": drain_s is not None, "drain_s": round(total_s, 2),
            "tasks_per_s": round(len(ids) / total_s, 2), "exactly_once": stub.counts(pid, version),
            "clicks": clicker.latencies, "clicks_while_sending": clicks_while_sending,
            "click_failures": clicker.failures[:5], "click_failed": len(clicker.failures), "metrics": poller.stop()}


def outage(server: Server, stub: LabelStudioStub, pid: int, ids: list[int], version: str, args) -> dict:
    """(d): half the events, then Label Studio unreachable for `args.outage_s` (503s, then refused connections)
    while the other half arrives, then reachable again."""
    poller = Poller(server)
    began = time.monotonic()
    first = send_events(server.url, pid, ids[: len(ids) // 2], stub, args.clients, began + args.timeout_s / 4)
    while stub.predicted(pid) < len(ids) // 8 and time.monotonic() - began < args.timeout_s / 4:
        time.sleep(0.05)
    before = stub.predicted(pid)
    with ThreadPoolExecutor(1) as pool:
        stub.outage("503")
        down = time.monotonic()
        second = pool.submit(send_events, server.url, pid, ids[len(ids) // 2 :], stub, args.clients, down + args.timeout_s / 4)
        time.sleep(args.outage_s / 2)
        stub.outage("refuse")
        time.sleep(args.outage_s / 2)
        stub.outage(None)
        up = time.monotonic()
        second = second.result()
    during = stub.predicted(pid) - before
    retrying_at_end = poller.last().get("retrying", 0)
    drain_s = wait_drained(stub, pid, server.url, args.timeout_s)
    console.log(f"outage: {up - down:.1f} s down, {poller.peak_retrying} tasks waiting for a retry at the peak, "
                f"drained {drain_s and round(drain_s, 1)} s after")
    return {"sent_before": first, "sent_during": second, "outage_s": round(up - down, 2),
            "predicted_before_outage": before, "predicted_during_outage": during, "answered_503": stub.refused_503,
            "retrying_when_back": retrying_at_end, "drained": drain_s is not None,
            "recovery_s": drain_s and round(drain_s, 2), "exactly_once": stub.counts(pid, version), "metrics": poller.stop()}


def kill_restart(server: Server, stub: LabelStudioStub, http: httpx.Client, pid: int, ids: list[int], version: str,
                 args) -> dict:
    """(c): the events, then kill -9 once a third is predicted, inside an import of predictions (stored by Label
    Studio, not yet marked done by the server), then a restart on the same MODEL_DIR, until drained."""
    poller, killed = Poller(server), threading.Event()
    sent = send_events(server.url, pid, ids, stub, args.clients, time.monotonic() + args.timeout_s / 4)

    def kill_once(project: int, _tasks: list[int]) -> None:
        if project == pid and not killed.is_set() and stub.predicted(pid) >= len(ids) // 3:
            killed.set()
            server.kill()

    stub.on_import = kill_once
    began = time.monotonic()
    if not killed.wait(args.timeout_s / 2):
        raise RuntimeError(f"the backlog of project {pid} did not reach a third in {args.timeout_s / 2:.0f} s")
    stub.on_import = None
    at_kill = stub.predicted(pid)
    restart_s = server.start(http)
    drain_s = wait_drained(stub, pid, server.url, args.timeout_s)
    console.log(f"kill -9 at {at_kill} of {len(ids)} predicted; restarted in {restart_s:.1f} s; drained "
                f"{drain_s and round(drain_s, 1)} s later")
    return {"sent": sent, "predicted_at_kill": at_kill, "killed_after_s": round(time.monotonic() - began, 2),
            "restart_s": round(restart_s, 2), "drained": drain_s is not None, "drain_after_restart_s": drain_s and round(drain_s, 2),
            "exactly_once": stub.counts(pid, version), "metrics": poller.stop()}


# -- the run ---------------------------------------------------------------------------------------------------------


def write_models(out: Path) -> dict[str, Path]:
    """The tiny detector and segmenter, written by a child process (torch stays out of this one)."""
    code = ("import sys, json; from ml_backend.models.tiny import write_tiny_models; "
            "print(json.dumps({k: str(v) for k, v in write_tiny_models(sys.argv[1]).items()}))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    return {k: Path(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def server_timings(http: httpx.Client, url: str) -> dict:
    """Where a click's time goes, from the server's /metrics (all requests since its start): its wait for the
    model thread (a batch piece running) and its model call."""
    metrics = http.get(f"{url}/metrics").json()
    names = ("queue_wait_interactive", "inference_interactive", "queue_wait_batch", "inference_batch")
    return {k: v for k, v in metrics["timings_s"].items() if k in names} | {
        "predict_route": metrics["latency_s"].get("/predict"), "batch_size": metrics.get("batch_size")}


def check(value, ok: bool, target: str, judged_in_smoke: bool = True) -> dict:
    return {"value": value, "target": target, "pass": bool(ok), "judged_in_smoke": judged_in_smoke}


def checks(result: dict) -> dict:
    b, o, k, i = result["burst"], result["outage"], result["kill"], result["interactive"]
    out = {}
    for name, part in (("burst", b), ("outage", o), ("kill", k)):
        e = part["exactly_once"]
        out[f"{name}_losses"] = check(e["losses"], e["losses"] == 0 and part["drained"], "== 0 (and drained in time)")
        out[f"{name}_duplicates"] = check(e["duplicates"] + e["other_versions_pushed"],
                                          e["duplicates"] == 0 and e["other_versions_pushed"] == 0, "== 0")
    not_acked = (b["sent"]["not_acknowledged"] + o["sent_before"]["not_acknowledged"]
                 + o["sent_during"]["not_acknowledged"] + k["sent"]["not_acknowledged"])
    out["events_not_acknowledged"] = check(not_acked, not_acked == 0, "== 0")
    out["outage_retried"] = check(o["metrics"]["peak_retrying"], o["metrics"]["peak_retrying"] > 0,
                                  "> 0 (retries seen in /metrics)")
    failed = i["idle_failed"] + b["click_failed"]
    out["clicks_failed"] = check(failed, failed == 0, "== 0")
    w = result["webhooks"]
    out["webhook_added_and_removed"] = check({k: w[k] for k in ("added_on_setup", "left_after_shutdown")},
                                             w["added_on_setup"] and w["left_after_shutdown"] == 0,
                                             "added on /setup, removed on shutdown")
    ratio = i["p95_ratio"]
    out["interactive_p95_ratio"] = check(ratio, ratio is not None and ratio <= TARGET_INTERACTIVE_RATIO,
                                         f"<= {TARGET_INTERACTIVE_RATIO}", judged_in_smoke=False)
    return out


def report(result: dict) -> None:
    b, o, k, i = result["burst"], result["outage"], result["kill"], result["interactive"]
    table = Table(title=f"Following under load and faults ({result['machine']['cpus']} CPUs, tiny models)")
    for column in ("measure", "value"):
        table.add_column(column)
    sent = b["sent"]
    table.add_row("(a) burst", f"{sent['events']} events from {sent['clients']} clients in {sent['send_s']} s; drained "
                  f"in {b['drain_s']} s ({b['tasks_per_s']} tasks/s); peak backlog {b['metrics']['peak_backlog']}")
    lat = sent["answer_latency_s"]
    table.add_row("(a) webhook answer", f"p50 {lat.get('p50')} s, p95 {lat.get('p95')} s, max {lat.get('max')} s")
    table.add_row("(b) click p95", f"idle {i['idle'].get('p95')} s ({i['idle']['n']}), during the burst "
                  f"{i['burst'].get('p95')} s ({i['burst']['n']}): ratio {i['p95_ratio']}")
    table.add_row("(c) kill -9", f"at {k['predicted_at_kill']} of {k['sent']['events']} predicted; restart "
                  f"{k['restart_s']} s; drained {k['drain_after_restart_s']} s after")
    table.add_row("(d) outage", f"{o['outage_s']} s down ({o['answered_503']} answered 503, then refused); peak "
                  f"retrying {o['metrics']['peak_retrying']}; drained {o['recovery_s']} s after")
    console.print(table)
    verdicts = Table(title="Checks")
    for column in ("check", "value", "target", "result"):
        verdicts.add_column(column)
    for name, c in result["checks"].items():
        judged = c["judged_in_smoke"] or not result["smoke"]
        verdict = ("[green]pass[/]" if c["pass"] else "[red]FAIL[/]") if judged else "not judged (smoke)"
        verdicts.add_row(name, json.dumps(c["value"]), c["target"], verdict)
    console.print(verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.follow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, help="TASKS_CREATED events of the burst, one task each (10000; smoke 300)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients sending them")
    parser.add_argument("--fault-tasks", type=int, help="tasks of the kill -9 and of the outage backlog (2000; smoke 150)")
    parser.add_argument("--outage-s", type=float, help="seconds Label Studio is unreachable (10; smoke 5)")
    parser.add_argument("--idle-clicks", type=int, help="clicks measured idle (40; smoke 8)")
    parser.add_argument("--timeout-s", type=float, help="bound on each wait for a backlog to drain (1800; smoke 300)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the server (repeatable), e.g. PRELABEL_BATCH_SIZE=1 or PRELABEL_FOLLOW_RATE=20")
    parser.add_argument("--out", type=Path, help="default: results/follow.json (results/smoke/follow.json with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    for name, full, smoke in (("events", 10_000, 300), ("fault_tasks", 2_000, 150), ("outage_s", 10.0, 5.0),
                              ("idle_clicks", 40, 8), ("timeout_s", 1800.0, 300.0)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    out = args.out or result_path("follow.json", args.smoke)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="prelabel-follow-"))
    console.log(f"work directory {work}")
    models = write_models(work / "models")
    stub = LabelStudioStub(TOKEN)
    images = [data_uri(i)[0] for i in range(64)]
    burst_pid, outage_pid, kill_pid = 1, 2, 3
    n, m = args.events, args.fault_tasks
    ids = {burst_pid: list(range(1, n + 1)), outage_pid: list(range(n + 1, n + m + 1)),
           kill_pid: list(range(n + m + 1, n + 2 * m + 1))}
    for pid, title in ((burst_pid, "burst"), (outage_pid, "outage"), (kill_pid, "kill -9")):
        stub.add_project(pid, title)
        stub.add_tasks(pid, ids[pid], images)
    server_env = dict(e.split("=", 1) for e in args.server_env)
    server = Server(models, work / "model-dir", stub, work, server_env)
    result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "smoke": args.smoke, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                               "platform": platform.platform(), "load_average_start": os.getloadavg()},
              "setup": {k: v for k, v in vars(args).items() if k != "out"} | {"images": len(images)}}
    try:
        with httpx.Client(timeout=60) as http:
            result["server_start_s"] = round(server.start(http), 2)
            setup = http.post(f"{server.url}/setup", json={"project": f"{burst_pid}.1700000000", "schema": CONFIG,
                                                          "hostname": stub.url, "access_token": TOKEN})
            setup.raise_for_status()
            version = setup.json()["model_version"]
            deadline = time.monotonic() + 30
            while not stub.webhooks and time.monotonic() < deadline:
                time.sleep(0.1)
            added = [dict(h) for h in stub.webhooks.values()]
            idle = Clicker(server.url, seed=1_000_000, gap_s=0.2)
            idle.run(args.idle_clicks)
            timings = {"after_idle": server_timings(http, server.url)}
            console.log(f"idle clicks: p95 {percentiles(idle.latencies).get('p95')} s")
            result["burst"] = burst(server, stub, burst_pid, ids[burst_pid], version, args)
            timings["after_burst"] = server_timings(http, server.url)
            result["server_timings_s"] = timings
            result["outage"] = outage(server, stub, outage_pid, ids[outage_pid], version, args)
            graceful = server.stop()
            left = len(stub.webhooks)
            result["webhooks"] = {"added_on_setup": bool(added) and added[0]["actions"] == ["TASKS_CREATED"],
                                  "added": added, "left_after_shutdown": left, "graceful_exit_status": graceful}
            server.start(http)  # the same MODEL_DIR
            result["kill"] = kill_restart(server, stub, http, kill_pid, ids[kill_pid], version, args)
    finally:
        if server.process is not None and server.process.proc.poll() is None:
            server.stop()
        stub.close()
    burst_clicks = result["burst"].pop("clicks")
    idle_p95, burst_p95 = percentiles(idle.latencies).get("p95"), percentiles(burst_clicks).get("p95")
    result["interactive"] = {"idle": percentiles(idle.latencies), "burst": percentiles(burst_clicks),
                             "p95_ratio": round(burst_p95 / idle_p95, 3) if idle_p95 and burst_p95 else None,
                             "clicks_while_sending": result["burst"].pop("clicks_while_sending"),
                             "idle_failed": len(idle.failures), "failures_sample": idle.failures[:5] + result["burst"]["click_failures"]}
    result["model_version"] = version
    result["label_studio_calls"] = dict(stub.calls)
    result["exactly_once_all"] = {pid: stub.counts(pid, version) for pid in ids}
    result["checks"] = checks(result)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["total_s"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    report(result)
    console.print(f"wrote {out}; server logs in {work}")
    correct = all(c["pass"] for c in result["checks"].values() if c["judged_in_smoke"])
    return 1 if not correct else exit_status(all(c["pass"] for c in result["checks"].values()), args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
