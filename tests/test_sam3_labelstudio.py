"""SAM 3 in Label Studio (issue 17): served as `--detector OUT/sam3 --segmenter none` it fills rectangles, brushes and
polygons in one pass; a smart rectangle finds every object like it ("find all like this"), an `Exclude` box leaves
look-alikes out, and clicks go to SAM 3's tracker. Fast tests talk to the backend over real HTTP; the rest go through
a real Label Studio. The tiny SAM 3 is random: what is checked is structure, labels, sizes, validity, and that the
answers are exactly what the engine finds for the exemplars the backend should have used."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import supervision as sv
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from ml_backend.engine import Engine
from ml_backend.labelstudio.backend import DUPLICATE_IOU, Exemplars, ExemplarMemory
from ml_backend.labelstudio.config import EXCLUDE, parse_config
from ml_backend.labelstudio.convert import box_to_percent, rle_to_mask
from ml_backend.labelstudio.server import create_app
from ml_backend.labelstudio.stack import engine_label_config, label_config
from ml_backend.models.tiny import write_tiny_sam3
from ml_backend.settings import Settings

from .conftest import LEGACY_TOKEN, RunningServer, encode, make_image

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Car"/><Label value="Person"/><Label value="Exclude"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Car"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></KeyPointLabels>
</View>"""
PROMPTS = "box_threshold: 0.0\nlabels:\n  Car: [car, truck]\n  Person: person\n"
WIDTH, HEIGHT = 160, 90
IMAGE = make_image(WIDTH, HEIGHT, 0)  # tests/conftest.py's image_dir/img0.png
URI = "data:image/png;base64," + base64.b64encode(encode(IMAGE)).decode()
FAR = [10, 10, 60, 50]  # exemplar boxes (xyxy px) on IMAGE: one away from what the tiny SAM 3 finds,
NEAR = [40, 20, 120, 80]  # one on it


@pytest.fixture(scope="module")
def sam3_engine(tmp_path_factory) -> Engine:
    """The tiny SAM 3 as `prelabel serve --detector OUT/sam3 --segmenter none` loads it."""
    root = tmp_path_factory.mktemp("sam3-ls")
    path = write_tiny_sam3(root / "sam3")
    (root / "prompts.yaml").write_text(PROMPTS)
    return Engine.from_settings(Settings(detector=str(path), segmenter="", prompts=root / "prompts.yaml",
                                         model_dir=root / "model-dir", device="cpu"))


@pytest.fixture
def server(sam3_engine, tmp_path):
    """A fresh backend (empty exemplar memory) on the module's SAM 3."""
    settings = sam3_engine.settings.model_copy(update={"model_dir": tmp_path / "model-dir"})
    running = RunningServer(create_app(Engine(sam3_engine.detector, None, sam3_engine.prompts, settings)))
    yield running
    running.stop()


def box(xyxy, label: str = "Car", width: int = WIDTH, height: int = HEIGHT) -> dict:
    """A smart rectangle as Label Studio's frontend sends it."""
    value = box_to_percent(xyxy, width, height) | {"rectanglelabels": [label]}
    return {"id": "r" + label, "type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "value": value}


def ask(server: RunningServer, regions: list[dict], task: int = 5, project: str = "4.1") -> httpx.Response:
    body = {"tasks": [{"id": task, "data": {"image": URI}}], "label_config": CONFIG, "project": project,
            "params": {"context": {"result": regions}}}
    return httpx.post(f"{server.url}/predict", json=body, timeout=60)


def expected(engine: Engine, positives: list, negatives: list = (), label: str = "Car") -> sv.Detections:
    """What SAM 3 finds like `positives` and unlike `negatives` on IMAGE, asked directly."""
    boxes = np.array([*positives, *negatives], np.float32)
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    return engine.find_like(np.array(IMAGE), boxes, labels, label, engine.ontology(["Car", "Person"]))


def check_answer(answer: dict, found: sv.Detections, positives: list, width: int = WIDTH, height: int = HEIGHT):
    """`answer` holds `found` as Car rectangles (less those repeating a drawn box), brushes and polygons."""
    by_type = {t: [r for r in answer["result"] if r["type"] == t] for t in ("rectanglelabels", "brushlabels", "polygonlabels")}
    assert sum(map(len, by_type.values())) == len(answer["result"]), "only rectangles, brushes and polygons"
    assert {lab for r in answer["result"] for lab in r["value"][r["type"]]} <= {"Car"}
    new = sv.box_iou_batch(found.xyxy, np.array(positives, np.float32)).max(axis=1) < DUPLICATE_IOU
    rects = by_type["rectanglelabels"]
    assert sorted(r["score"] for r in rects) == sorted(round(float(s), 6) for s in found.confidence[new])
    assert {r["from_name"] for r in rects} <= {"box"}
    assert len(by_type["brushlabels"]) == int(sum(m.any() for m in found.mask))
    for region in by_type["brushlabels"]:
        assert region["from_name"] == "brush" and rle_to_mask(region["value"]["rle"], width, height).any()
    for region in by_type["polygonlabels"]:
        points = np.array(region["value"]["points"])
        assert region["from_name"] == "poly" and len(points) >= 3 and (points >= 0).all() and (points <= 100).all()
    return by_type


# --- fast: the backend over real HTTP ---------------------------------------------------------------------------


def test_a_smart_rectangle_finds_every_object_like_it_without_repeating_the_drawn_box(server, sam3_engine):
    for drawn in (FAR, NEAR):
        response = ask(server, [box(drawn)])
        assert response.status_code == 200, response.text
        (answer,) = response.json()["results"]
        found = expected(sam3_engine, [drawn])
        assert len(found) and found.mask is not None
        by_type = check_answer(answer, found, [drawn])
        assert by_type["brushlabels"], "SAM 3's own masks fill the brush control"
    near = sv.box_iou_batch(found.xyxy, np.array([NEAR], np.float32)).max(axis=1)
    assert (near >= DUPLICATE_IOU).any(), "NEAR lies on a found object: the case checks that it is not repeated"
    assert len(by_type["rectanglelabels"]) < len(found)


def test_exclude_boxes_are_negatives_for_the_last_positives_and_stay_remembered(server, sam3_engine):
    excluded = [100, 5, 150, 40]
    first = ask(server, [box(FAR)]).json()["results"][0]
    check_answer(first, expected(sam3_engine, [FAR]), [FAR])
    # Label Studio sends every Exclude box of the image, and only those
    answer = ask(server, [box(excluded, EXCLUDE)]).json()["results"][0]
    check_answer(answer, expected(sam3_engine, [FAR], [excluded]), [FAR])
    assert [r["score"] for r in answer["result"]] != [r["score"] for r in first["result"]], "the negative counts"
    assert answer["model_version"] == first["model_version"] and answer["model_version"].startswith("sam3")
    memory = server.app.state.backend.exemplars.get((4, 5, "image"))
    assert memory.label == "Car" and memory.negatives.shape == (1, 4)
    # a later positive request keeps the Exclude boxes
    again = ask(server, [box(FAR), box(NEAR)]).json()["results"][0]
    check_answer(again, expected(sam3_engine, [FAR, NEAR], [excluded]), [FAR, NEAR])
    # the last smart region deleted: nothing to show, and the Exclude boxes are forgotten
    empty = ask(server, []).json()["results"][0]
    assert empty["result"] == [] and empty["model_version"] == first["model_version"]
    after = ask(server, [box(FAR)]).json()["results"][0]
    check_answer(after, expected(sam3_engine, [FAR]), [FAR])
    assert server.app.state.backend.exemplars.get((4, 5, "image")).negatives.shape == (0, 4)


def test_an_exclude_box_before_any_object_box_asks_for_one_first(server):
    ask(server, [box(FAR)], task=5).raise_for_status()
    for task, project in ((6, "4.1"), (5, "9.1")):  # another task, another project: nothing to exclude from
        response = ask(server, [box(FAR, "exclude")], task=task, project=project)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert message.startswith(f"task {task}: ") and "first draw a smart rectangle" in message and "Exclude" in message


def test_bad_exemplar_boxes_are_named_and_the_server_keeps_serving(server):
    flat = box([30, 20, 30, 60])  # zero width
    outside = box([170, 10, 200, 40])
    for regions, words in (([flat], "has no area"), ([outside], f"lies outside the {WIDTH}x{HEIGHT} image"),
                           ([box(FAR), box(FAR, "Person")], "several labels"),
                           ([box(FAR, "Truck")], "label 'Truck' is not a label of <RectangleLabels name='box'>")):
        response = ask(server, regions)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert message.startswith("task 5: ") and words in message, message
    assert "[30.0, 20.0, 30.0, 60.0]" in ask(server, [flat]).json()["error"]["message"]
    # a failed request leaves nothing behind to exclude from
    assert ask(server, [box(FAR, EXCLUDE)]).status_code == 400
    assert ask(server, [box(FAR)]).status_code == 200
    assert httpx.get(f"{server.url}/health").json()["status"] == "UP"


def test_batch_predictions_fill_every_control_but_never_the_exclude_label(server):
    setup = httpx.post(f"{server.url}/setup", json={"project": "4.1", "schema": CONFIG}).json()
    assert setup["model_version"].startswith("sam3") and setup["skipped"] == []
    health = httpx.get(f"{server.url}/health").json()
    assert health["find_all_like_this"] is True and health["detector"].endswith("sam3")
    assert health["clicks"] == health["detector"] and health["segmenter"] is None
    body = {"tasks": [{"id": 1, "data": {"image": URI}}], "label_config": CONFIG, "project": "4.1"}
    (entry,) = httpx.post(f"{server.url}/predict", json=body, timeout=60).json()["results"]
    assert {r["type"] for r in entry["result"]} == {"rectanglelabels", "brushlabels", "polygonlabels"}
    labels = {lab for r in entry["result"] for lab in r["value"][r["type"]]}
    assert labels <= {"Car", "Person"} and entry["model_version"] == setup["model_version"]
    assert parse_config(CONFIG).labels == ["Car", "Person"]


def test_a_click_goes_to_sam3s_tracker_and_the_cache_covers_it(server):
    click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": WIDTH,
             "original_height": HEIGHT, "is_positive": True, "value": {"x": 50, "y": 50, "keypointlabels": ["Person"]}}
    for _ in range(2):
        response = ask(server, [click])
        assert response.status_code == 200, response.text
        (mask,) = response.json()["results"][0]["result"]
        assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == ["Person"]
        assert rle_to_mask(mask["value"]["rle"], WIDTH, HEIGHT).shape == (HEIGHT, WIDTH)
    cache = httpx.get(f"{server.url}/metrics").json()["embedding_cache"]
    assert cache["hits"] >= 1, cache


def test_the_generated_config_offers_exclude_and_brushes_with_sam3_alone(sam3_engine, base_pipeline):
    xml = engine_label_config(sam3_engine)
    config = parse_config(xml)
    assert [c.type for c in config.controls] == ["rectanglelabels", "brushlabels"] and config.labels == ["Car", "Person"]
    assert config.controls[0].labels == ("Car", "Person", EXCLUDE)
    assert "finds all like it" in xml and xml.count('smart="true"') == 2  # smart rectangles and keypoints
    plain = engine_label_config(base_pipeline)  # Grounding DINO + SAM: as before
    assert EXCLUDE not in plain and "SAM masks what it covers" in plain
    no_clicks = label_config(sam3_engine.ontology(), masks=True, clicks=False, exemplars=True)
    assert "KeyPointLabels" not in no_clicks and no_clicks.count('smart="true"') == 1


def test_without_sam3_a_smart_rectangle_is_one_mask_and_exclude_names_sam3(start_backend, ls_host, image_dir):
    backend = start_backend(label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    body = {"tasks": [{"id": 3, "data": {"image": URI}}], "label_config": CONFIG,
            "params": {"context": {"result": [box(FAR)]}}}
    (answer,) = httpx.post(f"{backend.url}/predict", json=body, timeout=60).json()["results"]
    (mask,) = answer["result"]
    assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == ["Car"]
    body["params"]["context"]["result"] = [box(FAR, EXCLUDE)]
    response = httpx.post(f"{backend.url}/predict", json=body, timeout=60)
    assert response.status_code == 422 and "needs SAM 3 as the detector" in response.json()["error"]["message"]


def test_the_exemplar_memory_keeps_the_task_images_used_last():
    memory = ExemplarMemory(size=2)
    for task in (1, 2, 3):
        memory.put((1, task, "image"), Exemplars("Car", np.ones((1, 4), np.float32)))
    assert len(memory) == 2 and memory.get((1, 1, "image")).label is None and memory.get((1, 3, "image")).label == "Car"
    copy = memory.get((1, 3, "image"))
    copy.label = "Person"
    assert memory.get((1, 3, "image")).label == "Car", "callers change copies"


# --- through a real Label Studio --------------------------------------------------------------------------------


def post(label_studio: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{label_studio}{path}", headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=120, **kwargs)


@pytest.fixture
def project(label_studio, server, image_dir):
    """A project with img0 (160x90) and img2 (300x240) uploaded, connected to the SAM 3 backend."""
    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    created = ls.projects.create(title="sam3", label_config=CONFIG)
    paths = [image_dir / "img0.png", image_dir / "img2.png"]
    files = [(f"file{i}", (p.name, p.read_bytes())) for i, p in enumerate(paths)]
    post(label_studio, f"/api/projects/{created.id}/import", files=files).raise_for_status()
    tasks = sorted(ls.tasks.list(project=created.id), key=lambda t: t.id)
    ml = ls.ml.create(url=server.url, project=created.id, is_interactive=True, title="prelabel SAM 3")
    return ls, created, ml, {t.id: Path(t.data["image"]).name.split("-", 1)[-1] for t in tasks}


def test_sam3_predictions_stored_in_label_studio_are_valid(label_studio, project, image_dir):
    ls, created, ml, tasks = project
    post(label_studio, "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": created.id},
         json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
    interface = LabelInterface(CONFIG)
    for task_id, name in tasks.items():
        width, height = Image.open(image_dir / name).size
        (prediction,) = ls.predictions.list(task=task_id)
        assert prediction.model_version.startswith("sam3")
        assert interface.validate_prediction({"result": prediction.result}, return_errors=True) == []
        assert {r["type"] for r in prediction.result} == {"rectanglelabels", "brushlabels", "polygonlabels"}
        for region in prediction.result:
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert EXCLUDE not in region["value"][region["type"]]
            if region["type"] == "brushlabels":
                assert rle_to_mask(region["value"]["rle"], width, height).any()
            if region["type"] == "polygonlabels":
                points = np.array(region["value"]["points"])
                assert (points >= 0).all() and (points <= 100).all()


def interactive(label_studio: str, ml, task: int, regions: list[dict]) -> dict:
    response = post(label_studio, f"/api/ml/{ml.id}/interactive-annotating", json={"task": task, "context": {"result": regions}})
    assert response.status_code == 200, response.text
    return response.json()


def test_find_all_like_this_and_exclude_through_label_studio(label_studio, project, server, sam3_engine):
    ls, created, ml, tasks = project
    task = next(t for t, name in tasks.items() if name == "img0.png")
    other = next(t for t in tasks if t != task)
    interface = LabelInterface(CONFIG)
    excluded = [100, 5, 150, 40]
    for regions, positives, negatives in (([box(FAR)], [FAR], []), ([box(excluded, EXCLUDE)], [FAR], [excluded])):
        data = interactive(label_studio, ml, task, regions)["data"]
        assert interface.validate_prediction(data, return_errors=True) == []
        check_answer(data, expected(sam3_engine, positives, negatives), positives)
    # the Exclude box deleted, the last of its kind: Label Studio sends no region, and nothing comes back
    assert interactive(label_studio, ml, task, [])["data"]["result"] == []
    assert server.app.state.backend.exemplars.get((created.id, task, "image")).negatives.shape == (0, 4)
    # an Exclude box on an image with no object box yet: Label Studio hands on our 400 as an error
    answer = interactive(label_studio, ml, other, [box(excluded, EXCLUDE, 300, 240)])
    assert "data" not in answer and "400" in answer["errors"][0]
    # bad boxes: an error each, and the server keeps serving
    for bad in ([30, 20, 30, 60], [170, 10, 200, 40]):
        answer = interactive(label_studio, ml, task, [box(bad)])
        assert "data" not in answer and "400" in answer["errors"][0]
    # a click, with SAM 3 and no segmenter: SAM 3's tracker masks it
    click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": WIDTH,
             "original_height": HEIGHT, "is_positive": True, "value": {"x": 50, "y": 50, "keypointlabels": ["Car"]}}
    data = interactive(label_studio, ml, task, [click])["data"]
    (mask,) = data["result"]
    assert mask["type"] == "brushlabels" and mask["value"]["brushlabels"] == ["Car"]
    assert rle_to_mask(mask["value"]["rle"], WIDTH, HEIGHT).shape == (HEIGHT, WIDTH)
    assert interface.validate_prediction(data, return_errors=True) == []
