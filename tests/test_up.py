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


def run_up(images, model_dir, port, backend_port):
    """`prelabel up` with MODEL_DIR set (Label Studio's data, the tiny models and the stack file go below it)."""
    prompts = model_dir.parent / "prompts.yaml"
    prompts.write_text("labels:\n  Product: [product, box]\n  Shelf Label: [label, sign]\n")
    command = [sys.executable, "-m", "ml_backend.cli", "up", str(images), "--tiny-models", "--port", str(port),
               "--prompts", str(prompts), "--backend-port", str(backend_port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    process = subprocess.Popen(command, env=env | {"HF_HUB_OFFLINE": "1", "MODEL_DIR": str(model_dir)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
    model_dir = tmp_path / "models"
    data_dir = model_dir / "label-studio"
    port, backend_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    for run in range(2):
        process, ready, lines = run_up(images, model_dir, port, backend_port)
        try:
            output = "".join(lines)
            assert ("first start" in output) == (run == 0), output
            assert (model_dir / "tiny-models" / "detector").is_dir() and (data_dir / "label_studio.sqlite3").exists()
            token = json.loads((data_dir / "prelabel-credentials.json").read_text())["token"]
            assert f"API key {token}" in output and str(model_dir / "label-studio.env") in output
            client = LabelStudio(base_url=url, api_key=token)
            (project,) = client.projects.list()
            assert ready.startswith(f"ready: {url}/projects/{project.id}/data")
            assert ("3 pre-annotated" if run == 0 else "0 pre-annotated, 3 already had") in ready
            assert project.label_config.count("<Header") == 3  # each row of labels says which tool it is
            tasks = list(client.tasks.list(project=project.id))
            assert len(tasks) == 3 and all(t.data["image"].startswith("/data/local-files/?d=shelf/") for t in tasks)
            for task in tasks:
                (prediction,) = client.predictions.list(task=task.id)
                assert prediction.result
            (ml,) = client.ml.list(project=project.id)
            assert ml.is_interactive and ml.url.rstrip("/") == f"http://127.0.0.1:{backend_port}"
            assert not list(data_dir.joinpath("media").rglob("photo*")), "images are not copied"
            check_default_tab(client, project.id)
            check_next_commands_find_the_stack(model_dir, url, project.id)
        finally:
            stop(process, lines)
        assert not (model_dir / "label-studio.env").exists()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{backend_port}/health", timeout=2)


def check_default_tab(client, project_id):
    """The project's first tab shows "Prediction score" and sorts by it, least certain first."""
    (tab,) = [v.dict() if hasattr(v, "dict") else v for v in client.views.list(project=project_id)]
    assert tab["data"]["ordering"] == ["tasks:predictions_score"] or tab.get("ordering") == ["tasks:predictions_score"]
    hidden = tab["data"]["hiddenColumns"]
    assert "tasks:predictions_score" not in hidden["explore"] and "tasks:annotations_ids" in hidden["explore"]
    ordered = [t.id for t in client.tasks.list(project=project_id, view=tab["id"], fields="all")]
    scores = {t.id: t.predictions_score for t in client.tasks.list(project=project_id, fields="all")}
    assert [scores[i] for i in ordered] == sorted(scores[i] for i in ordered)


def check_next_commands_find_the_stack(model_dir, url, project_id):
    """`rank` with no --url/--api-key and no LABEL_STUDIO_* finds the running `up` from MODEL_DIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    done = subprocess.run([sys.executable, "-m", "ml_backend.cli", "rank", "--project", str(project_id)],
                          env=env | {"MODEL_DIR": str(model_dir)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{url}/projects/{project_id}/data" in done.stdout and url in done.stderr
    tiny = model_dir / "tiny-models"
    done = subprocess.run([sys.executable, "-m", "ml_backend.cli", "annotate", "--project", str(project_id),
                           "--detector", str(tiny / "detector"), "--segmenter", str(tiny / "segmenter"),
                           "--prompts", str(model_dir.parent / "prompts.yaml")],
                          env=env | {"MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 of 0 tasks pre-annotated" in done.stdout and "3 skipped (already predicted)" in done.stdout, done.stdout
