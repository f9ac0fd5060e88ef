"""End to end against a real Label Studio (pip `label-studio`, SQLite, on 127.0.0.1), driven through label-studio-sdk,
with the backend on tiny models over real HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from .conftest import LEGACY_TOKEN, PASSWORD, USER

pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
from label_studio_sdk.client import LabelStudio  # noqa: E402
from label_studio_sdk.label_interface import LabelInterface  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></KeyPointLabels>
</View>"""


@pytest.fixture
def ls(label_studio):
    return LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)


def upload(ls: LabelStudio, label_studio: str, project_id: int, paths: list[Path]) -> list[int]:
    files = [(f"file{i}", (p.name, p.read_bytes())) for i, p in enumerate(paths)]  # one field each: Label Studio keeps one file per field
    response = httpx.post(
        f"{label_studio}/api/projects/{project_id}/import", files=files,
        headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=60,
    )
    response.raise_for_status()
    ids = sorted(task.id for task in ls.tasks.list(project=project_id))
    assert len(ids) == len(paths), f"{len(paths)} files uploaded, {len(ids)} tasks made"
    return ids


def test_retrieve_predictions_stores_one_valid_prediction_per_task(label_studio, ls, start_backend, image_dir):
    # no LABEL_STUDIO_URL/API key: the backend learns both from Label Studio's /setup
    backend = start_backend()
    project = ls.projects.create(title="e2e predictions", label_config=CONFIG)
    task_ids = upload(ls, label_studio, project.id, [image_dir / f"img{i}.png" for i in range(3)])
    ls.ml.create(url=backend.url, project=project.id, is_interactive=True, title="prelabel")
    response = httpx.post(
        f"{label_studio}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project.id},
        json={"selectedItems": {"all": True, "excluded": []}}, headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=120,
    )
    assert response.status_code == 200, response.text
    version = httpx.post(f"{backend.url}/setup", json={"project": f"{project.id}.1", "schema": CONFIG}).json()["model_version"]
    interface = LabelInterface(CONFIG)
    for task_id in task_ids:
        predictions = list(ls.predictions.list(task=task_id))
        assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions"
        prediction = predictions[0]
        assert prediction.model_version == version
        assert prediction.result and all(r["from_name"] in {"label", "brush"} for r in prediction.result)
        assert interface.validate_prediction({"result": prediction.result}, return_errors=True) == []


def post(label_studio: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{label_studio}{path}", headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=120, **kwargs)


@pytest.fixture
def connected(label_studio, ls, start_backend, image_dir):
    """A project with uploaded and local-files tasks, connected to a fresh interactive backend."""
    backend = start_backend()
    project = ls.projects.create(title="e2e", label_config=CONFIG)
    uploaded = upload(ls, label_studio, project.id, [image_dir / "img1.png"])
    storage = ls.import_storage.local.create(project=project.id, path=str(image_dir / "sub"), use_blob_urls=True, regex_filter=r".*\.png")
    ls.import_storage.local.sync(id=storage.id)
    local = sorted(set(t.id for t in ls.tasks.list(project=project.id)) - set(uploaded))
    ml = ls.ml.create(url=backend.url, project=project.id, is_interactive=True, title="prelabel")
    return backend, project, ml, uploaded, local


def test_local_files_storage_tasks_are_predicted_too(label_studio, ls, connected):
    backend, project, ml, uploaded, local = connected
    assert len(local) == 1 and ls.tasks.get(id=local[0]).data["image"].startswith("/data/local-files/?d=")
    post(label_studio, "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project.id},
         json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    for task_id in uploaded + local:
        (prediction,) = ls.predictions.list(task=task_id)
        assert prediction.result
    regions = list(ls.predictions.list(task=local[0]))[0].result
    assert {(r["original_width"], r["original_height"]) for r in regions} == {(64, 48)}


def test_interactive_annotating_with_a_keypoint_returns_a_mask_through_label_studio(label_studio, connected):
    backend, project, ml, uploaded, local = connected
    region = {
        "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 120, "original_height": 200,
        "is_positive": True, "value": {"x": 40, "y": 50, "keypointlabels": ["Person"]},
    }
    response = post(label_studio, f"/api/ml/{ml.id}/interactive-annotating", json={"task": uploaded[0], "context": {"result": [region]}})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    (mask,) = data["result"]
    assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == ["Person"]
    assert LabelInterface(CONFIG).validate_prediction(data, return_errors=True) == []


def test_annotations_and_training_reach_the_backend_webhook(label_studio, ls, connected):
    backend, project, ml, uploaded, local = connected
    result = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 120, "original_height": 200,
               "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["Car"]}}]
    annotation = ls.annotations.create(id=uploaded[0], result=result)
    ls.ml.train(id=ml.id)
    store = backend.app.state.backend.store
    deadline = time.time() + 30
    while time.time() < deadline and {"ANNOTATION_CREATED", "START_TRAINING"} - {e["action"] for e in store.events(project.id)}:
        time.sleep(0.5)
    events = {e["action"]: e for e in store.events(project.id)}
    assert events["ANNOTATION_CREATED"]["annotation_id"] == annotation.id
    assert events["ANNOTATION_CREATED"]["task_id"] == uploaded[0]
    assert "START_TRAINING" in events


def test_images_load_with_a_personal_access_token_and_a_wrong_token_is_named(label_studio, ls, start_backend, image_dir):
    project = ls.projects.create(title="tokens", label_config=CONFIG)
    (task_id,) = upload(ls, label_studio, project.id, [image_dir / "img0.png"])
    image = ls.tasks.get(id=task_id).data["image"]
    response = post(label_studio, "/api/token/")
    if response.status_code == 409:  # one personal access token per user
        pytest.skip("personal access token already created in this Label Studio")
    response.raise_for_status()
    pat = response.json()["token"]
    body = {"tasks": [{"id": task_id, "data": {"image": image}}], "label_config": CONFIG}
    for key in (pat, LEGACY_TOKEN):
        backend = start_backend(label_studio_url=label_studio, label_studio_api_key=key)
        (entry,) = httpx.post(f"{backend.url}/predict", json=body, timeout=60).json()["results"]
        assert entry.get("result"), entry
    backend = start_backend(label_studio_url=label_studio, label_studio_api_key="0" * 40)
    (entry,) = httpx.post(f"{backend.url}/predict", json=body, timeout=60).json()["results"]
    message = entry["error"]["message"]
    assert entry["error"]["kind"] == "image_auth" and image in message and "401" in message and "LABEL_STUDIO_API_KEY" in message


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def logged_in_page(browser, label_studio: str):
    """A browser page logged in to Label Studio as the test user."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{label_studio}/user/login/")
    page.fill("#email", USER)
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
    return page


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by `make test`")
def test_labeling_page_shows_our_prediction_regions(label_studio, ls, connected):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    backend, project, ml, uploaded, local = connected
    post(label_studio, "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project.id},
         json={"selectedItems": {"all": False, "included": uploaded}}).raise_for_status()
    (prediction,) = ls.predictions.list(task=uploaded[0])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = logged_in_page(browser, label_studio)
            page.goto(f"{label_studio}/projects/{project.id}/data?task={uploaded[0]}")
            page.wait_for_selector(".lsf-outliner-item", timeout=90_000)
            page.wait_for_selector(".konvajs-content canvas", timeout=30_000)
            shown = page.evaluate(
                "() => window.Htx.annotationStore.selected.regions.map(r => [r.origin, r.type])"
            )
            page.screenshot(path=str(ARTIFACTS / "label-studio-prediction.png"))
        finally:
            browser.close()
    assert len(shown) == len(prediction.result)
    assert {origin for origin, _ in shown} == {"prediction"}
    assert {kind for _, kind in shown} == {"rectangleregion", "brushregion"}
