"""SAM 3 as the teacher beyond serving: compared with Grounding DINO per label in the prompt workbench, its encoder
embedding review's objects (one load), evaluated as distill's teacher, and masking on Ray workers for a driver that
never loads it. Tiny random models: the checks are of structure and consistency, not of quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.engine import Engine, RequestSpec
from ml_backend.media import MediaItem
from ml_backend.models import UnloadedModel, build_detector
from ml_backend.models.tiny import write_tiny_sam3
from ml_backend.ontology import PromptsFile
from ml_backend.settings import Settings

from .conftest import LEGACY_TOKEN, encode, make_image

SIZES = [(160, 90), (160, 90), (120, 200), (96, 64)]  # not square: a tiny Grounding DINO's last map stays > 1x1
ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "220"}


@pytest.fixture(scope="module")
def sam3(tmp_path_factory) -> Path:
    return write_tiny_sam3(tmp_path_factory.mktemp("sam3") / "sam3")


def prompts_file(path: Path, **labels: list[str]) -> Path:
    """Every box counts (box_threshold 0): a random model's scores are low."""
    path.write_text(yaml.safe_dump({"box_threshold": 0.0, "text_threshold": 0.0, "labels": labels}))
    return path


# -- prompt workbench ----------------------------------------------------------------------------------------------


def own_boxes(ref: str, arrays: list[np.ndarray], prompt: str, model_dir: Path) -> list[list[list[float]]]:
    """What the workbench's run of `prompt` under detector `ref` finds on each image (its settings, its engine)."""
    from ml_backend.workbench import DetectParams

    params = DetectParams(0.0, 0.0, max_detections=Settings().max_detections)
    engine = Engine(build_detector(ref, model_dir, torch.device("cpu")), None, PromptsFile(), Settings())
    results = engine.run([MediaItem(a, str(i)) for i, a in enumerate(arrays)], RequestSpec(params.ontology("x", (prompt,))))
    return [[[round(float(v), 2) for v in box] for box in r.detections.xyxy] for r in results]


def test_the_workbench_names_the_better_teacher_per_label_with_its_best_prompt(sam3, tiny_models, tmp_path):
    """Ground truth made of each teacher's own boxes: Car from Grounding DINO's "car", Person from SAM 3's "person";
    so each label has a known better teacher (AP 1 on its own boxes), whatever the random weights find."""
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = []
    for i, (w, h) in enumerate(SIZES):
        image = make_image(w, h, 30 + i)
        (folder / f"w{i}.png").write_bytes(encode(image))
        arrays.append(np.array(image))
    dino = str(tiny_models["detector"])
    truth = {"Car": own_boxes(dino, arrays, "car", tmp_path), "Person": own_boxes(str(sam3), arrays, "person", tmp_path)}
    assert all(any(per_image) for per_image in truth.values())
    images = [{"id": i + 1, "file_name": f"w{i}.png", "width": w, "height": h} for i, (w, h) in enumerate(SIZES)]
    anns = [{"id": n, "image_id": i + 1, "category_id": k + 1, "iscrowd": 0, "bbox": [x1, y1, x2 - x1, y2 - y1],
             "area": (x2 - x1) * (y2 - y1)}
            for k, label in enumerate(truth) for i, boxes in enumerate(truth[label]) for n, (x1, y1, x2, y2) in
            enumerate(boxes, start=1000 * k + 10 * i)]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(truth)]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text("labels:\n  Car: [car, automobile]\n  Person: [person, pedestrian]\n")
    out = tmp_path / "out"
    args = ["prompts", "eval", "--coco", str(tmp_path / "gt.json"), "--images", str(folder), "--candidates",
            str(candidates), "--detector", str(sam3), "--detector", dino, "--min-score", "0", "--text-threshold", "0",
            "--out", str(out), "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args, env=ENV | {"MODEL_DIR": str(tmp_path / "model-dir")})
    assert result.exit_code == 0, result.output
    assert "detector runs: 32 computed" in result.output  # 2 teachers x 4 candidates x 4 images, one load each

    doc = json.loads((out / "report.json").read_text())
    assert doc["models"] == [str(sam3), dino]
    teachers = doc["teachers"]
    assert set(teachers) == {"Car", "Person"}
    for label, comparison in teachers.items():
        assert set(comparison["models"]) == {str(sam3), dino}
        for model, best in comparison["models"].items():  # each teacher's best prompt is its best candidate
            mine = [r for r in doc["results"] if r["label"] == label and r["model"] == model]
            assert best["ap"] == max(r["ap"] for r in mine) and best["prompts"] in [r["prompts"] for r in mine]
        ranked = sorted(comparison["models"].items(), key=lambda kv: (kv[1]["ap"], kv[1]["ap50"]), reverse=True)
        assert comparison["better"] == ranked[0][0]
    car, person = teachers["Car"]["models"][dino], teachers["Person"]["models"][str(sam3)]
    assert teachers["Car"]["better"] == dino and (car["prompts"], car["ap"]) == (["car"], 1.0)
    assert teachers["Person"]["better"] == str(sam3) and (person["prompts"], person["ap"]) == (["person"], 1.0)

    assert "teachers per label" in result.output and "* sam3" in result.output and "* detector" in result.output
    # one detector per prompts file: the label whose better teacher is the other one says so
    other = "Person" if doc["detector"] == dino else "Car"
    written = (out / "prompts.yaml").read_text()
    assert f"better teacher for {other}: {teachers[other]['better']}" in written
    assert PromptsFile.load(out / "prompts.yaml").detector == doc["detector"]
    again = CliRunner().invoke(app, args, env=ENV | {"MODEL_DIR": str(tmp_path / "model-dir")})
    assert again.exit_code == 0 and "detector runs: 0 computed, 32 from the cache" in again.output
    assert json.loads((out / "report.json").read_text())["teachers"] == teachers


# -- review --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fiftyone_db(tmp_path_factory):
    """An isolated MongoDB for this module (as in tests/test_review.py), stopped at its end."""
    pytest.importorskip("fiftyone", reason="FiftyOne is installed by the project's review extra")
    from ml_backend.review.dataset import configure_fiftyone, stop_database

    configure_fiftyone(tmp_path_factory.mktemp("fiftyone-db"))
    yield
    stop_database(timeout=5)


@pytest.fixture
def mongodb(fiftyone_db):
    """Marks a test `mongodb` (FiftyOne starts the database at its first dataset call)."""


def test_review_embeds_with_the_sam3_teacher_and_never_loads_it_twice(sam3, tiny_models, tmp_path):
    from ml_backend.models.sam3 import Sam3
    from ml_backend.review import review_embedder
    from ml_backend.review.embeddings import EncoderEmbedder

    # the teacher is SAM 3: its encoder embeds, even with a SAM segmenter configured beside it
    settings = Settings(detector=str(sam3), segmenter=str(tiny_models["segmenter"]), model_dir=tmp_path)
    embedder = review_embedder(settings)
    assert isinstance(embedder, EncoderEmbedder) and isinstance(embedder.encoder, Sam3)
    assert embedder.encoder.model_id == str(sam3)
    image = np.array(make_image(120, 90, 4))
    whole, objects = embedder(image, np.array([[0, 0, 60, 45], [60, 45, 120, 90]], np.float32))
    assert whole.ndim == 1 and objects.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(objects, axis=1), 1.0, rtol=1e-5)
    # the prompts file names the teacher just as well (the engine's rule: flags, then the file)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"detector": str(sam3), "labels": {"Car": ["car"]}}))
    assert isinstance(review_embedder(Settings(prompts=tmp_path / "p.yaml", model_dir=tmp_path)).encoder, Sam3)
    # an engine that has SAM 3 already lends it: by default, and when it is named as the embedding model
    engine = Engine.from_settings(Settings(detector=str(sam3), segmenter=str(sam3), model_dir=tmp_path))
    assert engine.segmenter is engine.detector  # one load for both roles
    assert review_embedder(settings, engine=engine).encoder is engine.detector
    assert review_embedder(settings, str(sam3), engine=engine).encoder is engine.detector
    # named without an engine: built as an image encoder like CLIP
    assert isinstance(review_embedder(settings, str(sam3)).encoder, Sam3)


def test_review_runs_on_sam3_embeddings_in_a_real_fiftyone_database(mongodb, sam3, tmp_path):
    import fiftyone as fo

    from benchmarks.review import synthetic_records
    from ml_backend.review import review_embedder, run_review
    from ml_backend.review.embeddings import compute_embeddings

    records, _ = synthetic_records(tmp_path / "synthetic", images=16, error_rate=0.2, seed=5)
    copy = tmp_path / "synthetic" / "copy.png"
    shutil.copy(records[0].image, copy)
    records.append(type(records[0])(key="copy", image=str(copy), width=records[0].width, height=records[0].height,
                                    predictions=records[0].predictions, annotations=records[0].annotations))
    embedder = review_embedder(Settings(detector=str(sam3), segmenter="", model_dir=tmp_path))
    name = f"sam3-review-{np.random.default_rng().integers(1 << 30)}"
    report = run_review(records, name, tmp_path / "cache", embedder=embedder, plots_dir=tmp_path / "plots",
                        viz_method="pca", console=False)
    dataset = fo.load_dataset(name)
    assert report.visualization == "pca" and {"ground_truth_viz", "prelabel_viz"} <= set(dataset.list_brain_runs())
    viz = dataset.load_brain_results("ground_truth_viz")
    assert viz.points.shape == (dataset.count("ground_truth.detections"), 2)
    assert dataset.has_field("uniqueness")
    assert any({records[0].key, "copy"} <= set(g) for g in report.duplicates)  # same pixels, same SAM 3 features
    # the embeddings are SAM 3's: the same vectors its encoder gives for the sample
    images, patches = compute_embeddings(dataset, embedder, ("ground_truth",))
    sample = dataset.first()
    own = embedder.encoder.embed(np.array(Image.open(sample.filepath).convert("RGB")), np.zeros((0, 4), np.float32))[0]
    np.testing.assert_allclose(images[0], own, rtol=1e-4, atol=1e-6)


def test_the_review_command_embeds_with_a_sam3_detector(mongodb, sam3, tmp_path):
    from ml_backend.coco import write as write_coco

    folder = tmp_path / "images"
    folder.mkdir()
    images, anns = [], []
    for i, (w, h) in enumerate(SIZES):
        (folder / f"r{i}.png").write_bytes(encode(make_image(w, h, 40 + i)))
        images.append({"id": i + 1, "file_name": f"r{i}.png", "width": w, "height": h})
        anns += [{"id": 2 * i + k + 1, "image_id": i + 1, "category_id": k + 1, "iscrowd": 0,
                  "bbox": [4 + 10 * k, 4, 30, 20], "area": 600} for k in range(2)]
    write_coco(tmp_path / "gt.json", {"images": images, "annotations": anns,
                                      "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "Person"}]})
    name = f"sam3-cli-{np.random.default_rng().integers(1 << 30)}"
    result = CliRunner().invoke(app, ["review", "--coco", str(tmp_path / "gt.json"), "--images", str(folder), "--out",
                                      str(tmp_path / "out"), "--name", name, "--detector", str(sam3), "--segmenter",
                                      "none", "--viz", "pca", "--no-app"], env=ENV | {"MODEL_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    import fiftyone as fo

    dataset = fo.load_dataset(name)
    assert len(dataset) == len(SIZES) and "ground_truth_viz" in dataset.list_brain_runs()


# -- distill -------------------------------------------------------------------------------------------------------


def test_distill_evaluates_sam3_as_the_teacher_and_the_model_card_names_it(sam3, tmp_path):
    """One short training (the student is not the point): SAM 3 runs through the engine on the held-out images, its
    figures equal an independent COCO evaluation of its own detections, and report and card name it."""
    from ml_backend.distill.synthetic import SHAPES, generate
    from ml_backend.evaluation import coco_evaluate

    size = 96
    root = tmp_path / "shapes"
    records = generate(root, 20, seed=4, size=(size, size))
    prompts = prompts_file(tmp_path / "teacher.yaml", circle=["circle", "round"])
    out = tmp_path / "student"
    args = ["distill", "--coco", str(root / "annotations.json"), "--images", str(root / "images"), "--out", str(out),
            "--image-size", str(size), "--pretrained", "scratch", "--batch-size", "8", "--epochs", "1", "--no-export",
            "--teacher", str(sam3), "--prompts", str(prompts), "--device", "cpu", "--min-map", "0",
            "--min-vs-teacher", "0"]
    result = CliRunner().invoke(app, args, env=ENV | {"MODEL_DIR": str(tmp_path / "model-dir")})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    teacher = report["teacher"]
    assert teacher["model_id"] == str(sam3) and teacher["model_version"].startswith("sam3-")
    assert teacher["failed_images"] == 0 and teacher["images"] == report["data"]["val_images"]
    assert f"teacher: {sam3} (model version {teacher['model_version']})" in " ".join(result.output.split())
    card = (out / "MODEL_CARD.md").read_text()
    assert f"| teacher `{sam3}` ({teacher['model_version']}, run now) |" in card

    val_keys = set(json.loads((out / "split.json").read_text())["val"])
    val = [r for r in records if r.key in val_keys]
    engine = Engine.from_settings(Settings(detector=str(sam3), segmenter="", prompts=prompts, model_dir=tmp_path))
    ontology = engine.ontology(list(SHAPES))
    own = [engine.require_detector().detect([np.array(Image.open(r.image).convert("RGB"))], ontology, masks=False)[0]
           for r in val]
    assert sum(len(d) for d in own) > 0, "SAM 3's detections reach the evaluation"
    independent = coco_evaluate([r.annotations for r in val], own, list(SHAPES), [(size, size)] * len(val))
    assert teacher["map"] == pytest.approx(independent.map) and teacher["map50"] == pytest.approx(independent.map50)
    assert report["student_vs_teacher"]["map"] == pytest.approx(report["student"]["map"] - teacher["map"], abs=1e-3)


# -- Ray -----------------------------------------------------------------------------------------------------------

BRUSH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels>
</View>"""


def test_the_ray_driver_knows_sam3_masks_without_loading_it(sam3, ls_host, tmp_path):
    """The driver (`load=False`) computes the same model version as a worker (`TaskPredictor`, what each Ray actor
    builds) that loads SAM 3, and the worker's brush regions are SAM 3's masks; neither has a segmenter."""
    from ml_backend.labelstudio.annotate import TaskPredictor
    from ml_backend.labelstudio.backend import LabelStudioBackend
    from ml_backend.labelstudio.config import parse_config

    settings = Settings(detector=str(sam3), segmenter="", model_dir=tmp_path, label_studio_url=ls_host.url,
                        label_studio_api_key=LEGACY_TOKEN, prompts=prompts_file(tmp_path / "p.yaml", Car=["car"]))
    driver = Engine.from_settings(settings, load=False)
    assert isinstance(driver.detector, UnloadedModel) and driver.segmenter is None
    assert driver.detector_masks and driver.gives_masks and driver.finds_exemplars
    backend = LabelStudioBackend.for_batch(driver)
    config = parse_config(BRUSH)
    version = backend.version_for(config, backend.ontology_for(config))
    worker = TaskPredictor(settings, BRUSH)
    assert worker.version == version and version.startswith("sam3-")
    (entry,) = worker([{"id": 1, "data": {"image": "/data/upload/img0.png"}}])
    assert "error" not in entry, entry
    brushes = [r for r in entry["result"] if r["type"] == "brushlabels"]
    boxes = [r for r in entry["result"] if r["type"] == "rectanglelabels"]
    assert boxes and len([r for r in brushes if r["value"]["brushlabels"] == ["Car"]]) == len(boxes)
    assert all(r["value"]["format"] == "rle" and r["value"]["rle"] for r in brushes)


def test_annotate_on_ray_with_sam3_stores_its_masks_in_label_studio(local_ray, label_studio, image_dir, sam3, tmp_path):
    """No --segmenter given: SAM 3 masks by itself, so the default SAM (not here, offline) is never asked for."""
    from label_studio_sdk.client import LabelStudio
    from label_studio_sdk.label_interface import LabelInterface

    folder = image_dir / "ray-sam3"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(encode(make_image(88, 60, seed=50 + i)))
    client = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    project = client.projects.create(title="ray sam3", label_config=BRUSH)
    client.import_storage.local.create(project=project.id, path=str(folder))
    client.projects.import_tasks(id=project.id, request=[{"image": f"/data/local-files/?d=ray-sam3/img{i}.png"}
                                                         for i in range(3)])
    prompts = prompts_file(tmp_path / "prompts.yaml", Car=["car"], Person=["person"])
    result = CliRunner().invoke(app, ["annotate", "--project", str(project.id), "--url", label_studio, "--api-key",
                                      LEGACY_TOKEN, "--detector", str(sam3), "--prompts",
                                      str(prompts), "--engine", "ray", "--ray-actors", "1", "--batch-size", "2",
                                      "--report", str(tmp_path / "report.json")],
                                env={"MODEL_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert "3 of 3 tasks pre-annotated" in result.output
    version = json.loads((tmp_path / "report.json").read_text())["model_version"]
    assert version.startswith("sam3-")
    interface = LabelInterface(BRUSH)
    brushes = 0
    for task in client.tasks.list(project=project.id):
        (prediction,) = client.predictions.list(task=task.id)
        assert prediction.model_version == version
        pred = {"model_version": version, "result": prediction.result, "score": prediction.score}
        assert interface.validate_prediction(pred, return_errors=True) in (True, [])
        kinds = [r["type"] for r in prediction.result]
        brushes += kinds.count("brushlabels")
        assert all(r["value"]["format"] == "rle" and r["value"]["rle"] for r in prediction.result
                   if r["type"] == "brushlabels")
    assert brushes > 0, "SAM 3's masks reached Label Studio from the Ray workers"
