"""SAM 3 through every CVAT route (issue 17): the nuclio detector of `cvat_nuclio/sam3` (boxes, SAM 3's own masks,
polygons), the nuclio interactor on SAM 3's tracker, cvat-sdk auto-annotation with SAM 3 alone, and the cvat-sdk
interaction function's find-all (every object like the box; negative points exclude). Offline, on the tiny random
SAM 3 of `prelabel dev tiny-models`; nuclio handlers through nuclio's test platform, cvat-sdk functions loaded and
checked by cvat-cli's own code."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import yaml
from cvat_cli._internal.agent_driver_interaction import (
    AgentInteractionFunctionDriver, _InteractionFunctionContextImpl, _InteractionPromptsImpl,
)
from cvat_sdk.masks import decode_mask
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.cvat.serverless import SHAPE_ENV, InteractorFunction
from ml_backend.errors import ConfigError, RequestError
from ml_backend.models.tiny import write_tiny_sam3
from ml_backend.settings import environment_variables

from .conftest import make_image
from .test_cvat_functions import FUNCTIONS, Context, Function, b64, fake_tools, load_with_cvat_cli, remap

SAM3_LABELS = ["Bottle", "Can", "Person", "Car"]  # cvat_nuclio/sam3/prompts.yaml
W, H = 120, 90


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    return write_tiny_sam3(tmp_path_factory.mktemp("models") / "sam3")


@pytest.fixture(scope="module")
def like_prompts(tmp_path_factory):
    """Every candidate kept (threshold 0) and look-alikes that overlap kept apart (nms_iou 0.95): several instances
    from the tiny random SAM 3."""
    path = tmp_path_factory.mktemp("prompts") / "like.yaml"
    path.write_text("box_threshold: 0.0\nnms_iou: 0.95\nlabels:\n  Car: [car]\n")
    return path


@pytest.fixture
def sam3_env(sam3_dir, monkeypatch, tmp_path):
    """The environment of a deployed SAM 3 function (function.yaml's env), with the tiny SAM 3 as the model."""
    monkeypatch.setenv("PRELABEL_DETECTOR", str(sam3_dir))
    monkeypatch.setenv("PRELABEL_SEGMENTER", "")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("PRELABEL_DEVICE", "cpu")
    monkeypatch.delenv("PRELABEL_PROMPTS", raising=False)
    return monkeypatch


def decoded(points) -> np.ndarray:
    return decode_mask(points, image_width=W, image_height=H)


# --- nuclio detector (cvat_nuclio/sam3) ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["rectangle", "mask", "polygon"])
def test_nuclio_sam3_detector_boxes_and_masks_every_instance_itself(sam3_env, shape):
    sam3_env.setenv(SHAPE_ENV, shape)
    detector = Function("sam3")
    image = make_image(W, H, seed=3)
    status, shapes = detector({"image": b64(image), "threshold": 0.0, "labels": ["Car", "Person"]})
    assert status == 200 and shapes, shapes
    engine = detector.function.engine
    assert engine.segmenter is None and engine.detector_masks, "SAM 3 masks what it finds: no SAM is loaded"
    ontology = detector.function.ontology  # the prompts file's labels in its order, as the function asks for them
    ontology = replace(ontology, labels=tuple(s for s in ontology.labels if s.name in ("Car", "Person")))
    expected = engine.detect([np.array(image)], ontology.with_threshold(0.0), masks=True)[0]
    assert [s["label"] for s in shapes] == list(expected.data["class_name"]) and set(expected.data["class_name"]) <= {"Car", "Person"}
    for s, mask, xyxy in zip(shapes, expected.mask, expected.xyxy):
        assert s["type"] == shape and 0 <= float(s["confidence"]) <= 1
        xs, ys = s["points"][0::2], s["points"][1::2]
        assert 0 <= min(xs) <= max(xs) <= W and 0 <= min(ys) <= max(ys) <= H
        if shape == "mask":  # CVAT's run lengths decode to SAM 3's own mask at the frame's size
            bitmap = decoded(s["mask"])
            assert bitmap.shape == (H, W) and bitmap.any()
            x1, y1, x2, y2 = s["mask"][-4:]
            assert bitmap[y1 : y2 + 1, x1 : x2 + 1].any() and not bitmap.sum() - bitmap[y1 : y2 + 1, x1 : x2 + 1].sum()
            if mask.any():
                assert (bitmap == mask).all()
        elif shape == "polygon":
            assert len(s["points"]) >= 6
        else:
            assert s["points"] == [round(float(v), 2) for v in xyxy]
    assert detector({"image": b64(image), "threshold": 1.0, "labels": ["Car"]}) == (200, [])


def test_sam3_function_yamls_and_what_cvat_spec_writes_for_them(tmp_path):
    cpu, gpu = (yaml.safe_load((FUNCTIONS / "sam3" / name).read_text()) for name in ("function.yaml", "function-gpu.yaml"))
    for doc in (cpu, gpu):
        env = {e["name"]: str(e["value"]) for e in doc["spec"]["env"]}
        assert set(env) <= environment_variables() | {SHAPE_ENV}
        assert env["PRELABEL_DETECTOR"] == "facebook/sam3" and env["PRELABEL_SEGMENTER"] == "" and env[SHAPE_ENV] == "mask"
        assert json.loads(doc["metadata"]["annotations"]["spec"]) == [
            {"id": i, "name": n, "type": "mask"} for i, n in enumerate(SAM3_LABELS)]
        (fetch,) = [d["value"] for d in doc["spec"]["build"]["directives"]["postCopy"] if d["kind"] == "RUN"]
        assert fetch == "prelabel fetch --prompts /opt/nuclio/prompts.yaml --detector facebook/sam3 --segmenter none"
    assert {e["name"]: e["value"] for e in gpu["spec"]["env"]}["PRELABEL_PRECISION"] == "bfloat16"
    assert "PRELABEL_PRECISION" not in {e["name"] for e in cpu["spec"]["env"]}
    assert cpu["metadata"]["annotations"] == gpu["metadata"]["annotations"] and cpu["metadata"]["annotations"]["type"] == "detector"

    target = tmp_path / "sam3"
    shutil.copytree(FUNCTIONS / "sam3", target)
    runner = CliRunner()
    result = runner.invoke(app, ["cvat", "spec", "--prompts", str(FUNCTIONS / "sam3/prompts.yaml"), "--function-dir",
                                 str(target), "--shape", "rectangle"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load((target / "function.yaml").read_text())
    (fetch,) = [d["value"] for d in doc["spec"]["build"]["directives"]["postCopy"] if d["kind"] == "RUN"]
    assert "--detector facebook/sam3 --segmenter none" in fetch, "boxes only drops the segmenter, never SAM 3"
    result = runner.invoke(app, ["cvat", "spec", "--prompts", str(FUNCTIONS / "sam3/prompts.yaml"), "--function-dir",
                                 str(target), "--shape", "mask"])
    assert result.exit_code == 0, result.output
    for name in ("function.yaml", "function-gpu.yaml", "prompts.yaml"):  # the committed files are what it writes
        assert (target / name).read_text() == (FUNCTIONS / "sam3" / name).read_text(), name


def test_deploy_script_deploys_sam3_by_name(tmp_path):
    env, log = fake_tools(tmp_path)
    run = subprocess.run([str(FUNCTIONS / "deploy.sh"), "--gpu", "sam3"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    (deploy,) = [c for c in log.read_text().splitlines() if c.startswith("nuctl deploy")]
    assert f"--path {FUNCTIONS / 'sam3'} --file {FUNCTIONS / 'sam3' / 'function-gpu.yaml'}" in deploy


# --- nuclio interactor on SAM 3's tracker --------------------------------------------------------------------------


@pytest.mark.parametrize("configured", ["segmenter", "detector"])
def test_nuclio_interactor_clicks_go_to_sam3s_tracker(sam3_env, sam3_dir, configured):
    if configured == "segmenter":  # PRELABEL_SEGMENTER=facebook/sam3
        sam3_env.setenv("PRELABEL_SEGMENTER", str(sam3_dir))
    interactor = Function("sam")
    image = b64(make_image(W, H, seed=4))
    status, answer = interactor({"image": image, "pos_points": [[30, 40]], "neg_points": [[100, 80]]})
    assert status == 200, answer
    mask = np.array(answer["mask"])
    assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 1} and 0 <= float(answer["confidence"]) <= 1
    engine = interactor.function.engine
    assert type(engine.clicker).__name__ == "Sam3" and engine.clicker.clicks
    assert (engine.segmenter is None) == (configured == "detector")
    before = engine.clicker.cache_info()
    status, answer = interactor({"image": image, "pos_points": [], "obj_bbox": [[10, 5], [100, 80]]})
    after = engine.clicker.cache_info()
    assert status == 200 and np.array(answer["mask"]).shape == (H, W)
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"], "a second click reuses the features"


def test_nuclio_interactor_refuses_a_detector_that_takes_no_clicks(sam3_env, tiny_models):
    sam3_env.setenv("PRELABEL_DETECTOR", str(tiny_models["detector"]))  # Grounding DINO, no segmenter
    with pytest.raises(ConfigError, match="clicks need a segmenter .* takes no clicks"):
        InteractorFunction.from_env()


# --- cvat-sdk auto-annotation with SAM 3 alone -----------------------------------------------------------------


@pytest.mark.parametrize("shape", ["rectangle", "mask", "polygon"])
def test_auto_annotation_with_sam3_alone(sam3_dir, tmp_path, monkeypatch, shape):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("detector: IDEA-Research/grounding-dino-tiny\nlabels:\n  Car: [car, truck]\n  Person: person\n")
    function = load_with_cvat_cli("ml_backend.cvat.auto_annotation", f"prompts=str:{prompts}",
                                  f"detector=str:{sam3_dir}", "device=str:cpu", f"shape=str:{shape}")
    assert function.engine.segmenter is None, "no SAM beside SAM 3 (not even the default one)"
    assert [(label.name, label.type) for label in function.spec.labels] == [("Car", shape), ("Person", shape)]
    shapes = function.detect(Context(conf_threshold=0.0), make_image(W, H, seed=5))
    assert shapes and {s.type.value for s in shapes} == {shape}
    for s in shapes:
        assert 0 <= s.score <= 1
        if shape == "mask":
            assert decoded(s.points).any()
        elif shape == "polygon":
            assert len(s.points) >= 6 and max(s.points[0::2]) <= W and max(s.points[1::2]) <= H
    assert len(remap(function, shapes)) == len(shapes)  # cvat-sdk's own checks against a task with these labels


# --- cvat-sdk interaction: find all like this --------------------------------------------------------------------


def prompts(pos=(), neg=(), box=None):
    return _InteractionPromptsImpl(pos_points=tuple(pos), neg_points=tuple(neg), bounding_box=box)


@pytest.fixture(scope="module")
def find_all(sam3_dir, like_prompts, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODEL_DIR", str(tmp_path_factory.mktemp("model-dir")))
        yield load_with_cvat_cli("ml_backend.cvat.interaction", f"detector=str:{sam3_dir}", "find_all=bool:true",
                                 f"prompts=str:{like_prompts}", "device=str:cpu")


def test_find_all_returns_a_mask_for_every_object_like_the_box(find_all):
    fields = AgentInteractionFunctionDriver.get_remote_function_fields(find_all.spec)
    assert fields == {"min_pos_points": 0, "min_neg_points": 0, "startswith_box_optional": True}
    context = _InteractionFunctionContextImpl()
    prepared = find_all.preprocess_image(context, make_image(W, H, seed=6))
    misses = find_all.engine.detector.cache_info()["misses"]
    shapes = find_all.detect(context, prepared, prompts(box=((10, 10), (60, 50))))
    assert len(shapes) >= 2, "several instances"
    masks = [decoded(s.points) for s in shapes]
    scores = [float(s.attributes[0].value) for s in shapes]
    assert all(m.any() for m in masks) and scores == sorted(scores, reverse=True) and all(0 <= v <= 1 for v in scores)
    assert all(s.type == "mask" and s.attributes[0].spec_id == 0 for s in shapes)

    # a negative point removes every found object whose mask holds it, and only those
    cover = np.sum(masks, axis=0)
    y, x = np.argwhere(cover == cover[cover > 0].min())[0]
    kept = [m for m in masks if not m[y, x]]
    assert len(kept) < len(masks)
    fewer = find_all.detect(context, prepared, prompts(neg=[(float(x), float(y))], box=((10, 10), (60, 50))))
    assert len(fewer) == len(kept) and all((decoded(s.points) == m).all() for s, m in zip(fewer, kept))
    assert find_all.engine.detector.cache_info()["misses"] == misses, "the frame is encoded once"

    clicked = find_all.detect(context, prepared, prompts(pos=[(30, 30)]))  # no box: a click's one mask, as ever
    assert len(clicked) <= 1


@pytest.mark.parametrize("box, problem", [
    (((10, 10), (10, 40)), r"exemplar box \[10.0, 10.0, 10.0, 40.0\] has no area"),
    (((200, 150), (260, 190)), r"exemplar box \[200.0, 150.0, 260.0, 190.0\] lies outside the 120x90 image"),
])
def test_find_all_names_a_bad_exemplar_box_and_keeps_working(find_all, box, problem):
    context = _InteractionFunctionContextImpl()
    prepared = find_all.preprocess_image(context, make_image(W, H, seed=6))
    with pytest.raises(RequestError, match=problem):
        find_all.detect(context, prepared, prompts(box=box))
    with pytest.raises(RequestError, match=r"negative point 0 \(500, 5\) lies outside the 120x90 image"):
        find_all.detect(context, prepared, prompts(neg=[(500, 5)], box=((10, 10), (60, 50))))
    assert find_all.detect(context, prepared, prompts(box=((10, 10), (60, 50))))


def test_find_all_without_sam3_refuses_naming_the_detector(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="needs SAM 3 as the detector .*finds objects by text only"):
        load_with_cvat_cli("ml_backend.cvat.interaction", f"detector=str:{tiny_models['detector']}",
                           "find_all=bool:true", "device=str:cpu")
