"""Serving under load and at the edge, over real HTTP on tiny models: the inference worker (micro-batching, priority
lane, 503 when full), resource limits, the SSRF guard, secrets kept out of logs and answers, auth, faults."""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ml_backend.errors import ImageBlockedError
from ml_backend.labelstudio.images import LabelStudioImageSource
from ml_backend.net import UrlGuard, address_kind, redact
from ml_backend.labelstudio.server import create_app
from ml_backend.labelstudio.store import EventStore
from ml_backend.ontology import PromptsFile
from ml_backend.engine import Engine
from ml_backend.settings import Settings

from .conftest import CONFIG, RunningServer, encode, free_port, make_image, make_settings

BOXES = '<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="Car"/></RectangleLabels></View>'


def data_uri(width: int, height: int, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(make_image(width, height, seed))).decode()


def box_tasks(*widths: int, first_id: int = 1) -> list[dict]:
    return [{"id": first_id + i, "data": {"img": data_uri(w, 40, i)}} for i, w in enumerate(widths)]


class GatedDetector:
    """The real tiny detector, except that each call waits until the test allows it (stands in for a big model that
    is busy exactly as long as the test needs, on a machine of any speed). `calls` counts the calls begun."""

    def __init__(self, inner):
        self.inner, self.model_id = inner, inner.model_id
        self.calls = self.allowed = 0
        self._cond = threading.Condition()

    def allow(self, calls: float = 1) -> None:
        with self._cond:
            self.allowed += calls
            self._cond.notify_all()

    def detect(self, images, ontology):
        with self._cond:
            self.calls += 1
            if not self._cond.wait_for(lambda: self.allowed >= self.calls, timeout=120):
                raise RuntimeError("the test never allowed this detector call")
        return self.inner.detect(images, ontology)


class FaultyDetector:
    """The real tiny detector, except that it raises on any batch holding an image `bad_width` pixels wide."""

    def __init__(self, inner, bad_width: int):
        self.inner, self.bad_width, self.model_id = inner, bad_width, inner.model_id

    def detect(self, images, ontology):
        if any(image.shape[1] == self.bad_width for image in images):
            raise RuntimeError(f"CUDA-like failure on a {self.bad_width} px wide image")
        return self.inner.detect(images, ontology)


@pytest.fixture
def serve(base_pipeline, tmp_path):
    """Start a backend with a given detector (default: the tiny one) and settings overrides."""
    servers = []

    def start(detector=None, **overrides) -> RunningServer:
        settings = make_settings(base_pipeline, tmp_path, **overrides)
        pipeline = Engine(detector or base_pipeline.detector, base_pipeline.segmenter, PromptsFile(), settings)
        servers.append(RunningServer(create_app(pipeline)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def post_predict(url: str, tasks: list, config: str = BOXES, **extra) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"tasks": tasks, "label_config": config} | extra, timeout=60)


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# -- 1. concurrency -----------------------------------------------------------------------------------------------
def test_concurrent_predict_requests_are_merged_into_one_model_batch(serve):
    server = serve(batch_size=8, batch_wait_ms=300)
    threads = [in_background(post_predict, server.url, box_tasks(50 + i, first_id=10 * i)) for i in range(4)]
    for thread, _ in threads:
        thread.join(30)
    for i, (_, (response,)) in enumerate(threads):
        (result,) = response.json()["results"]
        assert response.status_code == 200 and result["result"], result
        assert {r["original_width"] for r in result["result"]} == {50 + i}, "each request gets its own task's result"
    metrics = httpx.get(f"{server.url}/metrics").json()
    assert metrics["requests_per_batch"]["max"] >= 2 and metrics["batch_size"]["max"] >= 2
    assert "queue_wait_batch" in metrics["timings_s"] and "inference_batch" in metrics["timings_s"]


def queue(server) -> dict:
    return httpx.get(f"{server.url}/metrics", timeout=30).json()["queue"]


def test_health_and_metrics_answer_while_the_model_is_busy(serve, base_pipeline):
    detector = GatedDetector(base_pipeline.detector)
    server = serve(detector)
    thread, out = in_background(post_predict, server.url, box_tasks(60))
    try:
        wait_for(lambda: detector.calls == 1)  # the model is busy with the batch until allowed
        assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "UP"
        assert queue(server)["admitted"]["batch"] == 1
        assert thread.is_alive() and detector.calls == 1, "answered while the model was still busy"
    finally:
        detector.allow(float("inf"))
    thread.join(30)
    assert out[0].status_code == 200


def test_a_full_queue_answers_503_with_retry_after_and_the_limit(serve, base_pipeline):
    detector = GatedDetector(base_pipeline.detector)
    server = serve(detector, queue_size=1)
    thread, out = in_background(post_predict, server.url, box_tasks(60))
    try:
        wait_for(lambda: detector.calls == 1)  # the one admitted request holds the model
        refused = post_predict(server.url, box_tasks(70))
    finally:
        detector.allow(float("inf"))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["kind"] == "overloaded"
    assert "1 requests, PRELABEL_QUEUE_SIZE" in refused.json()["error"]["message"]
    thread.join(30)
    assert out[0].status_code == 200
    assert post_predict(server.url, box_tasks(70)).status_code == 200, "admitted again once the queue drains"
    assert httpx.get(f"{server.url}/metrics").json()["errors"]["overloaded"] == 1


def keypoint_click(image: str) -> dict:
    region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 80, "original_height": 60,
              "is_positive": True, "value": {"x": 40, "y": 50, "keypointlabels": ["Car"]}}
    return {"tasks": [{"id": 99, "data": {"image": image}}], "label_config": CONFIG, "params": {"context": {"result": [region]}}}


def test_a_click_runs_beside_a_batch_model_call_that_is_still_running(serve, base_pipeline):
    # batch_size=1: a 6-task batch is 6 model calls; while the first is held, a click is answered
    detector = GatedDetector(base_pipeline.detector)
    server = serve(detector, batch_size=1, batch_wait_ms=0)
    thread, out = in_background(post_predict, server.url, box_tasks(*range(50, 56)))
    try:
        wait_for(lambda: detector.calls == 1)  # the batch's first model call is running
        click = httpx.post(f"{server.url}/predict", json=keypoint_click(data_uri(80, 60)), timeout=60)
        assert (detector.calls, detector.allowed) == (1, 0) and thread.is_alive(), "the click waited for the batch"
    finally:
        detector.allow(float("inf"))
    assert click.status_code == 200 and click.json()["results"][0]["result"]
    thread.join(30)
    assert [len(r["result"]) > 0 for r in out[0].json()["results"]] == [True] * 6


MASKS = ('<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="Car"/></RectangleLabels>'
         '<BrushLabels name="m" toName="i"><Label value="Car"/></BrushLabels></View>')


class ClickGate:
    """The real tiny segmenter; a click's call (points) waits until `release` is set. `log` holds the calls in
    order: "click", "click done", "boxes" (a batch image's masks)."""

    def __init__(self, inner):
        self.inner, self.model_id = inner, inner.model_id
        self.log: list[str] = []
        self.release = threading.Event()

    def segment(self, image, boxes=None, points=None, point_labels=None):
        if points is None:
            self.log.append("boxes")
            return self.inner.segment(image, boxes=boxes)
        self.log.append("click")
        if not self.release.wait(120):
            raise RuntimeError("the test never released the click")
        out = self.inner.segment(image, boxes=boxes, points=points, point_labels=point_labels)
        self.log.append("click done")
        return out

    def prepare(self, image):
        self.inner.prepare(image)

    def cache_info(self) -> dict:
        return self.inner.cache_info()


def test_a_running_batch_yields_to_a_click_at_its_next_step(base_pipeline, tmp_path):
    # one batch piece of 3 images with masks: a click arrives while the batch detects; the batch's next step (the
    # first image's masks) waits until the click is answered
    detector, segmenter = GatedDetector(base_pipeline.detector), ClickGate(base_pipeline.segmenter)
    settings = make_settings(base_pipeline, tmp_path, batch_size=3, batch_wait_ms=0)
    server = RunningServer(create_app(Engine(detector, segmenter, PromptsFile(), settings)))
    batch, out = in_background(lambda: post_predict(server.url, box_tasks(60, 70, 80), MASKS))
    try:
        wait_for(lambda: detector.calls == 1, timeout=60)  # the batch's detection is running (held)
        clicked, click = in_background(lambda: httpx.post(f"{server.url}/predict", json=keypoint_click(data_uri(80, 60)),
                                                          timeout=60))
        wait_for(lambda: segmenter.log == ["click"], timeout=30)  # the click runs beside it
        detector.allow(1)  # the detection ends; the batch goes on to its next step
        wait_for(lambda: queue(server)["waiting"]["batch_yielding"] == 1, timeout=30)
        assert segmenter.log == ["click"], "the batch made masks while the click ran"
        segmenter.release.set()
        clicked.join(30)
        batch.join(60)
    finally:
        detector.allow(float("inf"))
        segmenter.release.set()
        server.stop()
    assert segmenter.log[:2] == ["click", "click done"] and segmenter.log[2:] == ["boxes"] * 3
    assert click[0].status_code == 200 and click[0].json()["results"][0]["result"]
    assert [{r["type"] for r in e["result"]} for e in out[0].json()["results"]] == [{"rectanglelabels", "brushlabels"}] * 3


def test_metrics_speak_prometheus_text_format(serve):
    server = serve()
    post_predict(server.url, box_tasks(50))
    httpx.post(f"{server.url}/predict", json=keypoint_click(data_uri(80, 60)))
    httpx.post(f"{server.url}/predict", json=keypoint_click(data_uri(80, 60)))
    response = httpx.get(f"{server.url}/metrics", params={"format": "prometheus"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("prelabel_requests_total{route=\"/predict\"}", "prelabel_request_latency_seconds{route=\"/predict\",quantile=\"0.99\"}",
                 "prelabel_queue_depth{lane=\"batch\"}", "prelabel_batch_size{stat=\"max\"}", "prelabel_stage_seconds{stage=\"inference_batch\",quantile=\"0.5\"}"):
        assert name in text, name
    hit_rate = httpx.get(f"{server.url}/metrics").json()["embedding_cache"]["hit_rate"]
    assert 0 < hit_rate < 1 and "prelabel_embedding_cache_hit_ratio " in text  # the second click hit the cache


def test_unknown_paths_do_not_grow_the_metrics(serve):
    server = serve()
    for i in range(5):
        httpx.get(f"{server.url}/nope/{i}")
    assert "/nope/0" not in httpx.get(f"{server.url}/metrics").json()["requests"]


# -- 2. resource limits -------------------------------------------------------------------------------------------
def test_request_bodies_over_the_limit_get_413_naming_it(serve):
    server = serve(max_request_bytes=2000)
    assert post_predict(server.url, box_tasks(10)).status_code == 200
    response = post_predict(server.url, box_tasks(10), pad="x" * 3000)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body is over the limit of 2000 bytes (PRELABEL_MAX_REQUEST_BYTES)"

    def chunks():  # no Content-Length: counted while it streams
        yield b'{"tasks": ['
        for _ in range(50):
            yield b'{"id": 1, "data": {"img": "' + b"A" * 100 + b'"}},'
        yield b'{}], "label_config": "<View/>"}'

    streamed = httpx.post(f"{server.url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "2000 bytes" in streamed.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    "overrides, width, expected",
    [
        ({"max_image_pixels": 1000}, 50, "50x40 = 2000 pixels, over the limit of 1000 (PRELABEL_MAX_IMAGE_PIXELS)"),
        ({"max_download_bytes": 100}, 50, "over the download limit of 100 bytes (PRELABEL_MAX_DOWNLOAD_BYTES)"),
    ],
)
def test_image_limits_name_the_limit_in_batch_and_interactive_answers(serve, overrides, width, expected):
    server = serve(**overrides)
    (entry,) = post_predict(server.url, box_tasks(width)).json()["results"]
    assert entry["error"]["kind"] == "image_too_large" and expected in entry["error"]["message"]
    click = httpx.post(f"{server.url}/predict", json=keypoint_click(data_uri(width, 40)))
    assert click.status_code == 413 and expected in click.json()["error"]["message"]


def test_too_many_tasks_get_a_4xx_naming_the_limit(serve):
    response = post_predict(serve(max_tasks_per_request=2).url, box_tasks(50, 51, 52))
    assert response.status_code == 400 and "over the limit of 2 (PRELABEL_MAX_TASKS_PER_REQUEST)" in response.text


# -- 3. SSRF guard ------------------------------------------------------------------------------------------------
DNS = {
    "ls.example": ["203.0.113.10"], "bucket.s3.example": ["52.216.1.2"], "cdn.example": ["93.184.216.34"],
    "metadata.example": ["169.254.169.254"], "intranet.example": ["10.1.2.3"], "rebind.example": ["93.184.216.34", "127.0.0.1"],
    "v6local.example": ["fe80::1"], "mapped.example": ["::ffff:192.168.0.1"], "localhost": ["127.0.0.1", "::1"],
    "127.0.0.1": ["127.0.0.1"], "169.254.169.254": ["169.254.169.254"], "lab.internal": ["10.9.9.9"],
    "cgnat.example": ["100.64.0.1"], "images.partner.example": ["10.7.0.1"],
}


def fake_dns(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("Name or service not known")
    return DNS[host]


@pytest.mark.parametrize(
    "allowed, url, redirected_by_ls, refusal",
    [
        ([], "https://ls.example/data/upload/1/a.png", False, None),
        ([], "https://cdn.example/a.png", False, "cdn.example is neither the Label Studio host (ls.example) nor in PRELABEL_ALLOWED_HOSTS"),
        (["*"], "https://cdn.example/a.png", False, None),
        ([], "https://bucket.s3.example/k.png?X-Amz-Signature=s", True, None),  # cloud presign redirect
        ([], "http://metadata.example/latest/meta-data/", True, "169.254.169.254, a link-local address"),
        (["*"], "http://169.254.169.254/latest/meta-data/", False, "169.254.169.254, a link-local address"),
        (["*"], "http://intranet.example/a.png", False, "10.1.2.3, a private address"),
        (["*"], "http://rebind.example/a.png", False, "127.0.0.1, a loopback address"),
        (["*"], "http://v6local.example/a.png", False, "fe80::1, a link-local address"),
        (["*"], "http://mapped.example/a.png", False, "::ffff:192.168.0.1, a private address"),
        (["*"], "http://cgnat.example/a.png", False, "100.64.0.1, a non-public address"),
        (["*"], "http://localhost:6379/", False, "a loopback address that is not Label Studio's"),
        ([], "https://localhost:443/data/upload/a.png", False, "a loopback address"),
        (["lab.internal"], "http://lab.internal/a.png", False, None),
        (["*.partner.example"], "http://images.partner.example/a.png", False, None),
        (["10.0.0.0/8"], "http://intranet.example/a.png", False, None),
        (["10.0.0.0/8"], "http://metadata.example/a.png", False, "link-local"),
        (["*"], "http://nowhere.example/a.png", False, "does not resolve"),
        (["*"], "file:///etc/passwd", False, "only http(s) URLs"),
    ],
)
def test_url_guard_classifies_resolved_addresses(allowed, url, redirected_by_ls, refusal):
    guard = UrlGuard(allowed, resolver=fake_dns)
    guard.set_tool("https://ls.example")
    reason = guard.refusal(url, redirected_by_tool=redirected_by_ls)
    assert reason == refusal if refusal is None else refusal in reason


def test_a_label_studio_host_at_a_link_local_address_is_refused_unless_allowed():
    guard = UrlGuard([], resolver=fake_dns)  # e.g. set by an unauthenticated /setup {"hostname": ...}
    guard.set_tool("http://metadata.example")
    assert "Label Studio host metadata.example resolves to 169.254.169.254" in guard.refusal("http://metadata.example/latest/")
    guard = UrlGuard(["169.254.169.254/32"], resolver=fake_dns)
    guard.set_tool("http://metadata.example")
    assert guard.refusal("http://metadata.example/data/upload/a.png") is None


def test_label_studio_on_loopback_is_reachable_by_its_other_names():
    guard = UrlGuard([], resolver=fake_dns)
    guard.set_tool("http://127.0.0.1:8080")
    assert guard.refusal("http://localhost:8080/data/upload/a.png") is None
    assert "loopback" in guard.refusal("http://localhost:8081/data/upload/a.png")


@pytest.mark.parametrize("address, kind", [("8.8.8.8", None), ("2606:4700::1111", None), ("127.0.0.2", "loopback"),
                                           ("::1", "loopback"), ("169.254.1.1", "link-local"), ("172.16.0.1", "private"),
                                           ("fd00::1", "private"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified")])
def test_address_kinds(address, kind):
    assert address_kind(address) == kind


class Redirector:
    """A loopback host that answers every GET with a redirect to `target`."""

    def __init__(self, target: str):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("target, reason", [
    ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254, a link-local address"),
    ("http://127.0.0.1:{closed}/x.png", "a loopback address that is not Label Studio's"),
    ("file:///etc/passwd", "only http(s) URLs"),
])
def test_redirects_to_forbidden_addresses_are_refused_before_connecting(target, reason):
    redirector = Redirector(target.format(closed=free_port()))
    try:
        source = LabelStudioImageSource(Settings(label_studio_url=redirector.url, download_timeout=5))  # a Label Studio hop
        with pytest.raises(ImageBlockedError) as err:
            source.load(f"{redirector.url}/img.png", 1)
        message = str(err.value)
        assert reason in message and "a redirect" in message and f"{redirector.url}/img.png" in message
    finally:
        redirector.server.shutdown()


def test_a_blocked_task_url_is_named_in_its_error_entry_and_the_batch_survives(serve):
    server = serve(label_studio_url="http://127.0.0.1:1")
    tasks = box_tasks(50) + [{"id": 7, "data": {"img": "http://169.254.169.254/latest/meta-data/"}}]
    good, bad = post_predict(server.url, tasks).json()["results"]
    assert good["result"] and bad["error"]["kind"] == "image_blocked"
    assert bad["error"]["message"].startswith("task 7: image http://169.254.169.254/latest/meta-data/ ")
    assert "link-local" in bad["error"]["message"] and "PRELABEL_ALLOWED_HOSTS" in bad["error"]["message"]


# -- secrets ------------------------------------------------------------------------------------------------------
SECRET = "f00dfacef00dfacef00dfacef00dfacef00dface"  # 40 hex: looks like a legacy token, LabelStudioLikeHost refuses it


def test_tokens_and_passwords_never_reach_logs_error_bodies_or_metrics(serve, ls_host, caplog):
    caplog.set_level(logging.DEBUG)
    server = serve(label_studio_url=ls_host.url, label_studio_api_key=SECRET, basic_auth_user="ls", basic_auth_pass=SECRET,
                   allowed_hosts=["127.0.0.1"])
    auth, bodies = ("ls", SECRET), []
    with httpx.Client(auth=auth, timeout=60) as http:
        bodies.append(http.post(f"{server.url}/setup", json={"project": "1.1", "schema": BOXES, "hostname": ls_host.url, "access_token": SECRET}).text)
        tasks = [
            {"id": 1, "data": {"img": "/data/upload/img0.png"}},  # LS refuses the token: 401
            {"id": 2, "data": {"img": f"http://user:{SECRET}@127.0.0.1:{free_port()}/a.png"}},  # userinfo
            {"id": 3, "data": {"img": f"{ls_host.url}/public/missing.png?X-Amz-Signature={SECRET}&token={SECRET}"}},
            {"id": 4, "data": {"img": f"http://169.254.169.254/?sig={SECRET}"}},
        ]
        response = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": BOXES})
        bodies.append(response.text)
        assert [e["error"]["kind"] for e in response.json()["results"]] == ["image_auth", "image_fetch", "image_fetch", "image_blocked"]
        bodies.append(http.post(f"{server.url}/predict", json=keypoint_click(f"{ls_host.url}/x?token={SECRET}") | {"label_config": CONFIG}).text)
        bodies.append(httpx.get(f"{server.url}/metrics", auth=("ls", "wrong" + SECRET)).text)
        bodies += [http.get(f"{server.url}/metrics").text, http.get(f"{server.url}/metrics?format=prometheus").text]
    assert "***" in bodies[1], "signatures are masked, not dropped"
    for text in bodies + [caplog.text]:
        assert SECRET not in text


# -- 4. auth ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path", [("GET", "/redoc"), ("GET", "/docs/oauth2-redirect"), ("GET", "/metrics?format=prometheus"),
                                          ("POST", "/webhook"), ("POST", "/predict"), ("GET", "/nonexistent")])
def test_basic_auth_guards_docs_metrics_and_unknown_paths_too(serve, method, path):
    server = serve(basic_auth_user="ls", basic_auth_pass="s3cret")
    response = httpx.request(method, f"{server.url}{path}", json={})
    assert response.status_code == 401 and response.headers["www-authenticate"] == 'Basic realm="prelabel"'


def test_serve_warns_when_bound_beyond_loopback_without_basic_auth(tmp_path, caplog, monkeypatch):
    from typer.testing import CliRunner

    from ml_backend.cli import app

    monkeypatch.delenv("BASIC_AUTH_USER", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="ml_backend.cli")
    missing = str(tmp_path / "no-such-model")  # fails to load right after the warning: no server starts
    CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", str(free_port()), "--detector", missing, "--segmenter", "none"])
    assert "serving on 0.0.0.0 without BASIC_AUTH_USER/BASIC_AUTH_PASS" in caplog.text


# -- 5. faults ----------------------------------------------------------------------------------------------------
def test_a_model_error_on_one_task_keeps_the_other_tasks_results(serve, base_pipeline):
    server = serve(FaultyDetector(base_pipeline.detector, 77), batch_size=8)
    results = post_predict(server.url, box_tasks(50, 77, 60) + [{"id": 9}]).json()["results"]
    assert results[0]["result"] and results[2]["result"]
    assert results[3]["error"]["message"] == "task 9: task has no 'data' object", "earlier errors are kept"
    assert results[1] == {"task": 2, "error": {"kind": "inference", "message": results[1]["error"]["message"]}}
    message = results[1]["error"]["message"]
    assert message.startswith("task 2: the model failed on this image (") and "): RuntimeError: " in message
    assert httpx.get(f"{server.url}/metrics").json()["errors"]["inference"] == 1


def test_a_model_error_in_one_request_does_not_fail_requests_batched_with_it(serve, base_pipeline):
    server = serve(FaultyDetector(base_pipeline.detector, 77), batch_size=8, batch_wait_ms=300)
    bad, good = in_background(post_predict, server.url, box_tasks(77)), in_background(post_predict, server.url, box_tasks(55))
    bad[0].join(30), good[0].join(30)
    assert bad[1][0].json()["results"][0]["error"]["kind"] == "inference"
    assert good[1][0].json()["results"][0]["result"]


SERVER_SCRIPT = """
import sys, uvicorn
from ml_backend.labelstudio.server import create_app
from ml_backend.engine import Engine
from ml_backend.settings import Settings
settings = Settings(detector=sys.argv[1], segmenter=sys.argv[2], model_dir=sys.argv[3])
uvicorn.run(create_app(Engine.from_settings(settings)), host="127.0.0.1", port=int(sys.argv[4]), log_level="warning")
"""


@pytest.mark.slow  # a server process started and killed
def test_a_server_killed_mid_batch_keeps_every_acknowledged_webhook_event(tiny_models, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-c", SERVER_SCRIPT, str(tiny_models["detector"]), str(tiny_models["segmenter"]), str(tmp_path), str(port)]
    proc = subprocess.Popen(args, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is None and _up(url), timeout=90)
        acknowledged = []
        for i in range(20):
            event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 100 + i, "result": []}, "task": {"id": i}}
            response = httpx.post(f"{url}/webhook", json=event)
            assert response.status_code == 201
            acknowledged += response.json()["event_ids"]
        posting, _ = in_background(lambda: _quiet_post(url, box_tasks(*range(40, 72))))  # a batch in flight
        wait_for(lambda: not posting.is_alive() or httpx.get(f"{url}/metrics", timeout=10).json()["queue"]["admitted"]["batch"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = EventStore(tmp_path / "events.sqlite3")
    events = store.events(project_id=3)
    assert [e["id"] for e in events] == acknowledged
    assert [e["annotation_id"] for e in events] == list(range(100, 120))
    store.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _quiet_post(url: str, tasks: list) -> None:
    try:
        post_predict(url, tasks)
    except httpx.HTTPError:
        pass  # the server is killed under it


def test_redact_masks_userinfo_and_signature_parameters():
    assert redact("https://u:p@b.example/k.png?X-Amz-Signature=abc&w=1") == "https://b.example/k.png?X-Amz-Signature=***&w=1"
    assert redact("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"


def test_connections_go_to_the_addresses_the_guard_checked(ls_host, image_dir):
    """No DNS rebinding: the name is resolved once, by the guard, and the connection goes to what it accepted.
    `images.test` resolves only in the guard's resolver, so the fetch works only if that answer is used."""
    loader = LabelStudioImageSource(Settings(allowed_hosts=["127.0.0.1/32"], download_timeout=5))
    loader.guard.resolver = lambda host, port: ["127.0.0.1"] if host == "images.test" else []
    try:
        port = int(ls_host.url.rsplit(":", 1)[1])
        image = loader.load(f"http://images.test:{port}/public/img1.png")
        assert image.width == 120 and loader.guard.pinned("images.test", port) == ["127.0.0.1"]
        loader.guard.resolver = lambda host, port: ["169.254.169.254"]  # the name now rebinds to cloud metadata
        with pytest.raises(ImageBlockedError, match="169.254.169.254, a link-local address"):
            loader.load(f"http://images.test:{port}/public/img1.png")
    finally:
        loader.close()
