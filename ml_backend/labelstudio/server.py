"""FastAPI app speaking Label Studio's ML-backend protocol (Label Studio 1.23).

Under load: image fetching runs in a thread pool; the models run in an `InferenceWorker`: interactive calls on
their own thread, at once, beside batch work on another, which merges concurrent batch requests into model batches
and pauses at its next step while a click is in flight. Each lane admits at most PRELABEL_QUEUE_SIZE requests at
once; more get 503 with Retry-After. Request bodies are capped by PRELABEL_MAX_REQUEST_BYTES."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import sys
import threading
import time
from collections import deque
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..errors import (
    ConfigError,
    OverloadedError,
    PrelabelError,
    RequestError,
    RequestTooLargeError,
    describe_validation,
)
from ..engine import Engine
from ..follow import WorkQueue
from ..jobs import DistillJob
from ..metrics import Metrics, prometheus
from ..models.base import ModelLock
from ..priority import add_checkpoints, lower_this_thread, torch_modules
from .backend import (
    LabelStudioBackend,
    LoadedTasks,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    WebhookRequest,
    is_interactive,
    project_id,
)
from .images import LabelStudioImageSource
from .follow import ProjectFollower
from .store import EventStore

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
DISTILL_COMMAND = [sys.executable, "-m", "ml_backend.cli", "distill"]  # what START_TRAINING runs (`prelabel distill`)


def error_body(kind: str, message: str) -> dict:
    return {"error": {"kind": kind, "message": message}}


def _authorized(header: str | None, user: str, password: str) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        given_user, _, given_pass = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    ok_user = secrets.compare_digest(given_user.encode(), user.encode())
    ok_pass = secrets.compare_digest(given_pass.encode(), password.encode())
    return ok_user and ok_pass


# -- the inference worker ---------------------------------------------------------------------------------------
class _Waiter:
    """An asyncio future completed from the worker thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future = self.loop.create_future()
        self.queued = time.perf_counter()

    def _set(self, value: Any, error: BaseException | None) -> None:
        if self.future.done():  # the request went away
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)

    def done(self, value: Any = None, error: BaseException | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._set, value, error)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class _ThreadWaiter:
    """The same, for a caller on another thread (the follower): `wait()` blocks until done."""

    def __init__(self) -> None:
        self.queued = time.perf_counter()
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self._event.is_set():
            self._value, self._error = value, error
            self._event.set()

    def wait(self) -> Any:
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class _BatchJob:
    """One /predict request's tasks, answered when all its pieces are done."""

    waiter: _Waiter
    key: tuple
    args: tuple  # (config, ontology, version)
    entries: list
    pieces: int = 0
    max_images: int | None = None  # per model batch, where it is smaller than the worker's


@dataclass
class _Piece:
    job: _BatchJob
    start: int  # index of its first task in the job
    batch: LoadedTasks
    n_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_images = len(self.batch.images)


def _split(batch: LoadedTasks, max_images: int) -> list[tuple[int, LoadedTasks]]:
    """Consecutive runs of tasks with at most `max_images` images each (a task's images stay together)."""
    by_task: dict[int, list] = {}
    for item in batch.images:
        by_task.setdefault(item[0], []).append(item)
    out, start, count = [], 0, 0
    for i in range(len(batch.tasks) + 1):
        n = len(by_task.get(i, ()))
        if i == len(batch.tasks) or (count and count + n > max_images):
            if i > start:
                images = [(j - start, k, img) for j in range(start, i) for _, k, img in by_task.get(j, ())]
                out.append((start, LoadedTasks(batch.tasks[start:i], batch.entries[start:i], images)))
            start, count = i, 0
        count += n
    return out or [(0, batch)]


def _merge(pieces: list[_Piece]) -> LoadedTasks:
    tasks, entries, images = [], [], []
    for piece in pieces:
        offset = len(tasks)
        tasks += piece.batch.tasks
        entries += piece.batch.entries
        images += [(i + offset, k, img) for i, k, img in piece.batch.images]
    return LoadedTasks(tasks, entries, images)


class InferenceWorker:
    """The models (one instance per device) run on two threads. Interactive calls have their own thread and start
    at once, beside whatever batch work is running; the batch thread yields to them at its next step (before each
    layer of a forward pass, each model batch, each image's masks, between images and video frames): it waits
    while a click runs or waits (for at most a second at a time, then runs a tenth: clicks from many people at
    once slow batch work, never stop it), unless the click waits for a model lock, which the paused pass may hold.
    It also runs at a lower OS priority (PRELABEL_BACKGROUND_NICE). Each model guards its own forward pass
    (`ModelLock`), so the threads share the weights. Batch requests are cut into pieces of at most `max_images` images, and
    pieces of concurrent requests with the same label config are merged into one model batch after waiting up to
    `wait_s` for company."""

    def __init__(self, backend: LabelStudioBackend, metrics: Metrics, max_images: int, wait_s: float, nice: int = 0,
                 models: list | None = None, max_pause_s: float = 1.0, min_run_s: float = 0.1):
        """`models`: the torch modules whose forward passes pause between layers while a click runs; batch work
        pauses for at most `max_pause_s` at a time, then runs at least `min_run_s` (see `_between`)."""
        self.backend, self.metrics = backend, metrics
        self.max_pause_s, self.min_run_s = max_pause_s, min_run_s
        self._run_until = 0.0  # (batch thread) runs without pausing until then
        self.max_images, self.wait_s, self.nice = max_images, wait_s, nice  # nice: the batch thread's, lowered
        self._cond = threading.Condition()  # one condition, two threads with different predicates: notify_all
        self._calls: deque[tuple[_Waiter, Callable[[], Any]]] = deque()
        self._clicking = 0  # interactive calls running now
        self._yielding = False  # the batch thread waits for them
        self._pieces: deque[_Piece] = deque()
        self._jobs: deque[tuple[_Waiter, Callable[[Callable[[], None]], Any]]] = deque()  # videos: batch lane
        self._closed = False
        self._batch_ident: int | None = None
        self._hooks = add_checkpoints(models or [], self._between)
        self._threads = [threading.Thread(target=self._run_interactive, name="inference-interactive", daemon=True),
                         threading.Thread(target=self._run, name="inference-batch", daemon=True)]
        for thread in self._threads:
            thread.start()

    def depth(self) -> dict[str, int]:
        with self._cond:
            return {"interactive": len(self._calls), "interactive_running": self._clicking,
                    "batch_pieces": len(self._pieces), "batch_jobs": len(self._jobs),
                    "batch_yielding": int(self._yielding and bool(self._calls or self._clicking))}

    @contextmanager
    def clicking(self) -> Iterator[None]:
        """Around a whole interactive request (its image fetch and answer too): batch work yields meanwhile."""
        with self._cond:
            self._clicking += 1
        try:
            yield
        finally:
            with self._cond:
                self._clicking -= 1
                self._cond.notify_all()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the interactive thread, beside batch work (which yields to it at its next step)."""
        waiter = _Waiter()
        with self._cond:
            self._calls.append((waiter, fn))
            self._cond.notify_all()
        return await waiter.future

    async def run_batch(self, fn: Callable[[Callable[[], None]], Any]) -> Any:
        """Runs `fn(between)` on the batch thread (a video: minutes of work); `fn` calls `between()` often (each
        frame), which waits while interactive calls run, so clicks stay fast."""
        waiter = _Waiter()
        with self._cond:
            self._jobs.append((waiter, fn))
            self._cond.notify_all()
        return await waiter.future

    def run_batch_blocking(self, fn: Callable[[Callable[[], None]], Any]) -> Any:
        """`run_batch` from another thread (the follower)."""
        waiter = _ThreadWaiter()
        with self._cond:
            self._jobs.append((waiter, fn))
            self._cond.notify_all()
        return waiter.wait()

    def _between(self) -> None:
        """(Batch thread; also before each layer of the models' forward passes.) Yields to interactive calls:
        returns when none runs or waits, when one is blocked on a model's lock (which this thread may hold), or
        after `max_pause_s`: then batch work runs for `min_run_s` before it pauses again, so that a stream of
        clicks from many people slows it down but never stops it."""
        if threading.get_ident() != self._batch_ident or not (self._calls or self._clicking):
            return
        now = time.monotonic()
        if now < self._run_until:
            return
        deadline = now + self.max_pause_s
        with self._cond:
            self._yielding = True
            while (self._calls or self._clicking) and not self._closed and not ModelLock.blocked():
                if time.monotonic() >= deadline:
                    self._run_until = time.monotonic() + self.min_run_s
                    break
                self._cond.wait(0.002)  # (a lock's waiter does not notify: looked at every 2 ms)
            self._yielding = False

    async def predict(self, batch: LoadedTasks, config, ontology, version: str) -> list[dict]:
        """One entry per task, as `LabelStudioBackend.infer` gives."""
        return await self._submit(_Waiter(), batch, config, ontology, version).future

    def predict_blocking(self, batch: LoadedTasks, config, ontology, version: str, max_images: int | None = None) -> list[dict]:
        """The same from another thread (the follower), in the batch lane: clicks keep their priority;
        `max_images` per model batch (the follower's background feed uses small pieces, so a click waits less)."""
        return self._submit(_ThreadWaiter(), batch, config, ontology, version, max_images).wait()

    def _submit(self, waiter, batch: LoadedTasks, config, ontology, version: str, max_images: int | None = None):
        job = _BatchJob(waiter, (version, repr(config), max_images), (config, ontology, version), list(batch.entries),
                        max_images=max_images)
        pieces = [_Piece(job, start, part) for start, part in _split(batch, max_images or self.max_images)]
        job.pieces = len(pieces)
        with self._cond:
            self._pieces.extend(pieces)
            self._cond.notify_all()
        return waiter

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)
        for hook in self._hooks:
            hook.remove()

    # -- worker threads ----------------------------------------------------------------------------------------
    def _run_interactive(self) -> None:
        while True:
            with self._cond:
                while not (self._calls or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                call = self._calls.popleft()
                self._clicking += 1
            try:
                self._run_call(*call)
            finally:
                with self._cond:
                    self._clicking -= 1
                    self._cond.notify_all()

    def _run(self) -> None:
        self._batch_ident = threading.get_ident()
        lower_this_thread(self.nice)
        while True:
            with self._cond:
                while not (self._pieces or self._jobs or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs.popleft() if self._jobs else None
                group = None if job else self._gather()
            self._between()  # a click that came meanwhile goes first
            if job:
                self._run_job(*job)
            elif group:
                self._run_group(group)

    def _gather(self) -> list[_Piece]:
        """(Lock held.) The first waiting piece plus later ones with the same config, up to max_images, waiting
        up to wait_s for more."""
        first = self._pieces.popleft()
        group, images = [first], first.n_images
        cap = first.job.max_images or self.max_images
        deadline = time.monotonic() + self.wait_s
        while images < cap:
            for piece in list(self._pieces):
                if piece.job.key == first.job.key and images + piece.n_images <= cap:
                    self._pieces.remove(piece)
                    group.append(piece)
                    images += piece.n_images
            left = deadline - time.monotonic()
            if images >= cap or left <= 0 or self._closed:
                break
            self._cond.wait(left)
        return group

    def _run_call(self, waiter: _Waiter, fn: Callable[[], Any]) -> None:
        self.metrics.timing("queue_wait_interactive", time.perf_counter() - waiter.queued)
        start = time.perf_counter()
        try:
            waiter.done(fn())
        except Exception as exc:  # handed to the request, which answers it
            waiter.done(error=exc)
        self.metrics.timing("inference_interactive", time.perf_counter() - start)

    def _run_job(self, waiter: _Waiter, fn: Callable[[Callable[[], None]], Any]) -> None:
        self.metrics.timing("queue_wait_batch", time.perf_counter() - waiter.queued)
        start = time.perf_counter()
        try:
            waiter.done(fn(self._between))
        except Exception as exc:  # handed to the request, which answers it
            waiter.done(error=exc)
        self.metrics.timing("inference_batch", time.perf_counter() - start)

    def _run_group(self, group: list[_Piece]) -> None:
        now = time.perf_counter()
        jobs = {id(p.job): p.job for p in group}.values()
        for job in jobs:
            self.metrics.timing("queue_wait_batch", now - job.waiter.queued)
        self.metrics.merged(len(jobs))
        try:
            # the engine isolates model failures per image; it yields to clicks between images
            entries = self.backend.infer(_merge(group), *group[0].job.args, between=self._between)
        except Exception as exc:  # a request-level mistake (e.g. masks without a segmenter): whole requests fail
            for job in jobs:
                job.pieces = -1  # its other pieces, if any, must not answer again
                job.waiter.done(error=exc)
            return
        self.metrics.timing("inference_batch", time.perf_counter() - now)
        offset = 0
        for piece in group:
            n = len(piece.batch.tasks)
            piece.job.entries[piece.start : piece.start + n] = entries[offset : offset + n]
            offset += n
            piece.job.pieces -= 1
            if piece.job.pieces == 0:  # (a failed job sits below 0)
                piece.job.waiter.done(piece.job.entries)


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413, by Content-Length or while streaming."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    def _reply(self):
        self.metrics.error(RequestTooLargeError.kind)
        message = f"request body is over the limit of {self.limit} bytes (PRELABEL_MAX_REQUEST_BYTES)"
        return JSONResponse(error_body(RequestTooLargeError.kind, message), status_code=413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await self._reply()(scope, receive, send)
        seen, over, started = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # drop whatever the app answers to a cut-off body
            started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if over and not started:
            await self._reply()(scope, receive, send)


def create_app(engine: Engine, loader: LabelStudioImageSource | None = None, store: EventStore | None = None) -> FastAPI:
    settings = engine.settings
    metrics = Metrics()
    loader = loader or LabelStudioImageSource(settings)
    store = store or EventStore(settings.model_dir / "events.sqlite3")
    backend = LabelStudioBackend(engine, loader, store, metrics)
    worker = InferenceWorker(backend, metrics, settings.batch_size, settings.batch_wait_ms / 1000, settings.background_nice,
                             torch_modules(engine.detector, engine.segmenter, engine.classifier))
    follower = ProjectFollower(backend, WorkQueue(settings.model_dir / "follow.sqlite3"), worker.predict_blocking,
                               worker.run_batch_blocking)
    admitted = {"batch": 0, "interactive": 0}  # requests in flight per lane (touched on the event loop only)
    training = DistillJob(settings.model_dir / "students", DISTILL_COMMAND, settings.distill_args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.follow and follower.queue.stats()["backlog"]:  # left from before a restart
            follower.start()
        yield
        await run_in_threadpool(follower.stop)
        training.stop()
        worker.close()
        follower.queue.close()
        loader.close()
        store.close()

    app = FastAPI(
        title="prelabel ML backend",
        description="Open-vocabulary boxes and masks (Grounding DINO, OWLv2, SAM, SAM 3) for Label Studio "
                    "(ML-backend protocol).",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.metrics = metrics
    app.state.worker = worker
    app.state.training = training
    app.state.follower = follower
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, metrics=metrics)

    user = settings.basic_auth_user
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else None

    @app.middleware("http")
    async def auth_and_timing(request: Request, call_next):
        if user and password and not _authorized(request.headers.get("authorization"), user, password):
            metrics.error("auth")
            return JSONResponse(
                error_body("auth", "HTTP Basic authentication required (BASIC_AUTH_USER/BASIC_AUTH_PASS)"),
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="prelabel"'},
            )
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")  # the route template: unknown paths must not grow /metrics
        metrics.observe(getattr(route, "path", "other"), time.perf_counter() - start)
        return response

    @app.exception_handler(PrelabelError)
    async def prelabel_error(request: Request, exc: PrelabelError):
        metrics.error(exc.kind)
        overloaded = isinstance(exc, OverloadedError)  # counted in /metrics; a line each would flood the log
        log.log(logging.DEBUG if overloaded else logging.WARNING, "%s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if overloaded else None
        return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        metrics.error("request")
        problems = describe_validation(exc.errors())
        return JSONResponse(error_body("request", f"malformed request: {problems}"), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        metrics.error("internal")
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", f"unexpected {type(exc).__name__}; see the server log"), status_code=500)

    # /health and /metrics run on the event loop: they answer while every model and pool thread is busy
    @app.get("/")
    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "UP",
            "model_class": "prelabel",
            "detector": engine.detector.model_id,
            "segmenter": engine.segmenter.model_id if engine.segmenter else None,
            "classifier": engine.classifier.model_id if engine.classifier else None,
            "clicks": engine.clicker.model_id if engine.clicker else None,  # what masks a click
            "find_all_like_this": engine.finds_exemplars,  # smart rectangles find every object like them (SAM 3)
            # per project: the controls of its label config that are not pre-annotated, and why
            "skipped": {str(pid): controls for pid, controls in backend.skipped.copy().items() if controls},
        }

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}}})
    async def get_metrics(format: Literal["json", "prometheus"] = "json") -> Response:
        """JSON by default; `?format=prometheus` for Prometheus' text format."""
        snapshot = metrics.snapshot()
        snapshot["queue"] = {"admitted": dict(admitted), "capacity": settings.queue_size, "waiting": worker.depth()}
        if engine.clicker is not None:
            cache = engine.clicker.cache_info()
            lookups = cache.get("hits", 0) + cache.get("misses", 0)
            snapshot["embedding_cache"] = cache | {"hit_rate": round(cache.get("hits", 0) / lookups, 4) if lookups else 0.0}
        snapshot["webhook_events"] = store.counts()
        snapshot["follow"] = follower.queue.stats() | {"on": settings.follow, "rate_cap_per_s": settings.follow_rate}
        snapshot["training"] = training.status()
        if format == "prometheus":
            return PlainTextResponse(prometheus(snapshot), media_type="text/plain; version=0.0.4")
        return JSONResponse(snapshot)

    @app.post("/setup")
    async def setup(req: SetupRequest) -> dict:
        answer = await run_in_threadpool(backend.setup, req)
        known = loader.label_studio_url and loader.label_studio_key
        if settings.follow and known and (pid := project_id(req.project)) is not None and pid not in followed:
            followed.add(pid)
            threading.Thread(target=follow_project, args=(pid,), daemon=True, name="follow-setup").start()
        return answer

    followed: set[int] = set()

    def follow_project(pid: int) -> None:
        try:
            log.info("%s", follower.ensure_webhook(pid))
        except Exception as exc:  # noqa: BLE001 - Label Studio unreachable or refusing: new tasks then need a poll
            followed.discard(pid)
            log.warning("project %s: could not check the webhook for new tasks (%s); `prelabel annotate --project "
                        "%s --follow` polls instead", pid, exc, pid)

    @app.post("/predict", responses={200: {"model": PredictResponse}, 503: {"description": "queue full; see Retry-After"}})
    async def predict(req: PredictRequest) -> Response:
        lane = "interactive" if is_interactive(req) else "batch"
        if admitted[lane] >= settings.queue_size:
            raise OverloadedError(
                f"the {lane} queue is full ({settings.queue_size} requests, PRELABEL_QUEUE_SIZE); retry in {RETRY_AFTER_S} s"
            )
        admitted[lane] += 1
        try:
            with worker.clicking() if lane == "interactive" else nullcontext():
                return await answer(req)
        finally:
            admitted[lane] -= 1

    async def answer(req: PredictRequest) -> Response:
        prepared = await run_in_threadpool(backend.prepare, req)
        if prepared.context is not None:  # fetch here, then the model call runs on the interactive thread
            image = await run_in_threadpool(backend.interactive_image, prepared)
            results = [await worker.call(lambda: backend.interactive_task(prepared, image))]
        elif prepared.config.videos:  # tracked frame by frame; the batch thread yields to clicks between frames
            p = prepared
            results = await worker.run_batch(lambda between: backend.predict_tasks(
                p.tasks, p.config, p.ontology, p.version, progress=lambda _frames: between()))
        else:
            loaded = await run_in_threadpool(backend.load_tasks, prepared.tasks, prepared.config)
            results = await worker.predict(loaded, prepared.config, prepared.ontology, prepared.version)
        # serialised in a pool thread with the C json encoder: a page of brush RLE is megabytes of ints,
        # which FastAPI's per-element encoder would walk in Python on the event loop
        body = await run_in_threadpool(lambda: json.dumps({"results": results}).encode())
        return Response(body, media_type="application/json")

    @app.post("/webhook")
    async def webhook(req: WebhookRequest) -> JSONResponse:
        if req.action == "TASKS_CREATED":  # queued (committed) before the answer: a crash loses none
            if not settings.follow:
                return JSONResponse({"status": "not following (PRELABEL_FOLLOW=false)", "action": req.action})
            if (pid := project_id(req.project)) is None:
                raise RequestError("TASKS_CREATED webhook has no project id")
            return JSONResponse(await run_in_threadpool(follower.created, pid, req.model_dump()), status_code=201)
        status, body = await run_in_threadpool(backend.webhook, req)
        if req.action == "START_TRAINING":
            body["training"] = start_training(req)
        return JSONResponse(body, status_code=status)

    def start_training(req: WebhookRequest) -> dict:
        """START_TRAINING runs `prelabel distill` on the project in the background (see /metrics "training")."""
        pid = project_id(req.project)
        if pid is None:
            raise RequestError("START_TRAINING needs the project (its id) to train on")
        url, key = loader.label_studio_url, loader.label_studio_key
        if not url or not key:
            raise ConfigError("START_TRAINING reads the project's annotations from Label Studio: set LABEL_STUDIO_URL "
                              "and LABEL_STUDIO_API_KEY (or connect the backend with an access token)")
        return training.start(pid, url, key)

    @app.get("/versions")
    def versions() -> dict:
        return backend.known_versions()

    return app
