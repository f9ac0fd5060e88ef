"""`prelabel cvat follow`: new CVAT tasks pre-annotated once each, found by polling through cvat-sdk or announced
by CVAT webhooks (signature checked), kept in a durable queue across restarts and CVAT outages. cvat-sdk runs
against the loopback CVAT-like server of tests/cvat_server.py, the models are tiny random ones; every follower runs
in a thread that the test stops and joins."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from ml_backend.cvat.follow import (CvatAnnotator, Follower, TaskQueue, connector, cvat_webhook, follow_cvat,
                                    queue_path, signature)
from ml_backend.errors import ConfigError

from .conftest import free_port, make_image
from .cvat_server import TOKEN, CvatLikeServer, png

PROMPTS = "box_threshold: 0.0\ntext_threshold: 0.0\nlabels:\n  car: [car]\n  Person: person\n"
LABELS = [(11, "car", "any"), (12, "Person", "any")]
SECRET = "webhook-s3cret"


def frames(n: int, seed: int = 0) -> list[bytes]:
    return [png(np.array(make_image(160, 120, seed + k))) for k in range(n)]


@pytest.fixture(scope="module")
def annotator(tmp_path_factory, tiny_models):
    """One annotator for the module: the tiny detector loads once (two boxes at most per image)."""
    root = tmp_path_factory.mktemp("cvat-follow")
    (root / "prompts.yaml").write_text(PROMPTS)
    annotate = CvatAnnotator(str(root / "prompts.yaml"), str(tiny_models["detector"]), tracker="none")
    return SimpleNamespace(annotate=annotate, env=dict(MODEL_DIR=str(root / "model-dir")))  # loads on a first task


@pytest.fixture
def cvat():
    server = CvatLikeServer()
    yield server
    server.close()


class Running:
    """`follow_cvat` in a thread over `queue_path(tmp_path, cvat.url)`; `stop()` joins it and closes the queue."""

    def __init__(self, cvat, annotator, tmp_path, monkeypatch, listen=None, **options):
        monkeypatch.setenv("PRELABEL_MAX_DETECTIONS", "2")
        monkeypatch.setenv("MODEL_DIR", annotator.env["MODEL_DIR"])
        self.queue = TaskQueue(queue_path(tmp_path, cvat.url))
        self.events: list[tuple[int, str, str]] = []
        self.follower = Follower(connector(cvat.url, TOKEN, None, None, tmp_path / "cache"), self.queue,
                                 annotator.annotate, poll=0.1, max_backoff=0.4,
                                 report=lambda *event: self.events.append(event), **options)
        self.event, self.errors = threading.Event(), []

        def run():
            try:
                follow_cvat(self.follower, self.event, listen, secret=SECRET if listen else None)
            except Exception as exc:  # surfaced by wait_for / stop
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_for(self, condition, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"timed out; events {self.events}"
            time.sleep(0.02)

    def state(self, task_id):
        return self.queue.states().get(task_id, (None, ""))[0]

    def stop(self):
        self.event.set()
        self.thread.join(15)
        assert not self.thread.is_alive() and not self.errors, self.errors
        self.queue.close()


def test_new_tasks_are_pre_annotated_once_each_and_a_restart_redoes_nothing(cvat, annotator, tmp_path, monkeypatch):
    cvat.add_task(1, LABELS, frames(3), mode="annotation", project_id=5)
    cvat.add_task(2, LABELS, frames(2), mode="annotation", project_id=6)  # another project: not followed
    cvat.add_task(3, LABELS, frames(2, seed=9), mode="annotation", project_id=5)
    cvat.tasks[3]["annotations"]["shapes"].append({"type": "rectangle", "frame": 0, "label_id": 11, "id": 1,
                                                   "points": [1, 2, 3, 4]})  # labelled by hand already
    running = Running(cvat, annotator, tmp_path, monkeypatch, project=5)
    running.wait_for(lambda: running.state(1) == "done" and running.state(3) == "skipped")
    cvat.add_task(4, LABELS, frames(6, seed=20), mode="interpolation", project_id=5)  # a video, created meanwhile
    cvat.add_task(5, LABELS, [], mode="annotation", project_id=5)  # created, its data still uploading
    running.wait_for(lambda: running.state(4) == "done")
    time.sleep(0.3)
    assert running.state(5) == "queued"  # waits for its data: neither done nor failed
    cvat.tasks[5]["frames"] = frames(2, seed=30)
    running.wait_for(lambda: running.state(5) == "done")
    running.stop()

    annotated = {tid: t["annotations"] for tid, t in cvat.tasks.items()}
    assert len(cvat.written) == 3 and all(method == "PATCH" for method, _, _ in cvat.written)
    shapes = annotated[1]["shapes"]
    assert shapes and {s["frame"] for s in shapes} <= {0, 1, 2} and {s["label_id"] for s in shapes} <= {11, 12}
    assert all(s["source"] == "auto" and s["type"] == "rectangle" for s in shapes)
    assert annotated[4]["tracks"] and not annotated[4]["shapes"]  # the video as tracks
    assert annotated[5]["shapes"] and annotated[2] == {"tags": [], "shapes": [], "tracks": []}
    assert len(annotated[3]["shapes"]) == 1  # the hand-made annotation, nothing added
    assert [e[:2] for e in running.events] == [(1, "done"), (3, "skipped"), (4, "done"), (5, "done")]
    assert "already has annotations" in running.events[1][2] and "tracks" in running.events[2][2]

    again = Running(cvat, annotator, tmp_path, monkeypatch, project=5)  # the same queue file: nothing is redone
    time.sleep(0.5)
    again.stop()
    assert len(cvat.written) == 3 and again.events == []


def test_webhooks_queue_their_task_only_with_the_right_signature(cvat, annotator, tmp_path, monkeypatch):
    cvat.add_task(7, LABELS, frames(2), mode="annotation", project_id=5)
    cvat.add_task(8, LABELS, frames(2), mode="annotation", project_id=5)
    port = free_port()
    running = Running(cvat, annotator, tmp_path, monkeypatch, listen=port, project=5, discover=False)
    url = f"http://127.0.0.1:{port}/webhook"
    running.wait_for(lambda: _listening(url))

    def post(payload: dict, secret: str | None = SECRET, header: str | None = None):
        body = json.dumps(payload).encode()  # as CVAT sends it: json.dumps of the payload
        headers = {"Content-Type": "application/json"}
        if secret or header:
            headers["X-Signature-256"] = header or signature(body, secret)
        return httpx.post(url, content=body, headers=headers, timeout=10)

    created = lambda tid, project=5: {"event": "create:task", "task": {"id": tid, "project_id": project},  # noqa: E731
                                       "webhook_id": 1, "sender": {"id": 1}}
    bad = post(created(8), secret="not-the-secret")
    assert bad.status_code == 403 and "X-Signature-256" in bad.json()["detail"]
    assert post(created(8), secret=None).status_code == 403  # unsigned
    assert post({"event": "ping", "webhook": {"id": 1}}).json() == {"queued": None}
    assert post(created(9, project=6)).json() == {"queued": None}  # another project
    assert post({"event": "create:task", "task": {}}).status_code == 400
    good = post(created(7))
    assert good.status_code == 200 and good.json() == {"queued": 7}
    running.wait_for(lambda: running.state(7) == "done")
    assert post(created(7)).json() == {"queued": 7}  # CVAT redelivering: still once
    follow = httpx.get(url.replace("/webhook", "/metrics"), timeout=10).json()["follow"]
    assert follow | {"oldest_waiting_s": 0, "rate_per_s": 0} == {
        "backlog": 0, "oldest_waiting_s": 0, "rate_per_s": 0, "done": 1, "skipped": 0, "failed": 0,
        "cvat_outages": 0, "polling": False}
    assert follow["rate_per_s"] > 0
    time.sleep(0.3)
    assert running.state(8) is None
    running.stop()
    assert [e[:2] for e in running.events] == [(7, "done")]
    assert len(cvat.written) == 1  # never listed: webhooks only, and 8's were refused
    assert cvat.tasks[7]["annotations"]["shapes"] and not any("/api/tasks?" in path for _, path in cvat.seen)


def _listening(url: str) -> bool:
    try:
        return httpx.get(url.replace("/webhook", "/health"), timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow  # ~7 s of cvat-sdk's own retries while the server is down (the full suite runs it)
def test_cvat_down_for_a_few_polls_then_back_loses_nothing(cvat, annotator, tmp_path, monkeypatch):
    cvat.add_task(1, LABELS, frames(2), mode="annotation")
    running = Running(cvat, annotator, tmp_path, monkeypatch)
    running.wait_for(lambda: running.state(1) == "done")
    cvat.stop()
    running.wait_for(lambda: running.follower.outages >= 2)  # refused connections (cvat-sdk retries each 3 times), retried with backoff
    cvat.add_task(2, LABELS, frames(2, seed=4), mode="annotation")  # created while it could not see CVAT
    cvat.add_task(3, LABELS, [], mode="annotation")
    running.queue.add(3, "webhook")  # its webhook acknowledged meanwhile; its data arrives later
    cvat.start()
    running.wait_for(lambda: running.state(2) == "done")
    assert running.state(3) == "queued"
    cvat.tasks[3]["frames"] = frames(1, seed=8)
    running.wait_for(lambda: running.state(3) == "done")
    running.stop()
    assert [e[:2] for e in running.events] == [(1, "done"), (2, "done"), (3, "done")]
    assert len(cvat.written) == 3


def test_webhook_payloads_and_signatures_follow_cvat():
    # CVAT's documented example: secret "mykey", an empty body
    assert signature(b"", "mykey") == "sha256=e1b24265bf2e0b20c81837993b4f1415f7b68c503114d100a40601eca6a2745f"
    assert cvat_webhook({"event": "create:task", "task": {"id": 15, "project_id": 7}}) == 15
    assert cvat_webhook({"event": "create:task", "task": {"id": 15, "project_id": 7}}, project=8) is None
    finished = {"event": "completed:request[create:task]",
                "request": {"status": "finished", "operation": {"type": "create:task", "task_id": 3, "project_id": 2}}}
    assert cvat_webhook(finished) == 3 and cvat_webhook(finished, project=2) == 3
    assert cvat_webhook(finished | {"request": finished["request"] | {"status": "failed"}}) is None
    assert cvat_webhook({"event": "update:task", "task": {"id": 15}}) is None
    with pytest.raises(ConfigError, match="names no task id"):
        cvat_webhook({"event": "create:task", "task": {"id": "15"}})


def test_the_queue_survives_a_reopen_and_requeues_failures(tmp_path):
    path = queue_path(tmp_path, "http://cvat.example:8080/")
    assert path.name == "cvat-cvat.example-8080.sqlite"
    queue = TaskQueue(path)
    assert queue.add(4, "webhook") and queue.add(2, "poll") and not queue.add(4, "poll")
    queue.finish(2, "failed", "labels do not match")
    queue.close()
    queue = TaskQueue(path)
    assert queue.queued() == [4] and queue.states()[2] == ("failed", "labels do not match")
    stats = queue.stats()
    assert (stats["backlog"], stats["failed"], stats["done"]) == (1, 1, 0) and stats["oldest_waiting_s"] >= 0
    assert queue.retry_failed() == 1 and sorted(queue.queued()) == [2, 4]
    assert queue.stats()["backlog"] == 2
    queue.close()
