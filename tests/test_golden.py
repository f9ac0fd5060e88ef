"""Golden outputs: a fixed set of requests through every entrance (Label Studio /predict over HTTP, the CVAT nuclio
handlers, the cvat-sdk auto-annotation module, folder mode) gives the JSON recorded in `golden/outputs.json`.

The file was recorded before the prediction engine moved into the core; a change that alters what a user's tool
receives fails here. Re-record only on purpose: `PRELABEL_RECORD_GOLDEN=1 pytest tests/test_golden.py`."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from .conftest import LEGACY_TOKEN, RunningServer, encode, make_image
from .test_cvat_functions import Context, Function, load_with_cvat_cli
from .test_classification import LABEL_SET, LABEL_SET_PROMPTS, MULTI, PRODUCT, PRODUCT_PROMPTS, TWO_STAGE

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"
RECORD = os.environ.get("PRELABEL_RECORD_GOLDEN") == "1"
FLOAT_TOLERANCE = 1e-4

BOXES_MASKS = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Car" predicted_values="car,truck"/><Label value="Person"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Person"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""
SYNONYMS = dict(box_threshold=0.05, text_threshold=0.0,
                labels={"Car": ["car", "red car", "truck"], "Person": {"prompts": ["person", "man"], "threshold": 0.1}})
UPLOADS = ["img0.png", "img1.png", "img2.png"]


def uploads(names=UPLOADS, start=1):
    return [{"id": start + i, "data": {"image": f"/data/upload/{name}"}} for i, name in enumerate(names)]


def data_uri(width, height, seed) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return "data:image/png;base64," + base64.b64encode(encode(Image.fromarray(pixels))).decode()


def normalise(value, ids=None):
    """Region ids are random: each becomes its order of appearance (links between results are kept)."""
    ids = {} if ids is None else ids
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ("id", "parentID") and isinstance(v, str):
                v = ids.setdefault(v, f"region-{len(ids)}")
            out[k] = normalise(v, ids)
        return out
    if isinstance(value, (list, tuple)):
        if len(value) > 32 and _integers(value):  # RLE and mask rows: exact, so a digest says as much
            return {"integers": len(value), "sha256": hashlib.sha256(json.dumps(value).encode()).hexdigest()}
        return [normalise(v, ids) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _integers(value) -> bool:
    return all(isinstance(v, int) or (isinstance(v, list) and _integers(v)) for v in value)


def assert_same(got, want, where="$"):
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), f"{where}: {got!r} != {want!r}"
        assert math.isclose(got, want, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {len(got)} items, recorded {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def make_app(settings):
    """The Label Studio server as `prelabel serve` builds it."""
    from ml_backend.labelstudio.server import create_app
    from ml_backend.engine import Engine

    return create_app(Engine.from_settings(settings))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from ml_backend.models.tiny import write_tiny_classifier

    return write_tiny_classifier(tmp_path_factory.mktemp("golden-classifier") / "clip")


@pytest.fixture(scope="module")
def golden_server(tiny_models, tiny_classifier, ls_host, image_dir, tmp_path_factory):
    """One backend per prompts file, built from settings the way `prelabel serve` does."""
    from ml_backend.settings import Settings

    root = tmp_path_factory.mktemp("golden")
    servers = {}

    def start(name: str, prompts: dict | None):
        if name not in servers:
            path = None
            if prompts is not None:
                path = root / f"{name}.yaml"
                path.write_text(yaml.safe_dump(prompts))
            settings = Settings(detector=str(tiny_models["detector"]), segmenter=str(tiny_models["segmenter"]),
                                classifier=str(tiny_classifier), prompts=path, model_dir=root / name,
                                label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN,
                                local_files_document_root=image_dir, max_image_pixels=5_000_000)
            servers[name] = RunningServer(make_app(settings))
        return servers[name]

    yield start
    for server in servers.values():
        server.stop()


LS_CASES = {
    "ls_boxes_masks_polygons": (None, BOXES_MASKS, uploads() + [
        {"id": 4, "data": {"image": "/data/local-files/?d=exif.jpg"}},
        {"id": 5, "data": {"image": data_uri(1, 40, 5)}},
        {"id": 6, "data": {"image": data_uri(200, 3, 6)}},
        {"id": 7, "data": {"picture": "/data/upload/img0.png"}},
        {"id": 8, "data": {"image": "/data/upload/corrupt.png"}},
    ]),
    "ls_synonyms_and_thresholds": (SYNONYMS, BOXES_MASKS, uploads()),
    "ls_two_stage_and_choices": (dict(box_threshold=0.0, text_threshold=0.0), TWO_STAGE, uploads()),
    "ls_multiple_choices": (None, MULTI, uploads()),
    "ls_template_from_task_data": ({"labels": PRODUCT_PROMPTS}, PRODUCT, [
        {"id": 1, "data": {"image": "/data/upload/img0.png", "product_name": "cola"}},
        {"id": 2, "data": {"image": "/data/upload/img1.png"}},
    ]),
    "ls_two_stage_label_set": (LABEL_SET_PROMPTS, LABEL_SET, uploads()),
}

POINT = {"type": "keypointlabels", "original_width": 160, "original_height": 90, "is_positive": True,
         "value": {"x": 30.0, "y": 40.0, "keypointlabels": ["Car"]}, "to_name": "image", "from_name": "kp"}
NEGATIVE = POINT | {"is_positive": False, "value": {"x": 70.0, "y": 60.0, "keypointlabels": ["Car"]}}
BOX = {"type": "rectanglelabels", "original_width": 160, "original_height": 90, "to_name": "image",
       "from_name": "label", "value": {"x": 10.0, "y": 10.0, "width": 50.0, "height": 60.0, "rectanglelabels": ["Person"]}}
TEXT = {"type": "textarea", "to_name": "image", "from_name": "prompt", "value": {"text": ["Person: man"]}}
INTERACTIVE_CASES = {"ls_click": [POINT], "ls_clicks_positive_and_negative": [POINT, NEGATIVE],
                     "ls_box_prompt": [BOX], "ls_text_prompt": [TEXT]}


def cvat_cases(tiny_models, tmp_path: Path) -> dict:
    out = {}
    images = {"small": make_image(100, 70, 1), "wide": make_image(160, 90, 0), "tall": make_image(40, 120, 2)}
    bodies = {k: base64.b64encode(encode(im)).decode() for k, im in images.items()}
    prompts = tmp_path / "cvat-prompts.yaml"
    prompts.write_text(yaml.safe_dump(SYNONYMS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRELABEL_DETECTOR", str(tiny_models["detector"]))
        mp.setenv("PRELABEL_SEGMENTER", str(tiny_models["segmenter"]))
        mp.setenv("PRELABEL_PROMPTS", str(prompts))
        mp.setenv("MODEL_DIR", str(tmp_path / "model-dir"))
        mp.setenv("PRELABEL_DEVICE", "cpu")
        for shape in ("rectangle", "mask", "polygon"):
            mp.setenv("PRELABEL_CVAT_SHAPE", shape)
            function = Function("grounding_dino")
            out[f"cvat_nuclio_detector_{shape}"] = {
                name: function({"image": body, "threshold": 0.05}) for name, body in bodies.items()}
        function = Function("sam")
        out["cvat_nuclio_interactor"] = {
            "click": function({"image": bodies["wide"], "pos_points": [[40, 30]], "neg_points": []}),
            "clicks_and_box": function({"image": bodies["wide"], "pos_points": [[40, 30]], "neg_points": [[100, 60]],
                                        "obj_bbox": [[10, 5], [120, 80]]}),
            "box": function({"image": bodies["tall"], "pos_points": [], "obj_bbox": [[5, 10], [35, 100]]}),
        }
    for shape in ("rectangle", "mask"):
        function = load_with_cvat_cli("ml_backend.cvat.auto_annotation", f"prompts=str:{prompts}",
                                      f"detector=str:{tiny_models['detector']}",
                                      f"segmenter=str:{tiny_models['segmenter']}", "device=str:cpu",
                                      f"shape=str:{shape}")
        out[f"cvat_sdk_auto_annotation_{shape}"] = {
            name: [s.to_dict() for s in function.detect(Context(conf_threshold=0.05), im)]
            for name, im in images.items()}
    return out


def folder_case(tiny_models, tmp_path: Path) -> dict:
    from ml_backend.cli import app

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, (w, h, seed) in {"a.png": (160, 90, 0), "sub/b.png": (120, 200, 1), "c.png": (64, 40, 2)}.items():
        (folder / name).write_bytes(encode(make_image(w, h, seed)))
    prompts = tmp_path / "folder-prompts.yaml"
    prompts.write_text(yaml.safe_dump(SYNONYMS))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["annotate", str(folder), "--out", str(out), "--prompts", str(prompts),
                                      "--detector", str(tiny_models["detector"]),
                                      "--segmenter", str(tiny_models["segmenter"]), "--device", "cpu"],
                                env={"MODEL_DIR": str(tmp_path / "model-dir"), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path)})
    return {"exit_code": result.exit_code,
            "tasks": json.loads((out / "tasks.json").read_text()),
            "coco": json.loads((out / "coco.json").read_text()),
            "label_config": (out / "label_config.xml").read_text()}


@pytest.fixture(scope="module")
def outputs(golden_server, tiny_models, tmp_path_factory, http_module):
    got = {}
    for name, (prompts, config, tasks) in LS_CASES.items():
        server = golden_server(name, prompts)
        response = http_module.post(f"{server.url}/predict",
                                    json={"tasks": tasks, "label_config": config, "project": "1.1700000000"})
        got[name] = {"status": response.status_code, "body": response.json()}
    server = golden_server("ls_boxes_masks_polygons", None)
    for name, regions in INTERACTIVE_CASES.items():
        body = {"tasks": uploads(["img0.png"]), "label_config": BOXES_MASKS, "project": "1.1700000000",
                "params": {"context": {"result": regions}}}
        response = http_module.post(f"{server.url}/predict", json=body)
        got[name] = {"status": response.status_code, "body": response.json()}
    tmp = tmp_path_factory.mktemp("golden-cvat")
    got |= cvat_cases(tiny_models, tmp)
    got["folder_mode"] = folder_case(tiny_models, tmp)
    return normalise(got)


@pytest.fixture(scope="module")
def http_module():
    import httpx

    with httpx.Client(timeout=120) as client:
        yield client


def test_every_entrance_answers_as_recorded(outputs):
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(outputs, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(outputs) == sorted(want)
    for name in want:
        assert_same(outputs[name], want[name], name)


def test_the_recording_is_not_trivial():
    """The cases must exercise what they claim: boxes, masks, choices, per-task errors, shapes."""
    want = json.loads(GOLDEN.read_text())
    batch = want["ls_boxes_masks_polygons"]["body"]["results"]
    assert len(batch) == 8
    kinds = {r["type"] for e in batch if "result" in e for r in e["result"]}
    assert {"rectanglelabels", "brushlabels", "polygonlabels"} <= kinds
    assert sum("error" in e for e in batch) >= 2
    choices = want["ls_two_stage_and_choices"]["body"]["results"]
    assert any(r["type"] == "choices" and "id" in r for e in choices for r in e["result"])
    for shape in ("rectangle", "mask", "polygon"):
        assert any(body for _, body in want[f"cvat_nuclio_detector_{shape}"].values())
    assert want["folder_mode"]["exit_code"] == 0 and want["folder_mode"]["coco"]["annotations"]
