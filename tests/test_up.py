"""`prelabel up`: Label Studio + backend + a pre-annotated project for a folder, reused on the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import encode, free_port, make_image

pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
from label_studio_sdk.client import LabelStudio  # noqa: E402

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]  # `prelabel up` starts Label Studio in its subprocess


def run_up(images, data_dir, port, backend_port):
    prompts = data_dir.parent / "prompts.yaml"
    prompts.write_text("labels:\n  Product: [product, box]\n  Shelf Label: [label, sign]\n")
    command = [sys.executable, "-m", "ml_backend.cli", "up", str(images), "--tiny-models", "--port", str(port),
               "--prompts", str(prompts),
               "--backend-port", str(backend_port), "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 300
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready: "):
            return process, line, lines
        assert time.time() < deadline, "".join(lines)
    pytest.fail("prelabel up exited before it was ready:\n" + "".join(lines))


def stop(process, lines):
    process.send_signal(signal.SIGINT)
    try:
        rest, _ = process.communicate(timeout=150)  # stops Label Studio too; slow on a loaded 2-core machine
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # up's faulthandler: where is it stuck?
        time.sleep(2)
        os.killpg(process.pid, signal.SIGKILL)  # never leave Label Studio running behind a failed test
        pytest.fail("prelabel up did not stop on Ctrl-C:\n" + "".join(lines) + process.stdout.read())
    assert process.returncode == 0, "".join(lines) + rest


def test_up_pre_annotates_a_folder_and_a_rerun_adds_nothing_twice(tmp_path):
    images = tmp_path / "shelf"
    images.mkdir()
    for i, (w, h) in enumerate([(160, 90), (120, 200), (64, 48)]):
        (images / f"photo{i}.png").write_bytes(encode(make_image(w, h, i)))
    data_dir = tmp_path / ".prelabel" / "label-studio"
    data_dir.parent.mkdir(parents=True)
    port, backend_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    token = None
    for run in range(2):
        process, ready, lines = run_up(images, data_dir, port, backend_port)
        try:
            token = json.loads((data_dir / "prelabel-credentials.json").read_text())["token"]
            client = LabelStudio(base_url=url, api_key=token)
            (project,) = client.projects.list()
            assert ready.startswith(f"ready: {url}/projects/{project.id}/data")
            assert ("3 pre-annotated" if run == 0 else "0 pre-annotated, 3 already had") in ready
            tasks = list(client.tasks.list(project=project.id))
            assert len(tasks) == 3 and all(t.data["image"].startswith("/data/local-files/?d=shelf/") for t in tasks)
            for task in tasks:
                (prediction,) = client.predictions.list(task=task.id)
                assert prediction.result
            (ml,) = client.ml.list(project=project.id)
            assert ml.is_interactive and ml.url.rstrip("/") == f"http://127.0.0.1:{backend_port}"
            assert not list(tmp_path.joinpath(".prelabel", "label-studio", "media").rglob("photo*")), "images are not copied"
        finally:
            stop(process, lines)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{backend_port}/health", timeout=2)
