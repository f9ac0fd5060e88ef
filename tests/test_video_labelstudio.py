"""Video in a real Label Studio (issue 18): video tasks (uploaded and local files) get one prediction each whose
`videorectangle` regions label-studio-sdk validates, on Label Studio's frame numbering; `prelabel annotate --project`
does a video project task by task (a bad video fails its task only, a rerun does nothing twice); the labeling page
shows the regions (browser). Models: the tiny random detector and the tiny SAM 2 video tracker
(`prelabel dev tiny-models OUT` writes it as OUT/sam2-video), as `--tracker OUT/sam2-video` serves them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ml_backend.engine import Engine
from ml_backend.labelstudio.annotate import ERROR_KEY, run_annotate
from ml_backend.labelstudio.server import create_app
from ml_backend.models.registry import write_tiny
from ml_backend.settings import Settings
from ml_backend.video.synthetic import Mover, write_video

from .conftest import LEGACY_TOKEN, RunningServer
from .test_label_studio_e2e import ARTIFACTS, CHROMIUM, logged_in_page
from .test_label_studio_e2e import CHROMIUM_ARGS as E2E_CHROMIUM_ARGS

pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
from label_studio_sdk.client import LabelStudio  # noqa: E402
from label_studio_sdk.label_interface import LabelInterface  # noqa: E402

CONFIG = """<View>
  <Video name="video" value="$video" framerate="10"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="labels" toName="video"><Label value="Car"/><Label value="Person"/></Labels>
</View>"""
PROMPTS = "box_threshold: 0.0\nlabels:\n  Car: car\n  Person: person\n"
FRAMES, FPS = 12, 10
MOVERS = [Mover("car", (30, 40), (280, 190)), Mover("person", (280, 30), (40, 200), first=3, last=9, shape="circle",
                                                    colour=(20, 200, 40))]


@pytest.fixture(scope="module")
def videos(image_dir):
    """Videos below the Label Studio fixture's local-files root (image_dir/videos): two good, one truncated."""
    root = image_dir / "videos"
    good = [root / "street.webm", root / "yard.webm"]
    for n, path in enumerate(good):
        write_video(path, MOVERS, 320, 240, FRAMES, FPS, codec="libvpx-vp9", seed=n)
    data = good[0].read_bytes()
    (root / "cut.webm").write_bytes(data[: len(data) // 3])
    return good + [root / "cut.webm"]


@pytest.fixture(scope="module")
def video_settings(tiny_models, tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("video-ls")
    tracker = write_tiny(root / "tiny", ["sam2-video"])["sam2-video"]
    (root / "prompts.yaml").write_text(PROMPTS)
    return Settings(detector=str(tiny_models["detector"]), segmenter="", tracker=tracker, prompts=root / "prompts.yaml",
                    model_dir=root / "model-dir", max_detections=2, video_detect_every=4, device="cpu")


@pytest.fixture(scope="module")
def video_engine(video_settings) -> Engine:
    return Engine.from_settings(video_settings)


@pytest.fixture
def ls(label_studio):
    return LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)


def post(label_studio: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{label_studio}{path}", headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=300, **kwargs)


def project_with_videos(ls, label_studio: str, image_dir: Path, videos: list[Path], title: str):
    """A project with the first video uploaded and every video also as a local-files task."""
    project = ls.projects.create(title=title, label_config=CONFIG)
    post(label_studio, f"/api/projects/{project.id}/import",
         files=[("file0", (videos[0].name, videos[0].read_bytes()))]).raise_for_status()
    uploaded = [t.id for t in ls.tasks.list(project=project.id)]
    ls.tasks.create(project=project.id, data={"video": f"/data/local-files/?d={videos[0].relative_to(image_dir)}"})
    for path in videos[1:]:
        ls.tasks.create(project=project.id, data={"video": f"/data/local-files/?d={path.relative_to(image_dir)}"})
    tasks = sorted(t.id for t in ls.tasks.list(project=project.id))
    return project, uploaded, tasks


def check_prediction(prediction, version: str) -> None:
    assert prediction.model_version == version
    interface = LabelInterface(CONFIG)
    assert interface.validate_prediction({"result": prediction.result}, return_errors=True) == []
    assert prediction.result, "the tiny detector at threshold 0 finds something on the first frame"
    for region in prediction.result:
        value = region["value"]
        assert region["type"] == "videorectangle" and (region["from_name"], region["to_name"]) == ("box", "video")
        assert value["labels"][0] in {"Car", "Person"} and value["framesCount"] == FRAMES
        frames = [s["frame"] for s in value["sequence"]]
        assert frames == sorted(set(frames)) and 1 <= frames[0] and frames[-1] <= FRAMES
        for s in value["sequence"]:
            assert s["time"] == pytest.approx((s["frame"] - 1) / FPS)
            assert 0 <= s["x"] and s["x"] + s["width"] <= 100 + 1e-6 and 0 <= s["y"] and s["y"] + s["height"] <= 100 + 1e-6


@pytest.fixture
def server(video_engine, image_dir):
    settings = video_engine.settings.model_copy(update={"local_files_document_root": image_dir})
    running = RunningServer(create_app(Engine(video_engine.detector, None, video_engine.prompts, settings,
                                              tracker=video_engine.tracker())))
    yield running
    running.stop()


def test_retrieve_predictions_on_video_tasks(label_studio, ls, server, image_dir, videos):
    project, uploaded, tasks = project_with_videos(ls, label_studio, image_dir, videos, "video predictions")
    ls.ml.create(url=server.url, project=project.id, is_interactive=False, title="prelabel")
    post(label_studio, "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project.id},
         json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    version = httpx.post(f"{server.url}/setup", json={"project": f"{project.id}.1", "schema": CONFIG}).json()["model_version"]
    assert "sam2-video" in version
    good = [t for t in tasks if not ls.tasks.get(id=t).data["video"].endswith("cut.webm")]
    assert uploaded and set(uploaded) <= set(good) and len(good) == 3
    for task in good:
        (prediction,) = ls.predictions.list(task=task)
        check_prediction(prediction, version)
    (bad,) = set(tasks) - set(good)
    assert not list(ls.predictions.list(task=bad))  # Label Studio stores no prediction for a task that failed
    answer = httpx.post(f"{server.url}/predict", json={"tasks": [ls.tasks.get(id=bad).model_dump(include={"id", "data"})],
                                                        "label_config": CONFIG}, timeout=120).json()["results"]
    assert answer[0]["error"]["kind"] == "video_decode" and "cut.webm" in answer[0]["error"]["message"]
    assert answer[0]["error"]["message"].startswith(f"task {bad}: ")


@pytest.mark.slow
def test_annotate_a_video_project_task_by_task_and_resume(label_studio, ls, video_settings, image_dir, videos):
    project, _, tasks = project_with_videos(ls, label_studio, image_dir, videos, "video annotate")
    overrides = dict(video_settings.model_dump(include={"detector", "tracker", "prompts", "model_dir", "max_detections",
                                                        "video_detect_every", "device"}),
                     label_studio_url=label_studio, label_studio_api_key=LEGACY_TOKEN, local_files_document_root=image_dir)
    report, _ = run_annotate(None, project.id, None, overrides)
    assert (report.total, report.done, len(report.failed)) == (4, 3, 1)
    assert "cut.webm" in report.failed[0]["error"]["message"]
    for task in tasks:
        data = ls.tasks.get(id=task).data
        predictions = list(ls.predictions.list(task=task))
        if data["video"].endswith("cut.webm"):
            assert not predictions and ("truncated" in data[ERROR_KEY] or "corrupt" in data[ERROR_KEY])
        else:
            (prediction,) = predictions
            check_prediction(prediction, report.model_version)
    again, _ = run_annotate(None, project.id, None, overrides)
    assert (again.total, again.done, again.skipped["already predicted"]) == (1, 0, 3)  # only the bad one is retried


CHROMIUM_ARGS = [*E2E_CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required"]


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by `make test`")
def test_video_labeling_page_shows_the_tracks(label_studio, ls, server, image_dir, videos):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    project, uploaded, _ = project_with_videos(ls, label_studio, image_dir, videos[:1], "video page")
    ls.ml.create(url=server.url, project=project.id, is_interactive=False, title="prelabel")
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
            page.wait_for_function("() => { const v = document.querySelector('video'); return v && v.readyState >= 2 }",
                                   timeout=60_000)
            shown = page.evaluate("() => window.Htx.annotationStore.selected.regions.map(r => [r.origin, r.type, "
                                  "r.sequence.length])")
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "label-studio-video.png"))
        finally:
            browser.close()
    assert len(shown) == len(prediction.result)
    assert {origin for origin, _, _ in shown} == {"prediction"}
    assert {kind for _, kind, _ in shown} == {"videorectangleregion"}
    assert sorted(n for _, _, n in shown) == sorted(len(r["value"]["sequence"]) for r in prediction.result)
