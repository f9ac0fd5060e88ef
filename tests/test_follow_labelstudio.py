"""Following a real Label Studio (issue 19): tasks imported while the server runs get one prediction each with no
action (Label Studio's TASKS_CREATED webhook -> the durable queue -> the batch path), a replayed event predicts
nothing twice, the webhook the server adds for a project is removed idempotently, and `annotate --project --follow`
polls where webhooks cannot reach. The queue's own guarantees (durability, backoff) are in test_follow_queue.py."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ml_backend.engine import Engine
from ml_backend.labelstudio.backend import LabelStudioBackend
from ml_backend.labelstudio.follow import poll_project

from .conftest import LEGACY_TOKEN, make_settings

pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
from label_studio_sdk.client import LabelStudio  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
</View>"""


@pytest.fixture
def ls(label_studio):
    return LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)


def import_tasks(label_studio: str, project: int, image_dir, names: list[str]) -> None:
    tasks = [{"image": f"/data/local-files/?d={name}"} for name in names]
    httpx.post(f"{label_studio}/api/projects/{project}/import", json=tasks,
               headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=60).raise_for_status()


def wait_for_predictions(ls, project: int, count: int, timeout: float = 90) -> dict[int, list]:
    deadline = time.time() + timeout
    while True:
        tasks = list(ls.tasks.list(project=project, fields="all"))
        predictions = {t.id: list(ls.predictions.list(task=t.id)) for t in tasks}
        if sum(1 for p in predictions.values() if p) >= count or time.time() > deadline:
            return predictions
        time.sleep(1)


def test_tasks_imported_while_the_server_runs_are_predicted_once_without_any_action(label_studio, ls, start_backend,
                                                                                      image_dir, http):
    server = start_backend(label_studio_url=label_studio, label_studio_api_key=LEGACY_TOKEN,
                           local_files_document_root=image_dir)
    project = ls.projects.create(title="follow webhooks", label_config=CONFIG)
    ls.ml.create(url=server.url, project=project.id, is_interactive=False, title="prelabel")  # LS adds its webhook
    import_tasks(label_studio, project.id, image_dir, ["img0.png", "img1.png", "img2.png"])
    predictions = wait_for_predictions(ls, project.id, 3)
    assert len(predictions) == 3 and all(len(p) == 1 for p in predictions.values()), predictions
    version = http.post(f"{server.url}/setup", json={"project": f"{project.id}.1", "schema": CONFIG}).json()["model_version"]
    assert {p[0].model_version for p in predictions.values()} == {version}
    follow = http.get(f"{server.url}/metrics").json()["follow"]
    assert follow["backlog"] == 0 and follow["done"] >= 3 and follow["oldest_waiting_s"] == 0.0
    # the same event again (Label Studio retries, a replay): nothing is predicted twice
    event = {"action": "TASKS_CREATED", "project": {"id": project.id}, "tasks": [{"id": t} for t in predictions]}
    answer = http.post(f"{server.url}/webhook", json=event)
    assert answer.status_code == 201 and answer.json()["new"] == 0
    time.sleep(2)
    assert all(len(list(ls.predictions.list(task=t))) == 1 for t in predictions)
    bad = http.post(f"{server.url}/webhook", json={"action": "TASKS_CREATED", "project": {"id": project.id},
                                                   "tasks": [{"id": "x"}]})
    assert bad.status_code == 400 and "without an integer id" in bad.json()["error"]["message"]


def test_the_webhook_added_for_a_project_is_removed_on_shutdown_idempotently(label_studio, ls, base_pipeline, tmp_path):
    settings = make_settings(base_pipeline, tmp_path, label_studio_url=label_studio, label_studio_api_key=LEGACY_TOKEN,
                             public_url="http://127.0.0.1:9")
    from ml_backend.follow import WorkQueue
    from ml_backend.labelstudio.follow import SOURCE, ProjectFollower

    backend = LabelStudioBackend.for_batch(Engine(base_pipeline.detector, None, base_pipeline.prompts, settings))
    follower = ProjectFollower(backend, WorkQueue(tmp_path / "q.sqlite3"), None, None)
    project = ls.projects.create(title="follow add webhook", label_config=CONFIG)
    assert "added a webhook" in follower.ensure_webhook(project.id)
    assert "sends new tasks" in follower.ensure_webhook(project.id)  # once is enough
    (hook,) = [h for h in ls.webhooks.list(project=project.id) if h.url == "http://127.0.0.1:9/webhook"]
    assert hook.actions == ["TASKS_CREATED"] and not hook.send_for_all_actions
    assert follower.webhooks == {project.id: hook.id}
    follower.remove_webhooks()
    assert not [h for h in ls.webhooks.list(project=project.id) if h.url == "http://127.0.0.1:9/webhook"]
    follower.queue.note_webhook(SOURCE, label_studio, project.id, hook.id, hook.url)  # gone already: removing again is fine
    follower.remove_webhooks()
    assert follower.webhooks == {}

    # a run killed -9 after adding one: the next run at the same MODEL_DIR removes it at its shutdown
    assert "added a webhook" in follower.ensure_webhook(project.id)
    follower.queue.close()
    restarted = ProjectFollower(backend, WorkQueue(tmp_path / "q.sqlite3"), None, None)
    (left,) = [h.id for h in ls.webhooks.list(project=project.id) if h.url == "http://127.0.0.1:9/webhook"]
    assert restarted.webhooks == {project.id: left}
    # ... but not one somebody pointed elsewhere meanwhile: it is theirs now
    other = ls.webhooks.create(project=project.id, url="http://127.0.0.1:9/webhook", actions=["TASKS_CREATED"])
    restarted.queue.note_webhook(SOURCE, label_studio, project.id, other.id, "http://127.0.0.1:9/webhook")
    ls.webhooks.update(id=other.id, url="http://127.0.0.1:10/theirs")
    restarted.remove_webhooks()
    assert [h.id for h in ls.webhooks.list(project=project.id)
            if h.url.startswith("http://127.0.0.1:")] == [other.id] and restarted.webhooks == {}
    restarted.queue.close()


def test_annotate_follow_polls_for_new_tasks(label_studio, ls, base_pipeline, image_dir, tmp_path):
    settings = make_settings(base_pipeline, tmp_path, label_studio_url=label_studio, label_studio_api_key=LEGACY_TOKEN,
                             local_files_document_root=image_dir, segmenter="")
    backend = LabelStudioBackend.for_batch(Engine(base_pipeline.detector, None, base_pipeline.prompts, settings))
    project = ls.projects.create(title="follow polling", label_config=CONFIG)
    import_tasks(label_studio, project.id, image_dir, ["img0.png"])
    stop, rounds = threading.Event(), []
    thread = threading.Thread(target=lambda: rounds.extend(poll_project(ls, project.id, backend, 2, 0.5, stop=stop)))
    thread.start()
    try:
        assert len(wait_for_predictions(ls, project.id, 1, timeout=60)) == 1
        import_tasks(label_studio, project.id, image_dir, ["img1.png", "img2.png"])
        predictions = wait_for_predictions(ls, project.id, 3, timeout=60)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert len(predictions) == 3 and all(len(p) == 1 for p in predictions.values())
    assert [r.done for r in rounds] == [1, 2]  # the whole project, then only the new tasks
