"""The Label Studio ML-backend protocol over real HTTP, on tiny models."""

from __future__ import annotations

import base64

import pytest
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.labelstudio.convert import rle_to_mask
from ml_backend.ontology import PromptsFile

from .conftest import CONFIG, LEGACY_TOKEN, encode, free_port, make_image

SIZES = {"img0.png": (160, 90), "img1.png": (120, 200), "img2.png": (300, 240)}


def predict(http, backend, tasks, config=CONFIG, **extra):
    return http.post(f"{backend.url}/predict", json={"tasks": tasks, "label_config": config, "project": "1.1700000000"} | extra)


def upload_tasks(names=SIZES):
    return [{"id": i + 1, "data": {"image": f"/data/upload/{name}"}} for i, name in enumerate(names)]


def assert_valid(prediction: dict, config: str = CONFIG):
    assert LabelInterface(config).validate_prediction(prediction, return_errors=True) == []


def test_predict_returns_one_valid_result_per_task_for_a_batch_of_three(http, backend):
    response = predict(http, backend, upload_tasks())
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3
    for result, (name, (w, h)) in zip(results, SIZES.items()):
        assert result["model_version"].startswith("detector+segmenter-")
        assert 0.0 <= result["score"] <= 1.0
        assert result["result"], f"no regions for {name}"
        assert_valid(result)
        for region in result["result"]:
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert 0 <= region["score"] <= 1


def test_boxes_are_percentages_inside_the_image(http, backend):
    for result in predict(http, backend, upload_tasks()).json()["results"]:
        boxes = [r["value"] for r in result["result"] if r["type"] == "rectanglelabels"]
        assert boxes
        for v in boxes:
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100
            assert 0 < v["width"] and 0 < v["height"]
            assert v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6


def test_brush_rle_decodes_to_the_image_size(http, backend):
    for result, (w, h) in zip(predict(http, backend, upload_tasks()).json()["results"], SIZES.values()):
        brushes = [r for r in result["result"] if r["type"] == "brushlabels"]
        assert brushes
        for region in brushes:
            mask = rle_to_mask(region["value"]["rle"], w, h)
            assert mask.shape == (h, w)
            assert region["value"]["format"] == "rle"


def test_polygons_are_closed_and_inside_the_image(http, backend):
    polygons = [
        r["value"]
        for result in predict(http, backend, upload_tasks()).json()["results"]
        for r in result["result"]
        if r["type"] == "polygonlabels"
    ]
    assert polygons
    for value in polygons:
        assert value["closed"] is True and len(value["points"]) >= 3
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in value["points"])


def test_labels_come_only_from_each_control_of_the_config(http, backend):
    allowed = {"label": {"Car", "Person"}, "brush": {"Car", "Person"}, "poly": {"Person"}}
    seen = set()
    for result in predict(http, backend, upload_tasks()).json()["results"]:
        for region in result["result"]:
            (label,) = region["value"][region["type"]]
            assert label in allowed[region["from_name"]]
            seen.add(region["from_name"])
    assert seen == {"label", "brush", "poly"}, "every control of the config is filled"


def test_prompts_file_labels_missing_from_the_config_are_not_emitted(http, start_backend, ls_host):
    prompts = PromptsFile(labels={"Bottle": ["bottle"], "Car": ["car"]})
    server = start_backend(prompts, label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    config = '<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="Car"/></RectangleLabels></View>'
    response = http.post(f"{server.url}/predict", json={"tasks": [{"id": 5, "data": {"img": "/data/upload/img0.png"}}], "label_config": config})
    regions = response.json()["results"][0]["result"]
    assert regions and {r["value"]["rectanglelabels"][0] for r in regions} == {"Car"}
    assert_valid(response.json()["results"][0], config)


def test_exif_orientation_gives_the_size_label_studio_shows(http, backend):
    result = predict(http, backend, [{"id": 9, "data": {"image": "/data/upload/exif.jpg"}}]).json()["results"][0]
    assert {(r["original_width"], r["original_height"]) for r in result["result"]} == {(80, 120)}


def interactive(http, backend, region, task_image="/data/upload/img1.png"):
    body = {"tasks": [{"id": 2, "data": {"image": task_image}}], "params": {"context": {"result": [region]}}}
    return predict(http, backend, **body)


def keypoint(x, y, label="Car", positive=True):
    return {
        "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 120,
        "original_height": 200, "is_positive": positive, "value": {"x": x, "y": y, "keypointlabels": [label]},
    }


def test_interactive_keypoint_returns_a_brush_mask_with_the_clicked_label(http, backend):
    response = interactive(http, backend, keypoint(40, 50))
    assert response.status_code == 200
    (result,) = response.json()["results"]
    (region,) = result["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "brush"
    assert region["value"]["brushlabels"] == ["Car"]
    assert rle_to_mask(region["value"]["rle"], 120, 200).shape == (200, 120)
    assert_valid(result)


def test_interactive_clicks_on_the_same_image_reuse_the_cached_embedding(http, backend):
    interactive(http, backend, keypoint(40, 50))
    before = http.get(f"{backend.url}/metrics").json()["embedding_cache"]
    interactive(http, backend, keypoint(60, 30, positive=False) | {"value": {"x": 60, "y": 30, "keypointlabels": ["Car"]}})
    after = http.get(f"{backend.url}/metrics").json()["embedding_cache"]
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]


def test_interactive_rectangle_returns_a_mask(http, backend):
    region = {
        "type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": 120,
        "original_height": 200, "value": {"x": 10, "y": 10, "width": 50, "height": 40, "rectanglelabels": ["Person"]},
    }
    (result,) = interactive(http, backend, region).json()["results"]
    (region,) = result["result"]
    assert region["value"]["brushlabels"] == ["Person"]
    assert_valid(result)


def test_interactive_mask_goes_to_polygons_when_they_are_the_only_mask_control(http, backend):
    config = """<View><Image name="image" value="$image"/>
      <PolygonLabels name="poly" toName="image"><Label value="Car"/></PolygonLabels>
      <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/></KeyPointLabels></View>"""
    body = {"tasks": [{"id": 2, "data": {"image": "/data/upload/img2.png"}}], "params": {"context": {"result": [keypoint(50, 50)]}}}
    (result,) = predict(http, backend, config=config, **body).json()["results"]
    assert result["result"] and all(r["type"] == "polygonlabels" for r in result["result"])
    assert_valid(result, config)


def test_textarea_prompt_runs_the_detector_on_that_text(http, backend):
    region = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["Person: a small person"]}}
    (result,) = interactive(http, backend, region).json()["results"]
    labels = {r["value"][r["type"]][0] for r in result["result"]}
    assert result["result"] and labels == {"Person"}
    assert_valid(result)


def test_textarea_prompt_that_names_no_label_is_a_clear_error(http, backend):
    region = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["zebra"]}}
    response = interactive(http, backend, region)
    assert response.status_code == 400
    assert "zebra" in response.json()["error"]["message"] and "Label: " in response.json()["error"]["message"]


def test_interactive_label_outside_the_mask_control_is_rejected(http, backend):
    response = interactive(http, backend, keypoint(40, 50, label="Tree"))
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("task 2: label 'Tree'")


def test_interactive_on_an_unreachable_image_names_the_task_and_url(http, backend):
    response = interactive(http, backend, keypoint(40, 50), task_image="/data/upload/missing.png")
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith("task 2: ") and "/data/upload/missing.png" in message and "404" in message


def test_setup_returns_a_model_version_that_changes_with_the_prompts(http, start_backend):
    first = start_backend(PromptsFile(labels={"Car": ["car"]}))
    second = start_backend(PromptsFile(labels={"Car": ["car", "automobile"]}))
    body = {"project": "3.1700000000", "schema": CONFIG, "hostname": "http://127.0.0.1:1", "access_token": "x"}
    v1 = http.post(f"{first.url}/setup", json=body).json()["model_version"]
    v2 = http.post(f"{second.url}/setup", json=body).json()["model_version"]
    assert v1 != v2 and v1.startswith("detector+segmenter-")
    assert http.post(f"{first.url}/setup", json=body).json()["model_version"] == v1
    assert http.get(f"{first.url}/versions").json() == {"versions": [v1]}


def test_predict_uses_the_label_config_given_at_setup(http, backend):
    http.post(f"{backend.url}/setup", json={"project": "4.1700000000", "schema": CONFIG})
    response = http.post(f"{backend.url}/predict", json={"tasks": upload_tasks()[:1], "project": "4.1700000000"})
    assert response.status_code == 200 and response.json()["results"][0]["result"]


def test_setup_rejects_a_config_with_no_supported_control_naming_the_tags(http, backend):
    config = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="A"/></Choices></View>'
    response = http.post(f"{backend.url}/setup", json={"project": "1.1", "schema": config})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "Choices" in message and "RectangleLabels" in message


def test_health_and_metrics_answer(http, backend):
    assert http.get(f"{backend.url}/health").json()["status"] == "UP"
    predict(http, backend, upload_tasks()[:1])
    metrics = http.get(f"{backend.url}/metrics").json()
    assert metrics["requests"]["/predict"] >= 1 and "p99" in metrics["latency_s"]["/predict"]
    assert metrics["memory"]["peak_rss_bytes"] > 0


def annotation_event(action, annotation_id=11, task_id=2):
    return {"action": action, "project": {"id": 7, "title": "p"}, "annotation": {"id": annotation_id, "result": []}, "task": {"id": task_id, "data": {}}}


def test_webhook_records_training_events_in_sqlite(http, backend):
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"):
        response = http.post(f"{backend.url}/webhook", json=annotation_event(action))
        assert response.status_code == 201 and response.json()["status"] == "recorded"
    deleted = {"action": "ANNOTATIONS_DELETED", "project": {"id": 7}, "annotations": [{"id": 11}, {"id": 12}]}
    assert http.post(f"{backend.url}/webhook", json=deleted).status_code == 201
    assert http.post(f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 201
    events = backend.app.state.backend.store.events(project_id=7)
    assert [e["action"] for e in events] == [
        "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_DELETED", "ANNOTATIONS_DELETED", "START_TRAINING",
    ]
    assert events[0]["task_id"] == 2 and events[0]["annotation_id"] == 11
    assert http.get(f"{backend.url}/metrics").json()["webhook_events"]["ANNOTATIONS_DELETED"] == 2


def test_webhook_answers_other_events_as_unknown_and_rejects_invalid_ones(http, backend):
    response = http.post(f"{backend.url}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert response.status_code == 200 and response.json()["status"] == "Unknown event"
    response = http.post(f"{backend.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert response.status_code == 400 and "annotation" in response.json()["error"]["message"]
    assert http.post(f"{backend.url}/webhook", json={"no": "action"}).status_code == 422
    assert backend.app.state.backend.store.events() == []


@pytest.fixture
def guarded(start_backend):
    return start_backend(basic_auth_user="ls", basic_auth_pass="s3cret")


@pytest.mark.parametrize("path", ["/health", "/", "/metrics", "/versions", "/docs", "/openapi.json"])
def test_basic_auth_guards_every_route(http, guarded, path):
    assert http.get(f"{guarded.url}{path}").status_code == 401
    assert http.get(f"{guarded.url}{path}", auth=("ls", "wrong")).status_code == 401
    assert http.get(f"{guarded.url}{path}", auth=("ls", "s3cret")).status_code == 200


def test_basic_auth_guards_predict_and_setup(http, guarded):
    body = {"tasks": upload_tasks()[:1], "label_config": CONFIG}
    response = http.post(f"{guarded.url}/predict", json=body)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    assert http.post(f"{guarded.url}/setup", json={"project": "1.1"}).status_code == 401
    assert http.post(f"{guarded.url}/setup", json={"project": "1.1"}, auth=("ls", "s3cret")).status_code == 200


BAD_TASKS = {
    "unreachable": ("http://127.0.0.1:{closed}/img.png", "could not be fetched"),
    "404": ("/data/upload/missing.png", "HTTP 404"),
    "corrupt": ("/data/upload/corrupt.png", "corrupt"),
    "empty": ("/data/upload/empty.png", "empty"),
    "not an image": ("/data/upload/notes.txt", "not an image"),
    "huge": ("/data/upload/huge.png", "12000000 pixels, over the limit of 5000000"),
    "bad scheme": ("ftp://example.invalid/a.png", "unsupported form"),
    "bad base64": ("data:image/png;base64,@@@", "invalid base64"),
}


@pytest.mark.parametrize("case", BAD_TASKS)
def test_bad_task_gets_an_error_naming_task_and_cause_and_the_rest_of_the_batch_survives(http, backend, case):
    url, expected = BAD_TASKS[case]
    tasks = upload_tasks()[:1] + [{"id": 42, "data": {"image": url.format(closed=free_port())}}]
    response = predict(http, backend, tasks)
    assert response.status_code == 200
    good, bad = response.json()["results"]
    assert good["result"]
    assert "result" not in bad, "Label Studio must not store an empty prediction for a failed task"
    assert bad["task"] == 42
    assert bad["error"]["message"].startswith("task 42: ") and expected in bad["error"]["message"]
    assert http.get(f"{backend.url}/health").json()["status"] == "UP"
    assert predict(http, backend, upload_tasks()[:1]).status_code == 200


@pytest.mark.parametrize(
    "body, status, expected",
    [
        (b"not json", 422, "malformed request"),
        (b'{"tasks": "nope", "label_config": "<View/>"}', 422, "tasks"),
        (b'{"label_config": "<View/>"}', 422, "tasks"),
        (b'{"tasks": [{"id": 1, "data": {}}], "label_config": "<View><oops"}', 422, "cannot be parsed"),
        (b'{"tasks": [{"id": 1, "data": {}}]}', 400, "no label_config"),
    ],
)
def test_malformed_requests_are_answered_clearly(http, backend, body, status, expected):
    response = http.post(f"{backend.url}/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert expected in response.json()["error"]["message"]
    assert http.get(f"{backend.url}/health").status_code == 200


def test_tasks_without_data_or_with_a_bad_id_are_named(http, backend):
    results = predict(http, backend, [{"id": 3}, "junk", {"id": "x", "data": {"image": "/data/upload/img0.png"}}]).json()["results"]
    assert results[0]["error"]["message"] == "task 3: task has no 'data' object"
    assert "must be a JSON object" in results[1]["error"]["message"]
    assert "is not an integer" in results[2]["error"]["message"]


def test_too_many_tasks_in_one_request_are_refused_with_the_limit(http, start_backend):
    server = start_backend(max_tasks_per_request=2)
    response = http.post(f"{server.url}/predict", json={"tasks": upload_tasks(), "label_config": CONFIG})
    assert response.status_code == 400 and "over the limit of 2" in response.json()["error"]["message"]


def test_data_uri_images_are_accepted(http, backend):
    uri = "data:image/png;base64," + base64.b64encode(encode(make_image(50, 40))).decode()
    result = predict(http, backend, [{"id": 1, "data": {"image": uri}}]).json()["results"][0]
    assert {(r["original_width"], r["original_height"]) for r in result["result"]} == {(50, 40)}


def test_segmenter_free_server_fills_boxes_skips_mask_controls_and_explains_clicks(http, base_pipeline, tmp_path):
    from ml_backend.labelstudio.server import create_app
    from ml_backend.engine import Engine

    from .conftest import RunningServer, make_settings

    settings = make_settings(base_pipeline, tmp_path, label_studio_url="http://127.0.0.1:1")
    server = RunningServer(create_app(Engine(base_pipeline.detector, None, PromptsFile(box_threshold=0.0), settings)))
    try:
        uri = "data:image/png;base64," + base64.b64encode(encode(make_image(50, 40))).decode()
        setup = http.post(f"{server.url}/setup", json={"project": "5.1", "schema": CONFIG})
        assert setup.status_code == 200
        skipped = {s["control"]: s["reason"] for s in setup.json()["skipped"]}
        assert set(skipped) == {"brush", "poly"} and all("PRELABEL_SEGMENTER" in r for r in skipped.values())
        tasks = [{"id": 1, "data": {"image": uri}}]
        (entry,) = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": CONFIG}).json()["results"]
        assert entry["result"] and {r["type"] for r in entry["result"]} == {"rectanglelabels"}
        click = {"context": {"result": [keypoint(40, 50)]}}
        bad = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": CONFIG, "params": click})
        assert bad.status_code == 422 and "without a segmenter" in bad.json()["error"]["message"]
    finally:
        server.stop()


def test_image_arrays_are_rgb_even_for_grayscale_and_alpha(http, backend, tmp_path):
    for mode in ("L", "RGBA", "P"):
        image = make_image(30, 20).convert(mode)
        uri = "data:image/png;base64," + base64.b64encode(encode(image)).decode()
        result = predict(http, backend, [{"id": 1, "data": {"image": uri}}]).json()["results"][0]
        assert "result" in result, result

