"""FastAPI app speaking Label Studio's ML-backend protocol (Label Studio 1.23)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..errors import PrelabelError, describe_validation
from ..images import ImageLoader
from ..metrics import Metrics
from ..pipeline import Pipeline
from .backend import LabelStudioBackend, PredictRequest, PredictResponse, SetupRequest, WebhookRequest
from .store import EventStore

log = logging.getLogger(__name__)


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


def create_app(pipeline: Pipeline, loader: ImageLoader | None = None, store: EventStore | None = None) -> FastAPI:
    settings = pipeline.settings
    metrics = Metrics()
    loader = loader or ImageLoader(settings)
    store = store or EventStore(settings.model_dir / "events.sqlite3")
    backend = LabelStudioBackend(pipeline, loader, store, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        loader.close()
        store.close()

    app = FastAPI(
        title="prelabel ML backend",
        description="Grounding DINO boxes and SAM masks for Label Studio (ML-backend protocol).",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.metrics = metrics

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
        metrics.observe(request.url.path, time.perf_counter() - start)
        return response

    @app.exception_handler(PrelabelError)
    async def prelabel_error(request: Request, exc: PrelabelError):
        metrics.error(exc.kind)
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        metrics.error("request")
        problems = describe_validation(exc.errors())
        return JSONResponse(error_body("request", f"malformed request: {problems}"), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        metrics.error("internal")
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", f"{type(exc).__name__}: {exc}"), status_code=500)

    @app.get("/")
    @app.get("/health")
    def health() -> dict:
        return {
            "status": "UP",
            "model_class": "prelabel",
            "detector": pipeline.detector.model_id,
            "segmenter": pipeline.segmenter.model_id if pipeline.segmenter else None,
        }

    @app.get("/metrics")
    def get_metrics() -> dict:
        snapshot = metrics.snapshot()
        if pipeline.segmenter is not None:
            snapshot["embedding_cache"] = pipeline.segmenter.cache_info()
        snapshot["webhook_events"] = store.counts()
        return snapshot

    @app.post("/setup")
    async def setup(req: SetupRequest) -> dict:
        return await run_in_threadpool(backend.setup, req)

    @app.post("/predict", responses={200: {"model": PredictResponse}})
    async def predict(req: PredictRequest) -> Response:
        # serialised in the worker thread with the C json encoder: a page of brush RLE is megabytes of ints,
        # which FastAPI's per-element encoder would walk in Python on the event loop
        body = await run_in_threadpool(lambda: json.dumps(backend.predict(req)).encode())
        return Response(body, media_type="application/json")

    @app.post("/webhook")
    async def webhook(req: WebhookRequest) -> JSONResponse:
        status, body = await run_in_threadpool(backend.webhook, req)
        return JSONResponse(body, status_code=status)

    @app.get("/versions")
    def versions() -> dict:
        return backend.known_versions()

    return app
