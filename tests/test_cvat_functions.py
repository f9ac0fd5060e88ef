"""CVAT: the nuclio functions through nuclio's test platform, the cvat-sdk auto-annotation and interaction modules,
`prelabel cvat spec`, and deploy.sh, offline on tiny models."""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cvat_sdk import models
from cvat_sdk.auto_annotation import DetectionFunctionContext, InteractionFunctionContext, InteractionPrompts
from cvat_sdk.auto_annotation.driver import _AnnotationMapper
from cvat_sdk.masks import decode_mask
from nuclio_sdk import Event
from nuclio_sdk.test import Platform
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.cvat.auto_annotation import parse_shapes
from ml_backend.cvat.serverless import SHAPE_ENV, DetectorFunction
from ml_backend.errors import ConfigError
from ml_backend.ontology import PromptsFile
from ml_backend.engine import Engine
from ml_backend.settings import Settings, environment_variables

from .conftest import encode, make_image

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ROOT / "cvat_nuclio"
LABELS = ["Bottle", "Can", "Person", "Car"]  # cvat_nuclio/grounding_dino/prompts.yaml (prompts/example.yaml)


def b64(image) -> str:
    return base64.b64encode(encode(image)).decode()


def load_main(function: str):
    """Import cvat_nuclio/<function>/main.py as nuclio does (each function's main.py is its own module)."""
    name = f"cvat_nuclio_{function}_main"
    spec = importlib.util.spec_from_file_location(name, FUNCTIONS / function / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Function:
    """One deployed function: its handler, called through nuclio's platform (init_context on the first call)."""

    def __init__(self, function: str):
        self.module = load_main(function)
        self.platform = Platform()

    def __call__(self, body, content_type="application/json"):
        response = self.platform.call_handler(self.module.handler, Event(body=body, content_type=content_type))
        assert response.content_type == "application/json"
        return response.status_code, json.loads(response.body)

    @property
    def function(self):
        return self.platform._get_handler_context(self.module.handler).user_data.function


@pytest.fixture(scope="module")
def function_env(tiny_models, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRELABEL_DETECTOR", str(tiny_models["detector"]))
        mp.setenv("PRELABEL_SEGMENTER", str(tiny_models["segmenter"]))
        mp.setenv("MODEL_DIR", str(tmp_path_factory.mktemp("model-dir")))
        mp.setenv("PRELABEL_DEVICE", "cpu")
        mp.delenv("PRELABEL_PROMPTS", raising=False)
        yield mp


@pytest.fixture(scope="module")
def detector(function_env):
    function_env.setenv(SHAPE_ENV, "rectangle")
    return Function("grounding_dino")


@pytest.fixture(scope="module")
def interactor(function_env):
    return Function("sam")


def function_yaml(function: str, name: str = "function.yaml") -> dict:
    return yaml.safe_load((FUNCTIONS / function / name).read_text())


# --- nuclio detector -------------------------------------------------------------------------------------------


def test_detector_returns_rectangles_for_the_labels_of_its_spec(detector):
    image = make_image(160, 120, seed=3)
    status, shapes = detector({"image": b64(image), "threshold": 0.0})
    assert status == 200 and shapes
    spec = json.loads(function_yaml("grounding_dino")["metadata"]["annotations"]["spec"])
    assert [s["name"] for s in spec] == LABELS and detector.function.shape == "rectangle"
    for shape in shapes:
        assert shape["type"] == "rectangle" and shape["label"] in LABELS
        assert 0 <= float(shape["confidence"]) <= 1 and isinstance(shape["confidence"], str)
        x1, y1, x2, y2 = shape["points"]
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120


def test_detector_threshold_and_label_subset(detector):
    image = b64(make_image(160, 120, seed=3))
    assert detector({"image": image, "threshold": 1.0}) == (200, [])
    status, everything = detector({"image": image, "threshold": 0.0})
    status, cars = detector({"image": image, "threshold": 0.0, "labels": ["car"]})
    assert status == 200 and cars and {s["label"] for s in cars} == {"Car"}
    assert len(cars) <= len(everything)
    status, default = detector({"image": image})  # no threshold: the prompts file's per-label thresholds
    assert status == 200 and len(default) <= len(everything)


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"threshold": 0.5}, "image: Field required"),
        ({"image": "not base64 !!"}, "'image' is not valid base64"),
        ({"image": base64.b64encode(b"hello, not an image").decode()}, "is not an image of a known format"),
        ({"image": ""}, "is empty"),
        ({"image": "aGVsbG8=", "threshold": "high"}, "threshold: Input should be a valid number"),
        ({"image": "aGVsbG8=", "threshold": 3}, "threshold: Input should be less than or equal to 1"),
        (b"{not json", "the request body is not JSON"),
        ([1, 2], "must be a JSON object, got list"),
    ],
)
def test_detector_answers_bad_bodies_with_400_naming_the_problem(detector, body, problem):
    status, answer = detector(body)
    assert status == 400 and problem in answer["error"]["message"], answer


def test_detector_names_unknown_labels_and_keeps_serving(detector):
    image = b64(make_image(80, 60))
    status, answer = detector({"image": image, "labels": ["Car", "Bike"]})
    assert status == 400 and "['Bike']" in answer["error"]["message"] and "Bottle" in answer["error"]["message"]
    assert detector({"image": image, "threshold": 0.0})[0] == 200


def test_mask_detector_masks_decode_back_to_the_pipelines_masks(base_pipeline, tmp_path):
    prompts = PromptsFile.load(FUNCTIONS / "grounding_dino" / "prompts.yaml")
    pipeline = Engine(base_pipeline.detector, base_pipeline.segmenter, prompts, Settings(model_dir=tmp_path))
    image = make_image(160, 120, seed=3)
    array = np.array(image)
    for shape_type in ("mask", "polygon"):
        shapes = DetectorFunction(pipeline, shape_type)({"image": b64(image), "labels": ["Car"]})
        expected = pipeline.detect([array], pipeline.ontology(["Car"]), masks=True)[0]
        assert len(shapes) == len(expected) > 0
        for shape, mask in zip(shapes, expected.mask):
            assert shape["type"] == shape_type and len(shape["points"]) >= 6
            if shape_type == "mask" and mask.any():
                assert (decode_mask(shape["mask"], image_width=160, image_height=120) == mask).all()


def test_mask_detector_needs_a_segmenter(base_pipeline, tmp_path):
    pipeline = Engine(base_pipeline.detector, None, PromptsFile(labels={"Car": "car"}), Settings(model_dir=tmp_path))
    with pytest.raises(ConfigError, match="without a segmenter"):
        DetectorFunction(pipeline, "mask")
    with pytest.raises(ConfigError, match="not one of"):
        DetectorFunction(pipeline, "ellipse")


# --- nuclio interactor -----------------------------------------------------------------------------------------


def test_interactor_returns_a_full_size_mask_and_its_polygon(interactor):
    status, answer = interactor({"image": b64(make_image(120, 90, seed=4)), "pos_points": [[30, 40]], "neg_points": []})
    assert status == 200
    mask = np.array(answer["mask"])
    assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 1}
    assert 0 <= float(answer["confidence"]) <= 1
    for x, y in answer["points"]:
        assert 0 <= x <= 120 and 0 <= y <= 90
    assert mask.any() == bool(answer["points"])


def test_interactor_takes_a_box_with_or_without_clicks_and_reuses_the_embedding(interactor):
    image = b64(make_image(120, 90, seed=5))
    first = interactor({"image": image, "pos_points": [], "neg_points": [], "obj_bbox": [[100, 80], [10, 5]]})
    assert first[0] == 200 and np.array(first[1]["mask"]).shape == (90, 120)
    cache = interactor.function.engine.segmenter.cache_info()
    status, _ = interactor({"image": image, "pos_points": [[50, 40]], "neg_points": [[5, 5]], "obj_bbox": [[10, 5], [100, 80]]})
    after = interactor.function.engine.segmenter.cache_info()
    assert status == 200 and after["hits"] == cache["hits"] + 1 and after["misses"] == cache["misses"]


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"pos_points": [[1, 1]]}, "image: Field required"),
        ({"image": "IMAGE", "pos_points": [], "neg_points": [[3, 3]]}, "nothing to segment"),
        ({"image": "IMAGE", "pos_points": [[500, 10]]}, "pos_points[0] = (500, 10) lies outside the 120x90 image"),
        ({"image": "IMAGE", "pos_points": [[1, 1]], "obj_bbox": [[0, 0], [10, -4]]}, "obj_bbox[1] = (10, -4) lies outside"),
        ({"image": "IMAGE", "pos_points": [[1, 2, 3]]}, "pos_points.0"),
        ({"image": "%%%", "pos_points": [[1, 1]]}, "'image' is not valid base64"),
    ],
)
def test_interactor_answers_bad_bodies_with_400_naming_the_problem(interactor, body, problem):
    if body.get("image") == "IMAGE":
        body = body | {"image": b64(make_image(120, 90))}
    status, answer = interactor(body)
    assert status == 400 and problem in answer["error"]["message"], answer
    assert interactor({"image": b64(make_image(120, 90)), "pos_points": [[5, 5]]})[0] == 200


# --- function.yaml, prelabel cvat spec, deploy.sh ----------------------------------------------------------------


@pytest.mark.parametrize("function, kind", [("grounding_dino", "detector"), ("sam", "interactor")])
def test_function_yamls_are_what_cvat_and_nuclio_read(function, kind):
    cpu, gpu = function_yaml(function), function_yaml(function, "function-gpu.yaml")
    for doc in (cpu, gpu):
        annotations = doc["metadata"]["annotations"]
        assert annotations["type"] == kind and doc["metadata"]["namespace"] == "cvat"
        assert doc["spec"]["handler"] == "main:handler" and doc["spec"]["runtime"].startswith("python:3.1")
        env = {e["name"]: str(e["value"]) for e in doc["spec"]["env"]}
        assert set(env) <= environment_variables() | {SHAPE_ENV}
        fetch = [d["value"] for d in doc["spec"]["build"]["directives"]["postCopy"] if d["kind"] == "RUN"]
        assert len(fetch) == 1 and fetch[0].startswith("prelabel fetch")
        if kind == "interactor":
            assert annotations["startswith_box_optional"] is True and "version" not in annotations
            assert f"--segmenter {env['PRELABEL_SEGMENTER']}" in fetch[0]
        else:
            assert json.loads(annotations["spec"]) == [
                {"id": i, "name": n, "type": env[SHAPE_ENV]} for i, n in enumerate(LABELS)
            ]
            assert ("--segmenter none" in fetch[0]) == (env[SHAPE_ENV] == "rectangle")
    assert cpu["spec"]["build"]["baseImage"] == "prelabel:cpu" and gpu["spec"]["build"]["baseImage"] == "prelabel:gpu"
    assert gpu["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1 and "resources" not in cpu["spec"]
    assert cpu["metadata"]["annotations"] == gpu["metadata"]["annotations"]
    assert callable(getattr(load_main(function), "handler")) and callable(getattr(load_main(function), "init_context"))


def test_cvat_spec_writes_labels_into_function_yamls_keeping_comments(tmp_path):
    target = tmp_path / "grounding_dino"
    shutil.copytree(FUNCTIONS / "grounding_dino", target)
    prompts = tmp_path / "shop.yaml"
    prompts.write_text("labels:\n  Shelf: [shelf]\n  Price tag: {prompts: [price tag, price label], threshold: 0.3}\n")
    result = CliRunner().invoke(app, ["cvat", "spec", "--prompts", str(prompts), "--function-dir", str(target), "--shape", "mask"])
    assert result.exit_code == 0, result.output
    for name in ("function.yaml", "function-gpu.yaml"):
        text = (target / name).read_text()
        doc = yaml.safe_load(text)
        assert json.loads(doc["metadata"]["annotations"]["spec"]) == [
            {"id": 0, "name": "Shelf", "type": "mask"}, {"id": 1, "name": "Price tag", "type": "mask"}
        ]
        assert {"name": SHAPE_ENV, "value": "mask"} in doc["spec"]["env"]
        assert "--segmenter none" not in text and "# weights are fetched once" in text
    assert (target / "prompts.yaml").read_text() == prompts.read_text()
    # the committed files are what the command writes for the example prompts
    result = CliRunner().invoke(app, ["cvat", "spec", "--prompts", str(ROOT / "prompts/example.yaml"), "--function-dir", str(target)])
    assert result.exit_code == 0
    for name in ("function.yaml", "function-gpu.yaml", "prompts.yaml"):
        assert (target / name).read_text() == (FUNCTIONS / "grounding_dino" / name).read_text(), name


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--shape", "ellipse"], "shape 'ellipse' is not one of"),
        (["--function-dir", "cvat_nuclio/sam"], "is not a detector function"),
        (["--prompts", "EMPTY"], "has no labels"),
    ],
)
def test_cvat_spec_refuses_what_it_cannot_write(tmp_path, args, problem):
    shutil.copytree(FUNCTIONS, tmp_path / "cvat_nuclio")
    (tmp_path / "empty.yaml").write_text("box_threshold: 0.3\n")
    base = {"--prompts": str(ROOT / "prompts/example.yaml"), "--function-dir": str(tmp_path / "cvat_nuclio/grounding_dino")}
    given = dict(zip(args[::2], args[1::2]))
    given = {k: str(tmp_path / v) if k == "--function-dir" else (str(tmp_path / "empty.yaml") if v == "EMPTY" else v)
             for k, v in given.items()}
    argv = [x for k, v in (base | given).items() for x in (k, v)]
    result = CliRunner().invoke(app, ["cvat", "spec", *argv])
    assert result.exit_code == 2 and problem in result.output, result.output


def fake_tools(tmp_path: Path, tools=("docker", "nuctl")) -> tuple[dict, Path]:
    """docker and nuctl stand-ins that record their arguments (no Docker engine here)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    for tool in tools:
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    return env, log


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deploy_script_builds_the_base_image_and_deploys_both_functions_with_nuctl(tmp_path, variant):
    env, log = fake_tools(tmp_path)
    args = ["--gpu"] if variant == "gpu" else []
    run = subprocess.run([str(FUNCTIONS / "deploy.sh"), *args], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    dockerfile = "Dockerfile.gpu" if variant == "gpu" else "Dockerfile"
    assert calls[0] == f"docker build -f {ROOT}/docker/{dockerfile} -t prelabel:{variant} {ROOT}"
    config = "function-gpu.yaml" if variant == "gpu" else "function.yaml"
    deploys = [c for c in calls if c.startswith("nuctl deploy")]
    assert [c.split("--path ")[1].split()[0] for c in deploys] == [str(FUNCTIONS / "grounding_dino"), str(FUNCTIONS / "sam")]
    for call in deploys:
        assert f"/{config} --platform local" in call and "--project-name cvat" in call and '"network": "cvat_cvat"' in call
    assert calls[-1] == "nuctl get function --platform local"


def test_deploy_script_says_what_is_missing(tmp_path):
    env, _ = fake_tools(tmp_path, tools=("docker",))
    run = subprocess.run([str(FUNCTIONS / "deploy.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "nuctl is not on PATH" in run.stderr
    env, _ = fake_tools(tmp_path / "again")
    bare = tmp_path / "detector"
    bare.mkdir()
    shutil.copy(FUNCTIONS / "grounding_dino" / "function.yaml", bare)
    run = subprocess.run([str(FUNCTIONS / "deploy.sh"), str(bare)], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "no prompts.yaml; run: prelabel cvat spec" in run.stderr


def test_fetch_resolves_the_models_and_fails_in_one_line_without_them(tiny_models, tmp_path):
    result = CliRunner().invoke(app, ["fetch", "--detector", str(tiny_models["detector"]), "--segmenter", "none"])
    assert result.exit_code == 0 and result.output.strip() == f"detector: {tiny_models['detector']} -> {tiny_models['detector']}"
    result = CliRunner().invoke(app, ["fetch", "--detector", "none", "--segmenter", "nobody/no-such-sam"], env={"MODEL_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "model 'nobody/no-such-sam' is not in the local cache" in result.output


# --- cvat-sdk auto-annotation and interaction functions ----------------------------------------------------------


class Context(DetectionFunctionContext):
    def __init__(self, conf_threshold=None, conv_mask_to_poly=False):
        self._conf, self._poly = conf_threshold, conv_mask_to_poly

    frame_name = property(lambda self: "frame_000001.png")
    conf_threshold = property(lambda self: self._conf)
    conv_mask_to_poly = property(lambda self: self._poly)


def load_with_cvat_cli(module: str, *params: str):
    """Load a function module the way `cvat-cli ... --function-module M -p NAME=TYPE:VALUE` does."""
    from cvat_cli._internal.common import FunctionLoader
    from cvat_cli._internal.parsers import parse_function_parameter

    return FunctionLoader(module, None, dict(map(parse_function_parameter, params))).load()


@pytest.fixture(scope="module")
def auto_annotation(tiny_models):
    return lambda *params: load_with_cvat_cli(
        "ml_backend.cvat.auto_annotation",
        f"prompts=str:{ROOT / 'prompts/example.yaml'}",
        f"detector=str:{tiny_models['detector']}",
        f"segmenter=str:{tiny_models['segmenter']}",
        "device=str:cpu",
        *params,
    )


def remap(function, shapes, conv_mask_to_poly=False, ds_type="any"):
    """Run the function's output through cvat-sdk's own validation against a task with the same label names."""
    ds_labels = [models.PatchedLabelRequest(name=n, id=100 + i, type=ds_type, attributes=[], sublabels=[])
                 for i, n in enumerate(LABELS)]
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, ds_labels,
                               allow_unmatched_labels=False, conv_mask_to_poly=conv_mask_to_poly)
    return mapper.validate_and_remap(shapes, 7)[1]


def test_auto_annotation_module_detects_rectangles_cvat_accepts(auto_annotation):
    function = auto_annotation()
    assert [(label.name, label.type) for label in function.spec.labels] == [(n, "rectangle") for n in LABELS]
    assert function.engine.segmenter is None, "boxes only: SAM is not loaded"
    image = make_image(160, 120, seed=3)
    shapes = function.detect(Context(conf_threshold=0.0), image)
    assert shapes and all(s.type.value == "rectangle" for s in shapes)
    for s in shapes:
        assert 0 <= s.points[0] <= s.points[2] <= 160 and 0 <= s.score <= 1
    remapped = remap(function, shapes, ds_type="rectangle")
    assert len(remapped) == len(shapes) and {s.label_id for s in remapped} <= set(range(100, 104))
    assert all(s.frame == 7 and s.source == "auto" for s in remapped)
    assert function.detect(Context(conf_threshold=1.0), image) == []


def test_auto_annotation_module_returns_masks_or_polygons_per_label_type(auto_annotation, base_pipeline):
    function = auto_annotation("shape=str:Car=mask,bottle=polygon")
    types = {label.name: label.type for label in function.spec.labels}
    assert types == {"Bottle": "polygon", "Can": "rectangle", "Car": "mask", "Person": "rectangle"}
    image = make_image(160, 120, seed=5)  # the tiny detector finds a Bottle in it (its polygon)
    shapes = function.detect(Context(conf_threshold=0.0), image)
    by_type = {}
    for s in shapes:
        by_type.setdefault(s.type.value, []).append(s)
    assert set(by_type) == {"rectangle", "mask", "polygon"}
    names = {i: label.name for i, label in enumerate(function.spec.labels)}
    assert {names[s.label_id] for s in by_type["mask"]} == {"Car"}
    for s in by_type["mask"]:
        mask = decode_mask(s.points, image_width=160, image_height=120)
        assert mask.shape == (120, 160) and mask.any()
    remap(function, shapes)
    polygons = function.detect(Context(conf_threshold=0.0, conv_mask_to_poly=True), image)
    assert "mask" not in {s.type.value for s in polygons} and len(polygons) == len(shapes)
    remap(function, polygons, conv_mask_to_poly=True)


def test_auto_annotation_module_names_bad_parameters(auto_annotation):
    with pytest.raises(ConfigError, match="shape for unknown label 'Bike'"):
        auto_annotation("shape=str:Bike=mask")
    with pytest.raises(ConfigError, match="no labels"):
        load_with_cvat_cli("ml_backend.cvat.auto_annotation", "detector=str:whatever")
    assert parse_shapes("mask", ["A", "B"]) == {"A": "mask", "B": "mask"}
    assert parse_shapes("b=polygon", ["A", "B"]) == {"A": "rectangle", "B": "polygon"}


class Prompts(InteractionPrompts):
    def __init__(self, pos=(), neg=(), box=None):
        self._pos, self._neg, self._box = tuple(pos), tuple(neg), box

    pos_points = property(lambda self: self._pos)
    neg_points = property(lambda self: self._neg)
    bounding_box = property(lambda self: self._box)


def test_interaction_function_encodes_once_and_returns_a_mask_with_confidence(tiny_models):
    function = load_with_cvat_cli(
        "ml_backend.cvat.interaction", f"segmenter=str:{tiny_models['segmenter']}", "device=str:cpu"
    )
    assert function.spec.min_bounding_boxes == 0 and function.spec.min_neg_points == 0
    context = type("Context", (InteractionFunctionContext,), {})()  # what the agent passes: no members yet
    image = make_image(120, 90, seed=6)
    prepared = function.preprocess_image(context, image)
    assert function.engine.segmenter.cache_info()["misses"] == 1
    for prompts in (Prompts(pos=[(30, 30)]), Prompts(box=((5, 5), (100, 80))), Prompts(pos=[(30, 30)], neg=[(2, 2)])):
        shapes = function.detect(context, prepared, prompts)
        assert len(shapes) <= 1
        for shape in shapes:
            assert shape.type == "mask" and decode_mask(shape.points, image_width=120, image_height=90).any()
            assert shape.attributes[0].spec_id == 0 and 0 <= float(shape.attributes[0].value) <= 1
    assert function.engine.segmenter.cache_info()["misses"] == 1, "clicks reuse the embedding"
    assert function.detect(context, prepared, Prompts()) == []


def test_the_base_images_the_functions_build_on_carry_the_cvat_extra():
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert 'pip install ".[sam-original,cvat]"' in (ROOT / "docker" / dockerfile).read_text()
