"""`prelabel cvat follow`: new CVAT tasks pre-annotated without anyone asking, once each.

Tasks reach a durable queue (SQLite under MODEL_DIR/follow/, one file per CVAT server) from two sides: polling
(cvat-sdk lists the tasks of a project, or all the user sees, every `poll` seconds) and, with `--listen`, CVAT
webhooks (`create:task`, and `completed:request[create:task]` once the task's data is in), their `X-Signature-256`
checked against the webhook secret. A webhook is answered 200 only once its task is in the queue; a bad signature
gets 403, so nothing acknowledged is lost. The worker takes queued tasks in order: a task whose data is not uploaded
yet stays queued; one that already has annotations is skipped (unless `force`); image tasks go through cvat-sdk's
auto-annotation driver with `PrelabelDetectionFunction`, video tasks become tracks (`tracks.track_task`). Each ends
done, skipped or failed (with why), and is never taken again; failed ones are retried when the command restarts.
CVAT unreachable (or answering 5xx): the worker waits, doubling the wait up to `max_backoff`, and resumes; the
tasks stay queued. A crash between the upload and the record leaves the task queued: it then has annotations, so
the restart skips it rather than annotating it twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import Request  # the webhook route's annotation: resolved from the module's names

from ..errors import ConfigError, PrelabelError
from .tracks import CvatError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature-256"
MAX_BACKOFF = 300.0


# -- the queue -----------------------------------------------------------------------------------------------------
def queue_path(model_dir: Path, url: str) -> Path:
    """MODEL_DIR/follow/cvat-<host>-<port>.sqlite: task ids are per server."""
    return Path(model_dir) / "follow" / f"cvat-{re.sub(r'[^A-Za-z0-9.]+', '-', url.split('://')[-1]).strip('-')}.sqlite"


class TaskQueue:
    """CVAT task ids and what became of them (queued, done, skipped, failed), in SQLite: every change is committed
    before it is acknowledged. Safe to share between the webhook server's threads and the worker."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, state TEXT NOT NULL, "
                        "source TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', queued REAL NOT NULL, updated REAL)")

    def add(self, task_id: int, source: str) -> bool:
        """Queue a task not seen before; False if it is known (queued or finished)."""
        with self.lock:
            cursor = self.db.execute("INSERT OR IGNORE INTO tasks (id, state, source, queued) VALUES (?, 'queued', ?, ?)",
                                     (int(task_id), source, time.time()))
            return cursor.rowcount == 1

    def known(self) -> set[int]:
        with self.lock:
            return {row[0] for row in self.db.execute("SELECT id FROM tasks")}

    def queued(self) -> list[int]:
        with self.lock:
            return [row[0] for row in self.db.execute("SELECT id FROM tasks WHERE state = 'queued' ORDER BY queued, id")]

    def finish(self, task_id: int, state: str, note: str = "") -> None:
        with self.lock:
            self.db.execute("UPDATE tasks SET state = ?, note = ?, updated = ? WHERE id = ?",
                            (state, note, time.time(), task_id))

    def retry_failed(self) -> int:
        with self.lock:
            return self.db.execute("UPDATE tasks SET state = 'queued' WHERE state = 'failed'").rowcount

    def states(self) -> dict[int, tuple[str, str]]:
        with self.lock:
            return {row[0]: (row[1], row[2]) for row in self.db.execute("SELECT id, state, note FROM tasks")}

    def stats(self, window_s: float = 60.0) -> dict:
        """What /metrics shows: the backlog, the age of the oldest queued task, tasks finished per second over
        the last `window_s`, and the counts by outcome."""
        now = time.time()
        with self.lock:
            counts = dict(self.db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
            oldest = self.db.execute("SELECT MIN(queued) FROM tasks WHERE state = 'queued'").fetchone()[0]
            recent = self.db.execute("SELECT COUNT(*) FROM tasks WHERE state != 'queued' AND updated >= ?",
                                     (now - window_s,)).fetchone()[0]
        return {"backlog": counts.get("queued", 0), "oldest_waiting_s": round(now - oldest, 1) if oldest else 0.0,
                "rate_per_s": round(recent / window_s, 3)} | {k: counts.get(k, 0) for k in ("done", "skipped", "failed")}

    def close(self) -> None:
        self.db.close()


# -- webhooks ------------------------------------------------------------------------------------------------------
def signature(body: bytes, secret: str) -> str:
    """What CVAT sends in X-Signature-256: "sha256=" and the HMAC-SHA256 of the body under the webhook secret."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signed(body: bytes, header: str | None, secret: str) -> bool:
    return header is not None and hmac.compare_digest(signature(body, secret), header)


def cvat_webhook(payload: dict, project: int | None = None) -> int | None:
    """The task id a CVAT webhook payload announces: `create:task` (the task, maybe before its data is uploaded)
    or `completed:request[create:task]` (its data is in) that finished; None for other events (ping, updates),
    and for tasks outside `project`."""
    if not isinstance(payload, dict):
        raise ConfigError("a CVAT webhook payload is a JSON object")
    event = payload.get("event")
    if event == "create:task":
        task = payload.get("task") or {}
        task_id, project_id = task.get("id"), task.get("project_id")
    elif event == "completed:request[create:task]":
        request = payload.get("request") or {}
        operation = request.get("operation") or {}
        if request.get("status") != "finished":
            return None
        task_id, project_id = operation.get("task_id"), operation.get("project_id")
    else:
        return None
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise ConfigError(f"CVAT webhook {event!r} names no task id (task.id: {task_id!r})")
    if project is not None and project_id != project:
        return None
    return task_id


def webhook_app(queue: TaskQueue, secret: str | None, project: int | None = None,
                wake: threading.Event | None = None, status: Callable[[], dict] | None = None):
    """POST /webhook: CVAT's task-creation webhooks into `queue` (200 once queued, 403 on a bad signature, 400 on
    a payload that is not one); GET /health; GET /metrics: the queue's `stats()` and `status()`'s."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="prelabel cvat follow", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return {"follow": queue.stats() | (status() if status is not None else {})}

    @app.post("/webhook")
    async def webhook(request: Request):
        body = await request.body()
        if secret and not signed(body, request.headers.get(SIGNATURE_HEADER), secret):
            return JSONResponse({"detail": f"{SIGNATURE_HEADER} does not match the webhook secret"}, 403)
        try:
            task_id = cvat_webhook(json.loads(body or b"null"), project)
        except (ValueError, ConfigError) as exc:
            return JSONResponse({"detail": f"not a CVAT webhook payload: {exc}"}, 400)
        if task_id is not None:
            queue.add(task_id, "webhook")
            if wake is not None:
                wake.set()
        return {"queued": task_id}

    return app


# -- the worker ----------------------------------------------------------------------------------------------------
def unreachable(exc: BaseException) -> bool:
    """CVAT down, restarting or overloaded (retried later), as opposed to a task it refuses."""
    import urllib3
    from cvat_sdk.api_client.exceptions import ApiException

    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, ApiException) and (not exc.status or exc.status >= 500 or exc.status in (408, 429))


@dataclass
class CvatAnnotator:
    """Pre-annotates one CVAT task: images with `PrelabelDetectionFunction` through cvat-sdk's driver, videos as
    tracks. Models load on the first task."""

    prompts: str | None = None
    detector: str | None = None
    tracker: str | None = None
    device: str | None = None
    shape: str = "rectangle"
    allow_unmatched_labels: bool = False
    warn: Callable[[str], None] = log.warning
    function: object = field(default=None, repr=False)
    video_engine: object = field(default=None, repr=False)

    def images(self, client, task_id: int) -> str:
        import cvat_sdk.auto_annotation as cvataa

        from .auto_annotation import PrelabelDetectionFunction

        if self.function is None:
            self.function = PrelabelDetectionFunction(self.prompts, self.shape, self.detector, device=self.device)
        cvataa.annotate_task(client, task_id, self.function, allow_unmatched_labels=self.allow_unmatched_labels)
        return "images pre-annotated"

    def video(self, client, task_id: int) -> str:
        from ..engine import Engine
        from ..settings import Settings
        from .tracks import open_task, track_task

        if self.video_engine is None:
            given = dict(prompts=self.prompts, detector=self.detector, device=self.device, tracker=self.tracker)
            settings = Settings(**{k: v for k, v in given.items() if v is not None} | {"segmenter": ""})
            detector = getattr(getattr(self.function, "engine", None), "detector", None)
            self.video_engine = (Engine(detector, None, self.function.engine.prompts, settings) if detector is not None
                                 else Engine.from_settings(settings))
        engine = self.video_engine
        names = list(engine.prompts.ontology().names)
        opened = open_task(client, task_id, names, self.allow_unmatched_labels, self.warn)
        return "; ".join(track_task(opened, engine, engine.settings.keyframe_tolerance).lines())

    def __call__(self, client, task) -> str:
        if task.data_original_chunk_type == "video":
            return self.video(client, task.id)
        return self.images(client, task.id)


def has_annotations(client, task_id: int) -> bool:
    _, response = client.api_client.tasks_api.retrieve_annotations(task_id, _parse_response=False)
    stored = json.loads(response.data)
    return any(stored.get(kind) for kind in ("shapes", "tracks", "tags"))


def connector(url: str, token: str | None, user: str | None, password: str | None,
              cache_dir: Path) -> Callable[[], object]:
    """`connect()` for a `Follower`: a logged-in cvat-sdk client whose downloads (task chunks) are cached in
    `cache_dir`."""
    from .tracks import connect

    if not token and not (user and password):
        connect(url, token, user, password)  # the error naming the flags, before anything runs

    def make():
        client = connect(url, token, user, password)
        client.config.cache_dir = cache_dir
        return client

    return make


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Follower:
    """Polls CVAT for tasks (of `project`, or all the user sees) into `queue` and pre-annotates each queued task
    once with `annotate(client, task) -> note`. `connect()` makes a logged-in cvat-sdk client."""

    connect: Callable[[], object]
    queue: TaskQueue
    annotate: Callable[[object, object], str]
    project: int | None = None
    force: bool = False
    poll: float = 10.0
    max_backoff: float = MAX_BACKOFF
    discover: bool = True  # poll the task list (False: webhooks only)
    wake: threading.Event = field(default_factory=threading.Event)
    report: Callable[[int, str, str], None] = lambda task_id, state, note: None
    client: object = None
    outages: int = 0  # times CVAT could not be reached

    def scan(self) -> int:
        """Queue the tasks CVAT lists that are not known yet; returns how many."""
        filters = {"project_id": self.project} if self.project is not None else {}
        known = self.queue.known()
        listed = sorted(t["id"] for t in json.loads(self.client.tasks.list(return_json=True, **filters)))
        return sum(self.queue.add(task_id, "poll") for task_id in listed if task_id not in known)

    def work(self, task_id: int, stop: threading.Event) -> None:
        from cvat_sdk.api_client.exceptions import ApiException

        try:
            task = self.client.tasks.retrieve(task_id)
            if self.project is not None and task.project_id != self.project:
                return self.finish(task_id, "skipped", f"in project {task.project_id}, not {self.project}")
            if not task.size:
                return  # created, its data not uploaded yet: stays queued
            if not self.force and has_annotations(self.client, task_id):
                return self.finish(task_id, "skipped", "already has annotations (--force pre-annotates it anyway)")
            note = self.annotate(self.client, task)
        except Exception as exc:
            if unreachable(exc):
                raise
            if isinstance(exc, ApiException) and exc.status == 404:
                return self.finish(task_id, "skipped", "deleted, or this user cannot see it")
            from .tracks import refusal

            why = refusal(exc.status, exc.body, "CVAT", task_id) if isinstance(exc, ApiException) else str(exc)
            if not isinstance(exc, (PrelabelError, ApiException)):
                log.debug("task %s failed", task_id, exc_info=True)
                why = f"{type(exc).__name__}: {why}"
            return self.finish(task_id, "failed", why)
        self.finish(task_id, "done", note)

    def finish(self, task_id: int, state: str, note: str) -> None:
        self.queue.finish(task_id, state, note)
        self.report(task_id, state, note)

    def step(self, stop: threading.Event) -> None:
        """One round: connect if needed, list new tasks, work through the queue."""
        if self.client is None:
            self.client = self.connect()
        if self.discover:
            self.scan()
        for task_id in self.queue.queued():
            if stop.is_set():
                return
            self.work(task_id, stop)

    def run(self, stop: threading.Event) -> None:
        """Rounds every `poll` seconds (at once when a webhook queued a task) until `stop`; CVAT unreachable: the
        wait doubles up to `max_backoff`, the queue kept."""
        wait = self.poll
        while not stop.is_set():
            self.wake.clear()
            try:
                self.step(stop)
                wait = self.poll
            except Exception as exc:
                if not unreachable(exc) and not (isinstance(exc, CvatError) and "cannot reach" in str(exc)):
                    raise
                self.outages += 1
                wait = min(wait * 2, self.max_backoff) if self.outages > 1 else self.poll
                log.warning("CVAT cannot be reached (%s: %s): retrying in %.1f s; %d tasks stay queued",
                            type(exc).__name__, str(exc)[:200], wait, len(self.queue.queued()))
                self.client = None
            waited = time.monotonic()
            while not stop.is_set() and not self.wake.is_set() and time.monotonic() - waited < wait:
                stop.wait(min(0.05, wait))


def follow_cvat(follower: Follower, stop: threading.Event, listen: int | None = None, host: str = "127.0.0.1",
                secret: str | None = None, started: Callable[[str], None] | None = None) -> None:
    """Run `follower` until `stop`; with `listen`, CVAT webhooks are taken on http://host:listen/webhook
    meanwhile (a secret is required off loopback)."""
    server = thread = None
    if listen is not None:
        import uvicorn

        if not secret and not is_loopback(host):
            raise ConfigError(f"--host {host} takes webhooks from the network: set the webhook's secret with "
                              f"--secret (CVAT_WEBHOOK_SECRET), as in CVAT's webhook form")
        app = webhook_app(follower.queue, secret, follower.project, follower.wake,
                          lambda: {"cvat_outages": follower.outages, "polling": follower.discover})
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=listen, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True, name="cvat-webhooks")
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"could not listen for webhooks on {host}:{listen} (port in use?)")
            time.sleep(0.02)
        if started is not None:
            started(f"http://{host}:{listen}/webhook")
    try:
        follower.run(stop)
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(10)
