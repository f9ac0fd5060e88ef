"""Distillation: split, a real (short) training run, ONNX parity, resume after a crash, early stop, serving the
student to Label Studio and CVAT, and START_TRAINING from a real Label Studio."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.distill.dataset import DistillError, Example, TensorSet, stratified_split, training_examples
from ml_backend.distill.synthetic import SHAPES, generate
from ml_backend.distill.train import TrainOptions, train
from ml_backend.evaluation import coco_evaluate
from ml_backend.models.student import StudentConfig, StudentDetector
from ml_backend.ontology import PromptsFile
from ml_backend.types import LabeledImage, make_detections

from .conftest import LEGACY_TOKEN, RunningServer

pytestmark = pytest.mark.timeout(900)  # the module's student trains for about a minute on 2 quiet cores
SIZE = 96
TRAIN_ARGS = ["--image-size", str(SIZE), "--pretrained", "scratch", "--batch-size", "8", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, list[LabeledImage]]:
    root = tmp_path_factory.mktemp("shapes")
    return root, generate(root, 160, seed=3, size=(SIZE, SIZE))


def distill_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--coco", str(root / "annotations.json"), "--images", str(root / "images"), "--out", str(out),
            *TRAIN_ARGS, *extra]


def write_teacher(root: Path) -> Path:
    """A teacher that finds every circle and square exactly and never a triangle: AP 1, 1 and 0."""
    doc = json.loads((root / "annotations.json").read_text())
    triangle = next(c["id"] for c in doc["categories"] if c["name"] == "triangle")
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in doc["annotations"] if a["category_id"] != triangle]
    path = root / "teacher.json"
    path.write_text(json.dumps(results))
    return path


@pytest.fixture(scope="module")
def student(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """One real training run through the CLI, killed (SIGKILL) once its first checkpoint is written and then
    finished by running the same command again."""
    root, _ = shapes
    out = tmp_path_factory.mktemp("student")
    cmd = distill_cmd(root, out, "--epochs", "16", "--predictions", str(write_teacher(root)))
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "ml_backend.cli", *cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (out / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


# -- split ------------------------------------------------------------------------------------------------------


def example(key: str, *names: str, source: str = "annotation") -> Example:
    det = make_detections([[0, 0, 10, 10]] * len(names), [1.0] * len(names), [0] * len(names), list(names))
    record = LabeledImage(key=key, image=f"{key}.png", width=10, height=10, annotations=det)
    return Example(record, det, source)


def test_the_split_is_repeatable_stratified_and_validates_on_human_labels_only():
    examples = [example(f"a{i}", "common") for i in range(40)] + [example(f"r{i}", "common", "rare") for i in range(5)]
    examples += [example("empty0"), example("empty1")] + [example(f"p{i}", "rare", source="prediction") for i in range(6)]
    train_a, val_a = stratified_split(examples, 0.2, seed=1)
    train_b, val_b = stratified_split(list(reversed(examples)), 0.2, seed=1)
    assert [e.record.key for e in val_a] == [e.record.key for e in val_b]
    assert [e.record.key for e in train_a] == [e.record.key for e in train_b]
    val_keys = {e.record.key for e in val_a}
    assert len([k for k in val_keys if k.startswith("a")]) == 8  # 20 % of the common-only images
    assert len([k for k in val_keys if k.startswith("r")]) == 1  # the rare label's stratum: round(1.0) images
    assert len([k for k in val_keys if k.startswith("empty")]) == 1  # at least one of a stratum of two
    assert not [k for k in val_keys if k.startswith("p")]  # accepted predictions only ever train
    assert len(train_a) + len(val_a) == len(examples)
    other_seed = {e.record.key for e in stratified_split(examples, 0.2, seed=2)[1]}
    assert other_seed != val_keys
    with pytest.raises(DistillError, match="between 0 and 1"):
        stratified_split(examples, 1.5)


def test_accepted_predictions_train_only_where_nobody_annotated():
    det = make_detections([[0, 0, 5, 5], [5, 5, 9, 9]], [0.9, 0.3], [0, 0], ["a", "a"])
    annotated = LabeledImage("1", "1.png", 10, 10, predictions=det, annotations=det[:1])
    predicted_only = LabeledImage("2", "2.png", 10, 10, predictions=det)
    nothing = LabeledImage("3", "3.png", 10, 10)
    assert [e.record.key for e in training_examples([annotated, predicted_only, nothing])] == ["1"]
    examples = training_examples([annotated, predicted_only, nothing], accept_predictions=0.5)
    assert [(e.record.key, e.source, len(e.truth)) for e in examples] == [("1", "annotation", 1), ("2", "prediction", 1)]


# -- a real training run ----------------------------------------------------------------------------------------


def test_a_short_training_run_beats_chance_by_a_wide_margin_and_resumed_after_a_kill(shapes, student):
    root, records = shapes
    out, report = student
    assert report["training"]["resumed_from"] >= 1  # the killed run's checkpoint was picked up
    assert report["data"]["train_images"] + report["data"]["val_images"] == len(records)
    val_keys = set(json.loads((out / "split.json").read_text())["val"])
    val = [r for r in records if r.key in val_keys]
    # chance: as many boxes as there are objects, placed and labelled at random
    rng = np.random.default_rng(0)
    guesses = []
    for r in val:
        n = len(r.annotations)
        xy = rng.uniform(0, SIZE * 0.6, (n, 2))
        wh = rng.uniform(SIZE * 0.1, SIZE * 0.4, (n, 2))
        k = rng.integers(0, 3, n)
        guesses.append(make_detections(np.hstack([xy, xy + wh]), rng.uniform(0, 1, n), k, [SHAPES[i] for i in k]))
    chance = coco_evaluate([r.annotations for r in val], guesses, list(SHAPES), [(SIZE, SIZE)] * len(val))
    assert chance.map50 < 0.05
    assert report["student"]["map50"] >= 0.3 and report["student"]["map50"] >= 10 * chance.map50
    assert report["student"]["runtime"] == "onnx" and report["student"]["images"] == len(val)
    teacher = report["teacher"]
    assert teacher["images"] == len(val) and teacher["missing_predictions"] == 0
    assert {n: teacher["per_label"][n]["ap"] for n in SHAPES} == {"circle": 1.0, "square": 1.0, "triangle": 0.0}
    assert teacher["map"] == pytest.approx(2 / 3, abs=1e-3)
    assert report["student_vs_teacher"]["map"] == pytest.approx(report["student"]["map"] - teacher["map"], abs=1e-3)
    card = (out / "MODEL_CARD.md").read_text()
    assert "| teacher (stored predictions) | 0.667 |" in card
    assert report["quality"]["passed"] and "Quality gate: passed (validation mAP@0.5 " in card  # both checks on
    assert ">= --min-map 0.2, >= 0.5 x the teacher's 0.667)" in card
    for needle in ("| circle |", "| square |", "| triangle |", "BSD-3-Clause", "onnxruntime", "from scratch",
                   f"{report['data']['train_images']} training images"):
        assert needle in card
    for name in ("train.json", "val.json"):
        doc = json.loads((out / name).read_text())
        assert [c["name"] for c in doc["categories"]] == list(SHAPES)
    assert len(json.loads((out / "val.json").read_text())["images"]) == len(val)


def test_the_onnx_model_gives_the_same_detections_as_pytorch(shapes, student):
    root, records = shapes
    out, report = student
    assert report["onnx_parity"]["ok"] and report["onnx_parity"]["max_abs_diff_scores"] < 1e-3
    images = [np.asarray(Image.open(r.image).convert("RGB")) for r in records[:6]]
    ontology = PromptsFile(box_threshold=0.2).ontology(list(SHAPES))
    onnx = StudentDetector(out, runtime="onnx").detect(images, ontology)
    eager = StudentDetector(out, runtime="torch").detect(images, ontology)
    assert sum(len(d) for d in onnx) > 0
    for a, b in zip(onnx, eager):
        assert list(a.data["class_name"]) == list(b.data["class_name"])
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=0.05)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-3)


def tensors(records: list[LabeledImage], size: int = 64) -> TensorSet:
    arrays = [np.asarray(Image.open(r.image).convert("RGB")) for r in records]
    return TensorSet.from_arrays(arrays, [r.annotations for r in records], list(SHAPES), size, augment=True)


@pytest.mark.slow  # three short trainings
def test_an_interrupted_training_resumes_exactly_where_it_stopped(shapes, tmp_path):
    _, records = shapes
    config = StudentConfig(classes=list(SHAPES), image_size=64, fpn_channels=32)
    options = TrainOptions(epochs=3, batch_size=8, patience=10)
    data, val = tensors(records[:24]), tensors(records[24:32])
    whole = train(tmp_path / "whole", config, data, val, options, torch.device("cpu"), show_progress=False)

    def crash_after_first(entry):
        if entry["epoch"] == 1:
            raise KeyboardInterrupt

    part = train(tmp_path / "part", config, data, val, options, torch.device("cpu"), on_epoch=crash_after_first,
                 show_progress=False)
    assert part.stopped == "interrupted" and len(part.history) == 1
    resumed = train(tmp_path / "part", config, data, val, options, torch.device("cpu"), show_progress=False)
    assert resumed.resumed_from == 1 and resumed.stopped == "completed"
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-4)
    assert [h["val_map"] for h in resumed.history] == pytest.approx([h["val_map"] for h in whole.history], abs=1e-3)
    other = StudentConfig(classes=list(SHAPES), image_size=64, fpn_channels=64)
    with pytest.raises(DistillError, match="another configuration"):
        train(tmp_path / "part", other, data, val, options, torch.device("cpu"), show_progress=False)


@pytest.mark.slow  # a short training
def test_training_stops_early_when_validation_stops_improving(shapes, tmp_path):
    _, records = shapes
    config = StudentConfig(classes=list(SHAPES), image_size=64, fpn_channels=32)
    options = TrainOptions(epochs=6, batch_size=8, lr=0.0, patience=2)  # nothing learns: no epoch beats the first
    result = train(tmp_path, config, tensors(records[:16]), tensors(records[16:20]), options, torch.device("cpu"),
                   show_progress=False)
    assert result.stopped == "early stop" and result.epochs_run == 3 and result.best_epoch == 1
    assert (tmp_path / "model.pt").exists() and (tmp_path / "student.json").exists()


# -- serving the student ----------------------------------------------------------------------------------------

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image">
    <Label value="Circle"/><Label value="Square"/><Label value="Triangle"/><Label value="Hexagon"/>
  </RectangleLabels>
</View>"""


def test_the_student_pre_annotates_label_studio_tasks_through_predict(shapes, student, tmp_path, http):
    from label_studio_sdk.label_interface import LabelInterface

    from ml_backend.labelstudio.server import create_app
    from ml_backend.engine import Engine
    from ml_backend.settings import Settings

    root, records = shapes
    out, _ = student
    settings = Settings(detector=f"student:{out}", segmenter="", model_dir=tmp_path, local_files_document_root=root,
                        prompts=None)
    pipeline = Engine.from_settings(settings)
    assert isinstance(pipeline.detector, StudentDetector) and pipeline.detector.runtime == "onnx"
    # a version computed without loading the student (as the Ray driver does) is the served one
    assert Engine.from_settings(settings, load=False).base_version == pipeline.base_version
    assert StudentDetector(out, runtime="torch").model_id == pipeline.detector.model_id
    from ml_backend.workbench import model_key

    assert model_key(f"student:{out}", tmp_path).startswith(f"{out.name}@")  # the workbench can compare students
    server = RunningServer(create_app(pipeline))
    try:
        val_keys = json.loads((out / "split.json").read_text())["val"][:4]
        tasks = [{"id": i + 1, "data": {"image": f"/data/local-files/?d=images/{key}"}} for i, key in enumerate(val_keys)]
        response = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": CONFIG})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 4 and all(r["model_version"].startswith("student-") for r in results)
        truth = {r.key: r.annotations for r in records}
        for key, prediction in zip(val_keys, results):
            assert LabelInterface(CONFIG).validate_prediction(prediction, return_errors=True) == []
            labels = {v["value"]["rectanglelabels"][0] for v in prediction["result"]}
            assert labels <= {"Circle", "Square", "Triangle"}  # the student knows no hexagon
            assert 0 <= prediction["score"] <= 1
        assert sum(len(r["result"]) for r in results) >= 0.5 * sum(len(truth[k]) for k in val_keys)
        health = http.get(f"{server.url}/health").json()
        assert health["detector"].startswith("student-")
    finally:
        server.stop()


def test_an_unknown_student_directory_is_named(tmp_path):
    from ml_backend.errors import ModelUnavailableError
    from ml_backend.models import build_detector

    with pytest.raises(ModelUnavailableError, match="student directory .*nowhere does not exist"):
        build_detector(f"student:{tmp_path / 'nowhere'}", tmp_path, torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="is not a student directory"):
        build_detector(f"student:{tmp_path / 'empty'}", tmp_path, torch.device("cpu"))


def test_the_student_answers_the_cvat_detector_function(shapes, student, tmp_path):
    import base64

    from .test_cvat_functions import Function

    root, records = shapes
    out, _ = student
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRELABEL_DETECTOR", f"student:{out}")
        mp.setenv("PRELABEL_SEGMENTER", "none")
        mp.setenv("MODEL_DIR", str(tmp_path))
        mp.setenv("PRELABEL_DEVICE", "cpu")
        prompts = tmp_path / "prompts.yaml"
        prompts.write_text("labels:\n  Circle: circle\n  Square: square\n  Triangle: triangle\n")
        mp.setenv("PRELABEL_PROMPTS", str(prompts))
        detector = Function("grounding_dino")
        image = base64.b64encode(Path(records[0].image).read_bytes()).decode()
        status, shapes_ = detector({"image": image, "threshold": 0.3})
    assert status == 200 and shapes_
    assert {s["label"] for s in shapes_} <= {"Circle", "Square", "Triangle"}
    assert all(s["type"] == "rectangle" for s in shapes_)


# -- the CLI and START_TRAINING ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, problem", [
    (["distill"], "give one source"),
    (["distill", "--coco", "x.json"], "--coco needs --images"),
    (["distill", "--coco", "x.json", "--images", ".", "--target", "yolov8"], "supported: fcos-resnet18"),
    (["distill", "--coco", "missing.json", "--images", "."], "missing.json"),
    (["distill", "--coco", "x.json", "--images", ".", "--teacher", "./no-such-teacher"], "no-such-teacher' does not exist"),
])
def test_distill_names_usage_errors(args, problem):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and problem in result.output


def test_distill_names_a_dataset_with_nothing_to_learn(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], "annotations": [],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "coco.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["distill", "--coco", str(tmp_path / "coco.json"), "--images", str(tmp_path / "images"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no annotated objects to learn from" in result.output


def test_start_training_from_label_studio_distills_in_the_background(label_studio, shapes, image_dir, tmp_path, http,
                                                                    base_pipeline):
    from label_studio_sdk.client import LabelStudio

    from ml_backend.labelstudio.convert import detections_to_results
    from ml_backend.labelstudio.config import parse_config
    from ml_backend.labelstudio.server import create_app
    from ml_backend.engine import Engine
    from ml_backend.settings import Settings

    _, records = shapes
    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    folder = image_dir / "distill"
    folder.mkdir(exist_ok=True)
    for r in records[:12]:
        (folder / r.key).write_bytes(Path(r.image).read_bytes())
    project = ls.projects.create(title="distill", label_config=CONFIG)
    ls.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    ls.projects.import_tasks(id=project.id, request=[{"data": {"image": f"/data/local-files/?d=distill/{r.key}"}}
                                                     for r in records[:12]])
    controls = parse_config(CONFIG).controls
    by_name = {f"/data/local-files/?d=distill/{r.key}": r for r in records[:12]}
    for task in ls.tasks.list(project=project.id, fields="all"):
        det = by_name[task.data["image"]].annotations
        det.data["class_name"] = np.array([n.title() for n in det.data["class_name"]], object)
        ls.annotations.create(id=task.id, result=detections_to_results(det, controls, SIZE, SIZE))

    settings = Settings(detector=base_pipeline.detector.model_id, segmenter="", model_dir=tmp_path,
                        label_studio_url=label_studio, label_studio_api_key=LEGACY_TOKEN,
                        distill_args="--epochs 1 --image-size 64 --pretrained scratch --no-export --batch-size 4 "
                                     "--min-map 0")  # one epoch: far below the quality gate
    server = RunningServer(create_app(Engine(base_pipeline.detector, None, PromptsFile(), settings)))
    try:
        ml = ls.ml.create(url=server.url, project=project.id, title="prelabel")
        ls.ml.train(id=ml.id)  # Label Studio sends START_TRAINING to /webhook
        deadline = time.time() + 240
        while (training := http.get(f"{server.url}/metrics").json()["training"])["state"] in ("idle", "running"):
            assert time.time() < deadline, training
            if training["state"] == "running":
                again = http.post(f"{server.url}/webhook", json={"action": "START_TRAINING", "project": {"id": project.id}})
                assert again.status_code == 409 and "already running" in again.json()["error"]["message"]
            time.sleep(1)
        assert training["state"] == "done", (Path(training["out"]) / "distill.log").read_text()[-3000:]
        assert training["project"] == project.id and training["runs"] == 1
        assert training["progress"]["state"] == "done" and training["progress"]["epoch"] == 1
        out = Path(training["out"])
        report = json.loads((out / "report.json").read_text())
        assert report["source"] == f"Label Studio project {project.id}"
        assert report["data"]["train_images"] + report["data"]["val_images"] == 12
        assert report["data"]["unused_labels"] == ["Hexagon"]
        assert StudentConfig.load(out).classes == ["Circle", "Square", "Triangle"]
        text = http.get(f"{server.url}/metrics", params={"format": "prometheus"}).text
        assert f'prelabel_training_state{{state="done",project="{project.id}"}} 1' in text
    finally:
        server.stop()


def test_pretrained_backbone_weights_come_from_the_torch_cache_never_from_the_network_offline(tmp_path, monkeypatch):
    from ml_backend.distill.run import backbone_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert backbone_weights("scratch") is None
    assert backbone_weights("auto") is None  # not cached, offline: from scratch
    with pytest.raises(DistillError, match="ImageNet weights are not cached .*HF_HUB_OFFLINE is set"):
        backbone_weights("imagenet")
    from torchvision.models import ResNet18_Weights

    cached = tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    cached.touch()
    assert backbone_weights("auto") is ResNet18_Weights.IMAGENET1K_V1
    assert backbone_weights("imagenet") is ResNet18_Weights.IMAGENET1K_V1


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])  # teachers other than the default Grounding DINO
def test_a_teacher_model_is_evaluated_through_the_engine_on_the_held_out_images(shapes, student, kind, tmp_path):
    """Any registered text-prompted detector can be the teacher: it runs through the engine on the validation
    images, and its figures equal an independent COCO evaluation of the same model's own detections."""
    from ml_backend.distill.run import evaluate_model
    from ml_backend.engine import Engine
    from ml_backend.media import decode_image
    from ml_backend.models import build_detector
    from ml_backend.models.tiny import write_tiny_kinds
    from ml_backend.settings import Settings

    root, records = shapes
    out, _ = student
    val_keys = set(json.loads((out / "split.json").read_text())["val"])
    val = [Example(r, r.annotations, "annotation") for r in records if r.key in val_keys]
    ref = write_tiny_kinds(tmp_path, [kind])[kind]
    detector = build_detector(ref, tmp_path, torch.device("cpu"))
    prompts = PromptsFile(box_threshold=0.0, text_threshold=0.0, labels={"circle": ["circle", "round"]})
    teacher = Engine(detector, None, prompts, Settings(model_dir=tmp_path))
    ontology = teacher.ontology(list(SHAPES))

    def load(record):
        return decode_image(Path(record.image).read_bytes(), record.image, 10**8).array

    report = evaluate_model(teacher, ontology, val, load, list(SHAPES))
    assert report["images"] == len(val) and report["failed_images"] == 0
    assert report["model_version"] == teacher.model_version(ontology) and kind in report["model_version"]
    own = [detector.detect([load(e.record)], ontology)[0] for e in val]
    independent = coco_evaluate([e.truth for e in val], own, list(SHAPES), [(SIZE, SIZE)] * len(val))
    assert report["map"] == pytest.approx(independent.map) and report["map50"] == pytest.approx(independent.map50)
    assert sum(len(d) for d in own) > 0, "the tiny teacher's detections reach the evaluation"
