"""`prelabel annotate FOLDER --out DIR --follow`: images added while it runs (written in place, renamed in, copied
slowly, never completed) are pre-annotated once each into the same outputs; a restart resumes from the journal.
Real engine on tiny models, real files; the follower runs in a thread that every test stops and joins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ml_backend.engine import Engine
from ml_backend.follow_folder import Arrivals, FollowStatus, follow_folder
from ml_backend.labelstudio.annotate import _read_journal
from ml_backend.labelstudio.backend import LabelStudioBackend
from ml_backend.ontology import PromptsFile
from ml_backend.settings import Settings

from .conftest import encode, make_image

PROMPTS = Path(__file__).parents[1] / "prompts/example.yaml"
POLL = 0.1


@pytest.fixture
def backend(base_pipeline, tmp_path) -> LabelStudioBackend:
    settings = Settings(detector=base_pipeline.detector.model_id, segmenter="", model_dir=tmp_path / "model-dir",
                        local_files_document_root=tmp_path)
    return LabelStudioBackend.for_batch(Engine(base_pipeline.detector, None, PromptsFile.load(PROMPTS), settings))


def png(seed: int, width: int = 96, height: int = 64) -> bytes:
    return encode(make_image(width, height, seed))


class Follower:
    """`follow_folder` in a thread; `stop()` sets its stop event, joins it and returns its report."""

    def __init__(self, folder: Path, out: Path, backend, **options):
        self.statuses: list[FollowStatus] = []
        self.failures: list[str] = []
        self.event = threading.Event()
        self.report = None

        def run():
            self.report = follow_folder(folder, out, backend, batch_size=2, poll=POLL, stop=self.event,
                                        status=self.statuses.append, failure=self.failures.append, **options)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_for(self, condition, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.thread.is_alive(), "the follower stopped"
            assert time.monotonic() < deadline, f"timed out; last status {self.statuses[-1:]}, failures {self.failures}"
            time.sleep(0.02)

    def stop(self):
        self.event.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.report


def done_files(out: Path) -> list[str]:
    return [json.loads(line)["file"] for line in (out / "predictions.jsonl").read_text().splitlines()]


def outputs(out: Path) -> tuple[list[str], list[str]]:
    tasks = json.loads((out / "tasks.json").read_text())
    coco = json.loads((out / "coco.json").read_text())
    return [t["data"]["image"].rsplit("=", 1)[1] for t in tasks], [i["file_name"] for i in coco["images"]]


def test_images_added_while_following_are_annotated_once_each_and_a_half_written_one_when_complete(backend, tmp_path):
    folder, out = tmp_path / "cams", tmp_path / "out"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    (folder / "b.png").write_bytes(png(2))
    follower = Follower(folder, out, backend)
    follower.wait_for(lambda: follower.statuses and follower.statuses[-1].done == 2)
    assert sorted(done_files(out)) == ["cams/a.png", "cams/b.png"]

    def writer():  # files arriving while it runs: written in place, renamed in, and one copied in two halves
        (folder / "sub").mkdir()
        (folder / "sub" / "c.png").write_bytes(png(3))
        (folder / ".d.png.part").write_bytes(png(4))
        os.replace(folder / ".d.png.part", folder / "d.png")
        data = png(5, 200, 150)
        with (folder / "slow.png").open("wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(6 * POLL)  # several polls see it half-written and unchanged: waited for, not failed
            f.write(data[len(data) // 2:])

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(10)
    follower.wait_for(lambda: len(done_files(out)) == 5)
    report = follower.stop()
    files = done_files(out)
    assert sorted(files) == ["cams/a.png", "cams/b.png", "cams/d.png", "cams/slow.png", "cams/sub/c.png"]
    assert report.done == 5 and report.failed == [] and follower.failures == [] and report.total == 5
    tasks, images = outputs(out)
    assert sorted(tasks) == sorted(files) and sorted(images) == sorted(files)  # rewritten after each batch
    assert not list(out.glob(".*.tmp"))
    slow = next(json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
                if json.loads(line)["file"] == "cams/slow.png")
    assert (slow["width"], slow["height"]) == (200, 150)  # the whole image, not the half seen first
    assert any(s.queued > 0 for s in follower.statuses) and follower.statuses[-1].rate > 0
    assert "5 done" in follower.statuses[-1].line() and "img/s" in follower.statuses[-1].line()


def test_a_restart_resumes_from_the_journal_and_a_file_that_never_completes_is_reported_once(backend, tmp_path):
    folder, out = tmp_path / "drop", tmp_path / "out"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png(i))
    first = Follower(folder, out, backend)
    first.wait_for(lambda: first.statuses and first.statuses[-1].done == 3)
    first.stop()
    version = first.report.model_version

    (folder / "3.png").write_bytes(png(3))  # added while nothing runs
    (folder / "stuck.png").write_bytes(png(9)[:60])  # a copy that died half-way
    second = Follower(folder, out, backend, incomplete_tries=3, incomplete_seconds=30)
    second.wait_for(lambda: second.failures and second.statuses[-1].done == 1)
    time.sleep(5 * POLL)  # given up: not reported again while it stays as it is
    report = second.stop()
    assert report.done == 1 and report.skipped == {"already predicted": 3}
    assert sorted(done_files(out)) == ["drop/0.png", "drop/1.png", "drop/2.png", "drop/3.png"]  # nothing twice
    assert len(_read_journal(out / "predictions.jsonl", version)) == 4
    [failure] = second.failures
    assert failure.startswith("stuck.png does not decode as an image after 3 polls") and "changes" in failure
    assert [f["task"] for f in report.failed] == ["stuck.png"]
    assert sorted(outputs(out)[0]) == sorted(done_files(out))

    third = Follower(folder, out, backend)  # nothing new: nothing done, outputs intact
    (folder / "stuck.png").write_bytes(png(9))  # the copy completed later: taken
    third.wait_for(lambda: len(done_files(out)) == 5)
    report = third.stop()
    assert report.done == 1 and report.failed == [] and report.skipped == {"already predicted": 4}


def test_arrivals_take_a_complete_file_at_once_and_wait_for_a_growing_one(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    now = [0.0]
    arrivals = Arrivals(folder, tmp_path, set(), tries=2, seconds=100, clock=lambda: now[0])
    data = png(7)
    (folder / "done.png").write_bytes(data)
    (folder / "growing.png").write_bytes(data[:40])
    (folder / "notes.txt").write_text("not an image")
    assert arrivals.poll() == ([folder / "done.png"], []) and arrivals.pending == 1
    for size in (80, 120, 160):  # grows on every poll: never counted as a try
        (folder / "growing.png").write_bytes(data[:size])
        now[0] += 50
        assert arrivals.poll() == ([], [])
    now[0] += 1
    assert arrivals.poll() == ([], [])  # unchanged, first try
    now[0] += 1
    [(path, why)] = arrivals.poll()[1]  # unchanged, second try: given up
    assert path == folder / "growing.png" and "after 2 polls" in why and arrivals.pending == 0
    (folder / "growing.png").write_bytes(data)
    assert arrivals.poll() == ([], [])  # changed: seen anew
    assert arrivals.poll() == ([folder / "growing.png"], [])
    assert arrivals.poll() == ([], [])  # taken once


@pytest.mark.slow
def test_the_command_follows_until_ctrl_c_and_reports(tiny_models, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    env = os.environ | {"MODEL_DIR": str(tmp_path / "model-dir"), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend.cli", "annotate", str(folder), "--out", str(out), "--follow", "--poll",
         "0.2", "--detector", str(tiny_models["detector"]), "--segmenter", "none", "--prompts", str(PROMPTS)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "predictions.jsonl").exists() or len(done_files(out)) < 1:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        (folder / "b.png").write_bytes(png(2))
        while len(done_files(out)) < 2:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "2 of 2 tasks pre-annotated" in stdout and "following: 2 done" in stderr
    assert json.loads((out / "report.json").read_text())["done"] == 2
