"""Fixtures: tiny models written offline, a Label-Studio-like image host and the backend over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from ml_backend.labelstudio.server import create_app
from ml_backend.labelstudio.stack import Credentials, LabelStudioProcess
from ml_backend.models.tiny import write_tiny_models
from ml_backend.ontology import PromptsFile
from ml_backend.engine import Engine
from ml_backend.settings import Settings

USER, PASSWORD = "prelabel@example.com", "prelabel-test-pass"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"
ACCESS = "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(b'{"exp": 4102444800}').decode().rstrip("=") + ".c2ln"

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Car" predicted_values="car,truck"/><Label value="Person"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Person"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""


# Markers a test gets from the fixtures it uses (directly or through other fixtures), so that `make test-fast`
# (`-m "not (label_studio or browser or mongodb or ray or slow)"`) leaves out what needs those services. What no
# fixture shows (a subprocess that starts Label Studio, a browser) is marked in its module (`pytestmark`) or on the test.
FIXTURE_MARKERS = {
    "label_studio": "label_studio",  # the real Label Studio below
    "mongodb": "mongodb",  # tests/test_review.py: FiftyOne's database
    "local_ray": "ray",  # tests/test_ray_engine.py
    "student": "slow",  # tests/test_distill.py: a student trained through the CLI (a minute on 2 quiet cores)
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


def pytest_sessionfinish(session, exitstatus):
    """PRELABEL_NO_SKIPS=1 (set by .ci/run): a skipped test fails the run, so that CI's `make test` really runs every
    test (Label Studio, Chromium, MongoDB and Ray are all installed there). `-rs` lists what was skipped and why."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("PRELABEL_NO_SKIPS") == "1" and skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"PRELABEL_NO_SKIPS=1: {len(skipped)} test(s) skipped, which fails this run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _marked_if_it_starts_a_service(request):
    """A test that starts MongoDB or Ray without its marker would run, unseen, in the fast subset: fail it instead.
    (Label Studio and the browser are started only by their fixtures and marked tests.)"""
    import sys

    def running() -> dict[str, bool]:
        ray, database = sys.modules.get("ray"), sys.modules.get("fiftyone.core.odm.database")
        return {"ray": bool(ray and ray.is_initialized()),
                "mongodb": bool(database and getattr(database, "_db_service", None) is not None)}

    before = running()
    yield
    for service, now in running().items():
        if now and not before[service] and not request.node.get_closest_marker(service):
            pytest.fail(f"{request.node.nodeid} starts {service} without the `{service}` marker (use its fixture)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.full((height, width, 3), 40, np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
        array[y : y + height // 3, x : x + width // 3] = rng.integers(60, 255, 3)
    return Image.fromarray(array)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(160, 90), (120, 200), (300, 240)]):
        (root / f"img{i}.png").write_bytes(encode(make_image(w, h, i)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120x80, shown rotated: 80 wide, 120 high
    (root / "exif.jpg").write_bytes(encode(make_image(120, 80, 7), "JPEG", exif=exif.tobytes()))
    (root / "corrupt.png").write_bytes(encode(make_image(100, 100))[:60])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_bytes(b"this is not an image")
    (root / "huge.png").write_bytes(encode(Image.new("L", (4000, 3000))))
    (root / "sub").mkdir()
    (root / "sub" / "local.png").write_bytes(encode(make_image(64, 48, 3)))
    return root


class LabelStudioLikeHost:
    """Serves images the ways Label Studio does: /data/upload (token auth, legacy or PAT-exchanged access token),
    /tasks/<id>/presign/ (redirect to a bucket on another origin) and plain public URLs. Records every request's
    Authorization header so tests can check where tokens went."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: list[tuple[str, str | None]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _file(self, path: Path):
                if not path.is_file():
                    return self._json(404, {"detail": "Not found."})
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization")
                if auth is None:
                    self._json(401, {"detail": "Authentication credentials were not provided."})
                    return False
                if auth not in (f"Token {LEGACY_TOKEN}", f"Bearer {ACCESS}"):
                    self._json(401, {"detail": "Invalid token."})
                    return False
                return True

            def do_POST(self):
                host.seen.append((self.path, self.headers.get("Authorization")))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") == "/api/token/refresh":
                    if body.get("refresh") == PAT:
                        return self._json(200, {"access": ACCESS})
                    return self._json(401, {"detail": "Token is invalid", "code": "token_not_valid"})
                self._json(404, {"detail": "Not found."})

            def do_GET(self):
                host.seen.append((self.path, self.headers.get("Authorization")))
                parts = urlsplit(self.path)
                if parts.path.startswith("/data/upload/"):
                    if self._authorized():
                        self._file(host.root / parts.path.removeprefix("/data/upload/"))
                elif parts.path.startswith("/tasks/") and parts.path.endswith("/presign/"):
                    if self._authorized():
                        uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
                        key = uri.split("://", 1)[1].split("/", 1)[1]
                        self.send_response(303)
                        self.send_header("Location", f"http://localhost:{host.port}/bucket/{key}?X-Signature=abc")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                elif parts.path.startswith("/bucket/"):
                    self._file(host.root / parts.path.removeprefix("/bucket/"))
                elif parts.path.startswith("/public/"):
                    self._file(host.root / parts.path.removeprefix("/public/"))
                elif parts.path == "/slow":
                    time.sleep(3)
                    self._json(200, {})
                else:
                    self._json(404, {"detail": "Not found."})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def auth_sent_to(self, prefix: str) -> list[str | None]:
        return [auth for path, auth in self.seen if path.startswith(prefix)]


@pytest.fixture(scope="session")
def ls_host(image_dir):
    host = LabelStudioLikeHost(image_dir)
    host.thread.start()
    yield host
    host.server.shutdown()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, image_dir):
    """A real Label Studio on loopback (the same launcher `prelabel up` uses), serving local files below
    `image_dir`; stopped afterwards. Yields its URL; the legacy token LEGACY_TOKEN is valid."""
    pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
    studio = LabelStudioProcess(tmp_path_factory.mktemp("label-studio"), free_port(), image_dir, Credentials(USER, PASSWORD, LEGACY_TOKEN))
    try:
        studio.wait_ready(timeout=240)
        yield studio.url
    finally:
        studio.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def base_pipeline(tiny_models, tmp_path_factory) -> Engine:
    settings = Settings(
        detector=str(tiny_models["detector"]),
        segmenter=str(tiny_models["segmenter"]),
        model_dir=tmp_path_factory.mktemp("model-dir"),
    )
    return Engine.from_settings(settings)


def make_settings(pipeline: Engine, tmp_path: Path, **overrides) -> Settings:
    values = dict(
        detector=pipeline.detector.model_id,
        segmenter=pipeline.segmenter.model_id,
        model_dir=tmp_path / "model-dir",
        max_image_pixels=5_000_000,
    ) | overrides
    return Settings(**values)


class RunningServer:
    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("backend did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def start_backend(base_pipeline, tmp_path):
    """Start a backend over real HTTP with settings overrides, sharing the session's loaded models."""
    servers = []

    def start(prompts: PromptsFile | None = None, **overrides) -> RunningServer:
        settings = make_settings(base_pipeline, tmp_path, **overrides)
        pipeline = Engine(base_pipeline.detector, base_pipeline.segmenter, prompts or PromptsFile(), settings)
        servers.append(RunningServer(create_app(pipeline)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def backend(start_backend, ls_host, image_dir):
    return start_backend(
        label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN, local_files_document_root=image_dir
    )


@pytest.fixture
def http():
    with httpx.Client(timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def local_ray():
    """One Ray per test module (starting one takes seconds); the engine uses it and leaves it running."""
    ray = pytest.importorskip("ray", reason="Ray is installed by the project's test extra (or `prelabel[ray]`)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
