"""CVAT's tracker function (cvat_nuclio/sam2_tracker over ml_backend/cvat/tracker.py) through nuclio's test platform,
on a tiny random SAM 2 video model, offline: several frames with two shapes and their states carried as CVAT does,
re-initialisation from the shape where the state is unknown, stale or of another frame size, bad bodies, and the
function yamls."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ml_backend.cvat.tracker import SESSIONS_ENV, TrackerFunction
from ml_backend.errors import ConfigError
from ml_backend.models import build_tracker
from ml_backend.models.tiny import write_tiny_sam2_video
from ml_backend.settings import environment_variables

from .conftest import encode
from .test_cvat_functions import FUNCTIONS, Function, function_yaml, load_main

W, H = 120, 80


def frame_b64(i: int, width: int = W, height: int = H) -> str:
    """Frame i of a generated video (two squares moving apart), as CVAT sends it."""
    array = np.full((height, width, 3), 25, np.uint8)
    array[10 + i : 30 + i, 10 + 2 * i : 34 + 2 * i] = (240, 60, 60)
    array[40 : 60, 80 - 2 * i : 100 - 2 * i] = (60, 220, 90)
    return base64.b64encode(encode(Image.fromarray(array))).decode()


@pytest.fixture(scope="module")
def tracker_function(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracker")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRELABEL_TRACKER", str(write_tiny_sam2_video(root / "sam2-video")))
        mp.setenv("MODEL_DIR", str(root / "model-dir"))
        mp.setenv("PRELABEL_DEVICE", "cpu")
        mp.setenv(SESSIONS_ENV, "3")
        function = Function("sam2_tracker")
        function(json.dumps({"image": frame_b64(0), "shapes": []}))  # init_context loads the model here
        yield function


def call(function, image: str, shapes, states=None):
    body = {"image": image, "shapes": shapes} | ({} if states is None else {"states": states})
    return function(json.dumps(body))


def in_frame(shape, width=W, height=H) -> bool:
    x1, y1, x2, y2 = shape
    return 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_two_shapes_are_tracked_over_frames_with_their_states_carried(tracker_function):
    shapes = [[10, 10, 34, 30], [80, 40, 100, 60]]
    status, out = call(tracker_function, frame_b64(0), shapes, [None, None])
    assert status == 200 and out["shapes"] == shapes  # the first frame's boxes are the user's
    keys = [s["key"] for s in out["states"]]
    assert len(set(keys)) == 2 and all(s["width"] == W and s["height"] == H and s["step"] == 1 for s in out["states"])
    function, encoded = tracker_function.function, []
    encode_frame = function._encode
    function._encode = lambda frame: encoded.append(1) or encode_frame(frame)  # counts image encoder passes
    for i in range(1, 6):
        status, out = call(tracker_function, frame_b64(i), out["shapes"], out["states"])
        assert status == 200 and len(out["shapes"]) == len(out["states"]) == 2
        assert all(in_frame(s) for s in out["shapes"]), out["shapes"]
        assert [s["key"] for s in out["states"]] == keys and all(s["step"] == i + 1 for s in out["states"])
    function._encode = encode_frame
    assert len(encoded) == 5 and function.sessions == 2  # one encoder pass per frame, shared by both tracks
    json.dumps(out["states"])  # JSON, as CVAT stores it


def test_a_missing_unknown_stale_or_resized_state_starts_again_from_the_shape(tracker_function):
    shape = [20, 20, 44, 40]
    _, first = call(tracker_function, frame_b64(0), [shape])  # no states at all: a new track
    state = first["states"][0]
    _, second = call(tracker_function, frame_b64(1), first["shapes"], [state])
    assert second["states"][0]["key"] == state["key"]
    for again in (
        {"key": "not-a-session-here", "step": 1, "width": W, "height": H},  # evicted, or the function restarted
        state,  # stale: CVAT went back a frame and tracks again from there
        {},
    ):
        _, out = call(tracker_function, frame_b64(2), [shape], [again])
        assert out["shapes"] == [shape] and out["states"][0]["key"] != state["key"] and out["states"][0]["step"] == 1
    _, resized = call(tracker_function, frame_b64(3, 100, 70), [shape], [second["states"][0]])
    assert resized["shapes"] == [shape] and resized["states"][0]["width"] == 100
    assert tracker_function.function.sessions <= 3  # the LRU bound (PRELABEL_TRACKER_SESSIONS)


def test_a_lost_object_keeps_its_shape_and_its_state(tmp_path):
    """Where the tracker sees the object nowhere, CVAT gets the shape it sent (one shape per input)."""
    path = write_tiny_sam2_video(tmp_path / "sam2-video")
    tracker = build_tracker(str(path), tmp_path, torch.device("cpu"))
    with torch.no_grad():  # an object-score head that always says "absent"
        tracker.model.mask_decoder.pred_obj_score_head.layers[-1].weight.zero_()
        tracker.model.mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(-10.0)
    function = TrackerFunction(tracker, max_sessions=2)
    out = function({"image": frame_b64(0), "shapes": [[10, 10, 34, 30]], "states": [None]})
    moved = [11.5, 10, 35, 31]
    lost = function({"image": frame_b64(1), "shapes": [moved], "states": out["states"]})
    assert lost["shapes"] == [moved] and lost["states"][0]["key"] == out["states"][0]["key"]


@pytest.mark.parametrize("body, problem", [
    ("not json", "the request body is not JSON"),
    ([], "the request body must be a JSON object"),
    ({"shapes": [[1, 2, 3, 4]]}, "image"),
    ({"image": "%%%", "shapes": [[1, 2, 3, 4]]}, "'image' is not valid base64"),
    ({"image": "FRAME", "shapes": [[1, 2, 3]]}, "shapes"),
    ({"image": "FRAME", "shapes": [[30, 10, 30, 40]]}, r"shapes\[0\]: box \[30.0, 10.0, 30.0, 40.0\] has no area"),
    ({"image": "FRAME", "shapes": [[1, 1, 5, 5], [300, 10, 320, 40]]}, rf"shapes\[1\]: box .* lies outside the {W}x{H} frame"),
    ({"image": "FRAME", "shapes": [[1, 1, 5, 5]], "states": [None, None]}, "2 states for 1 shapes"),
    ({"image": "FRAME", "shapes": [[1, 1, 5, 5]], "states": ["abc"]}, "states"),
])
def test_bad_bodies_get_400_naming_the_problem_and_the_function_keeps_serving(tracker_function, body, problem):
    if isinstance(body, dict) and body.get("image") == "FRAME":
        body = body | {"image": frame_b64(0)}
    status, out = tracker_function(body if isinstance(body, str) else json.dumps(body))
    assert status == 400 and out["error"]["kind"] == "request", out
    assert re.search(problem, out["error"]["message"]), out["error"]["message"]
    status, _ = call(tracker_function, frame_b64(0), [[10, 10, 34, 30]])
    assert status == 200


def test_the_function_needs_a_tracker_and_a_session_count(monkeypatch, tmp_path):
    monkeypatch.setenv("PRELABEL_TRACKER", "")
    with pytest.raises(ConfigError, match="needs a tracker: set PRELABEL_TRACKER"):
        TrackerFunction.from_env()
    monkeypatch.setenv("PRELABEL_TRACKER", str(write_tiny_sam2_video(tmp_path / "t")))
    monkeypatch.setenv(SESSIONS_ENV, "many")
    with pytest.raises(ConfigError, match=f"{SESSIONS_ENV}='many' is not a whole number"):
        TrackerFunction.from_env()


def test_tracker_yamls_are_what_cvat_and_nuclio_read():
    cpu, gpu = function_yaml("sam2_tracker"), function_yaml("sam2_tracker", "function-gpu.yaml")
    for doc in (cpu, gpu):
        annotations = doc["metadata"]["annotations"]
        assert annotations["type"] == "tracker" and doc["metadata"]["namespace"] == "cvat"
        assert doc["spec"]["handler"] == "main:handler" and doc["spec"]["runtime"].startswith("python:3.1")
        env = {e["name"]: str(e["value"]) for e in doc["spec"]["env"]}
        assert set(env) <= environment_variables() | {SESSIONS_ENV} and int(env[SESSIONS_ENV]) >= 1
        fetch = [d["value"] for d in doc["spec"]["build"]["directives"]["postCopy"] if d["kind"] == "RUN"]
        assert len(fetch) == 1 and fetch[0].startswith("prelabel fetch")
        assert f"--tracker {env['PRELABEL_TRACKER']}" in fetch[0] and "--segmenter none" in fetch[0]
    assert cpu["spec"]["build"]["baseImage"] == "prelabel:cpu" and gpu["spec"]["build"]["baseImage"] == "prelabel:gpu"
    assert gpu["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1 and "resources" not in cpu["spec"]
    assert cpu["metadata"]["annotations"] == gpu["metadata"]["annotations"]
    assert yaml.safe_load((FUNCTIONS / "sam2_tracker" / "function.yaml").read_text()) == cpu
    main = load_main("sam2_tracker")
    assert callable(main.handler) and callable(main.init_context)
