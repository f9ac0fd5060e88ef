"""`prelabel prompts eval`: candidate prompts (and detectors) on corrected samples, AP as pycocotools computes it,
a prediction cache that makes re-runs free, clear errors, the winners' prompts file, PR curves and the command."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ml_backend.ontology import LabelSpec, Ontology, PromptsFile
from ml_backend.coco import read_records
from ml_backend.settings import Settings
from ml_backend.workbench import (
    CandidatesError, CandidatesFile, DetectParams, PredictionCache, Workbench, evaluate_prompts, image_hash,
    model_key,
)

from .conftest import LEGACY_TOKEN, encode, make_image

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(160, 90), (160, 90), (120, 200), (96, 64)]


class CountingDetector:
    """The real tiny detector, with every call recorded."""

    def __init__(self, inner):
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def detect(self, images, ontology):
        self.calls.append((len(images), ontology.labels[0].prompts))
        return self.inner.detect(images, ontology)


def never_built(ref):
    pytest.fail(f"the detector {ref} was built although everything needed was cached or invalid")


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        paths.append(folder / f"w{i}.png")
        paths[-1].write_bytes(encode(make_image(w, h, 20 + i)))
    return paths


def coco_doc(paths: list[Path], boxes: dict[str, list[list[list[float]]]]) -> dict:
    """`boxes[label][image]` = xyxy boxes of the ground truth."""
    labels = list(boxes)
    images = [{"id": i + 1, "file_name": p.name, "width": w, "height": h} for i, (p, (w, h)) in enumerate(zip(paths, SIZES))]
    anns = []
    for k, label in enumerate(labels):
        for i, per_image in enumerate(boxes[label]):
            for x1, y1, x2, y2 in per_image:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": k + 1, "iscrowd": 0,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    return {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(labels)]}


@pytest.fixture
def counting(base_pipeline):
    return CountingDetector(base_pipeline.detector)


@pytest.fixture
def dataset(tmp_path, base_pipeline):
    """4 images whose ground truth is made from the tiny detector's own boxes (some moved, some dropped, one extra),
    so that AP is neither 0 nor 1: Car from the prompt "car", Person from "person"."""
    paths = write_images(tmp_path / "images")
    arrays = [np.array(Image.open(p).convert("RGB")) for p in paths]
    boxes = {}
    for label, prompt in (("Car", "car"), ("Person", "person")):
        found = base_pipeline.detector.detect(arrays, Ontology((LabelSpec(label, (prompt,), 0.3),)))
        boxes[label] = []
        for i, d in enumerate(found):
            kept = [list(map(float, np.round(b + [1, 0, 1, 0], 1))) for b in d.xyxy[i % 2::2]]
            boxes[label].append(kept)
        boxes[label][0].append([1.0, 1.0, 20.0, 20.0])  # never predicted
    (tmp_path / "gt.json").write_text(json.dumps(coco_doc(paths, boxes)))
    return tmp_path / "gt.json", tmp_path / "images"


def candidates_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def settings(tmp_path: Path) -> Settings:
    return Settings(model_dir=tmp_path / "model-dir", batch_size=4)


# -- AP as pycocotools computes it ------------------------------------------------------------------------------


def test_workbench_ap_equals_an_independent_pycocotools_computation(dataset, counting, base_pipeline, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path, image_dir = dataset
    records = read_records(gt_path, image_dir)
    cache = PredictionCache(tmp_path / "cache")
    bench = Workbench(records, cache, settings(tmp_path), build_detector=lambda ref: counting, progress=False)
    ref = base_pipeline.detector.model_id
    report = bench.run(CandidatesFile(labels={"Car": ["car", "truck"], "Person": ["person"]}), [ref])
    assert len(report.results) == 3 and counting.calls

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    cat_ids = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    arrays = {img["id"]: np.array(Image.open(image_dir / img["file_name"]).convert("RGB")) for img in gt.dataset["images"]}
    key = model_key(ref, settings(tmp_path).model_dir)
    nontrivial = 0
    for r in report.results:
        results = []
        for image_id, array in arrays.items():
            xyxy, scores = cache.get(image_hash(array), key, tuple(r.prompts), report.params)
            results += [{"image_id": image_id, "category_id": cat_ids[r.label], "score": round(float(s), 4),
                         "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)]}
                        for (x1, y1, x2, y2), s in zip(xyxy, scores)]
        assert len(results) == r.predicted
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            ev.params.catIds = [cat_ids[r.label]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert r.ap == pytest.approx(max(ev.stats[0], 0), abs=1e-4), r
        assert r.ap50 == pytest.approx(max(ev.stats[1], 0), abs=1e-4), r
        assert r.truth == len(gt.getAnnIds(catIds=[cat_ids[r.label]]))
        # the best threshold is on pycocotools' own curve at IoU 0.5
        precision, scores = ev.eval["precision"][0, :, 0, 0, -1], ev.eval["scores"][0, :, 0, 0, -1]
        recall = np.linspace(0, 1, 101)
        f1 = np.where(precision > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        assert r.best["f1"] == pytest.approx(f1.max(), abs=1e-4)
        assert r.best["threshold"] == pytest.approx(scores[f1.argmax()], abs=1e-4)
        nontrivial += 0 < r.ap < 1
    assert nontrivial >= 2, [(r.name, r.ap) for r in report.results]
    cache.close()


# -- the cache --------------------------------------------------------------------------------------------------


def test_a_rerun_computes_nothing_and_a_new_candidate_computes_only_itself(dataset, counting, base_pipeline, tmp_path):
    gt_path, image_dir = dataset
    records = read_records(gt_path, image_dir)
    ref = base_pipeline.detector.model_id
    first = CandidatesFile(labels={"Car": ["car"], "Person": ["person"]})

    def run(candidates):
        counting.calls.clear()
        cache = PredictionCache(tmp_path / "cache")  # a new process would open the same file
        try:
            bench = Workbench(records, cache, settings(tmp_path), build_detector=lambda r: counting, progress=False)
            return bench.run(candidates, [ref])
        finally:
            cache.close()

    one = run(first)
    assert one.computed == 2 * len(records) and one.cached == 0
    assert counting.calls == [(4, ("car",)), (4, ("person",))]  # one batch of 4 images per candidate
    again = run(first)
    assert counting.calls == [] and (again.computed, again.cached) == (0, 2 * len(records))
    assert [(r.name, r.ap, r.ap50, r.best) for r in again.results] == [(r.name, r.ap, r.ap50, r.best) for r in one.results]
    more = run(CandidatesFile(labels={"Car": ["car", "truck"], "Person": ["person"]}))
    assert counting.calls == [(4, ("truck",))]
    assert (more.computed, more.cached) == (len(records), 2 * len(records))
    # other run settings are other cache entries
    counting.calls.clear()
    cache = PredictionCache(tmp_path / "cache")
    Workbench(records, cache, settings(tmp_path), params=DetectParams(min_score=0.2),
              build_detector=lambda r: counting, progress=False).run(first, [ref])
    assert len(counting.calls) == 2
    cache.close()


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ("labels: [car", "is not valid YAML"),
    ("models: [x]\n", "must be a mapping with a 'labels' key"),
    ("- car\n- person\n", "must be a mapping with a 'labels' key"),
    ("labels:\n  Car: []\n", "label 'Car' has no candidate prompts"),
    ("labels:\n  Car: ['  ', car]\n", "label 'Car' has an empty candidate prompt"),
    ("labels: {}\n", "labels: .*needs a mapping of label"),
    ("labels:\n  Car: ['{brand} car']\n", "candidate '{brand} car' names a task data field"),
    ("labels:\n  Car: [car]\ncolour: red\n", "colour: Extra inputs are not permitted"),
    ("labels:\n  Car: [car]\n  Truck: [truck]\n  Bike: bike\n", r"'Truck', 'Bike' of the candidates file are not in the "
                                                                r"ground truth; its annotated labels are: 'Car', 'Person'"),
])
def test_a_bad_candidates_file_or_an_unknown_label_is_answered_clearly(dataset, tmp_path, text, problem):
    gt_path, image_dir = dataset
    path = candidates_file(tmp_path / "candidates.yaml", text)
    with pytest.raises(CandidatesError, match=problem) as err:
        evaluate_prompts(read_records(gt_path, image_dir), path, tmp_path / "out", settings(tmp_path),
                         models="some/model", cache_dir=tmp_path / "cache", build_detector=never_built, progress=False)
    assert str(path) in str(err.value) or "not in the ground truth" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_files_models_and_annotations_are_named(dataset, tmp_path):
    gt_path, image_dir = dataset
    records = read_records(gt_path, image_dir)
    with pytest.raises(CandidatesError, match="candidates file .*nope.yaml does not exist"):
        CandidatesFile.load(tmp_path / "nope.yaml")
    path = candidates_file(tmp_path / "c.yaml", "labels: {car: car}\n")  # case is forgiven
    assert CandidatesFile.load(path).matched(["Car", "Person"]).labels == {"Car": ["car"]}
    with pytest.raises(CandidatesError, match="--models 'a,,b'"):
        evaluate_prompts(records, path, tmp_path / "out", settings(tmp_path), models="a,,b", build_detector=never_built)
    for r in records:
        r.annotations = None
    with pytest.raises(CandidatesError, match="none of the 4 images is annotated"):
        evaluate_prompts(records, path, tmp_path / "out", settings(tmp_path), models="m", cache_dir=tmp_path / "c",
                         build_detector=never_built)


def test_the_example_candidates_file_loads():
    candidates = CandidatesFile.load(ROOT / "prompts" / "candidates.example.yaml")
    assert candidates.models == ["IDEA-Research/grounding-dino-tiny"]
    assert candidates.labels["Car"] == ["car", "automobile", "passenger vehicle"] and candidates.labels["Bottle"] == ["bottle"]


# -- the winners ------------------------------------------------------------------------------------------------


def test_the_winning_prompts_file_picks_the_best_candidate_and_its_threshold(tmp_path, base_pipeline):
    """Predictions put into the cache through its API: 'car' finds every car (plus a weak false positive),
    'automobile' finds nothing right; for Person, 'pedestrian' is right at 0.9/0.8 with false positives at 0.7 and
    0.5 and one miss, 'person' is half right. No model runs."""
    paths = write_images(tmp_path / "images")[:2]
    cars = [[[10, 10, 50, 40]], [[20, 30, 60, 80]]]
    people = [[[60, 5, 90, 60], [100, 10, 140, 70]], [[5, 5, 40, 50], [70, 10, 120, 60]]]
    (tmp_path / "gt.json").write_text(json.dumps(coco_doc(paths, {"Car": cars, "Person": people})))
    records = read_records(tmp_path / "gt.json", tmp_path / "images")
    ref = base_pipeline.detector.model_id
    config = settings(tmp_path)
    key = model_key(ref, config.model_dir)
    params = DetectParams(max_detections=config.max_detections)
    cache = PredictionCache(tmp_path / "cache")
    far = np.array([[300, 300, 310, 310]], np.float32)
    for i, p in enumerate(paths):
        h = image_hash(np.array(Image.open(p).convert("RGB")))
        cache.put(h, key, ("car",), params, np.array(cars[i] + [[0, 60, 30, 89]], np.float32), np.array([0.9, 0.3]))
        cache.put(h, key, ("automobile",), params, np.array(cars[i], np.float32) + 200, np.array([0.95]))
        right, fp = np.array(people[i], np.float32), far + 5 * i
        pedestrian = [(right[0], 0.9 - 0.1 * i), (fp[0], 0.7 - 0.2 * i)] + ([(right[1], 0.6)] if i == 0 else [])
        cache.put(h, key, ("pedestrian",), params, np.array([b for b, _ in pedestrian]), np.array([s for _, s in pedestrian]))
        cache.put(h, key, ("person",), params, np.array([people[i][0], far[0]], np.float32), np.array([0.4, 0.99]))
    cache.close()
    candidates = candidates_file(tmp_path / "candidates.yaml",
                                 f"models: [{ref}]\nlabels:\n  Car: [automobile, car]\n  Person: [person, pedestrian]\n")
    report = evaluate_prompts(records, candidates, tmp_path / "out", config, cache_dir=tmp_path / "cache",
                              build_detector=never_built, progress=False)
    assert report.computed == 0
    by = {(r.label, r.name): r for r in report.results}
    assert by["Car", "car"].ap == 1.0 and by["Car", "automobile"].ap == 0.0
    assert by["Car", "car"].best == {"threshold": 0.9, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    # pedestrian, all scores: TP .9, TP .8, FP .7, TP .6, FP .5 over 4 people -> best F1 0.75 at 0.6
    assert by["Person", "pedestrian"].best == {"threshold": 0.6, "precision": 0.75, "recall": 0.75, "f1": 0.75}
    assert by["Person", "pedestrian"].ap > by["Person", "person"].ap

    prompts = PromptsFile.load(tmp_path / "out" / "prompts.yaml")
    assert prompts.detector == ref
    assert prompts.labels["Car"].prompts == ["car"] and prompts.labels["Car"].threshold == 0.9
    assert prompts.labels["Person"].prompts == ["pedestrian"] and prompts.labels["Person"].threshold == 0.6
    ontology = prompts.ontology(["Car", "Person"])
    assert [s.prompts for s in ontology.labels] == [("car",), ("pedestrian",)]
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["detector"] == ref and doc["winners"]["Car"]["prompts"] == ["car"]
    assert {(r["label"], r["prompts"][0]) for r in doc["results"]} == set(by)
    curves = {r["prompts"][0]: r.get("curve_iou50") for r in doc["results"]}
    assert curves["automobile"] is None and curves["car"]["precision"][-1] == 1.0 and curves["car"]["recall"][-1] == 1.0


def test_the_best_detector_is_the_one_with_the_best_mean_ap():
    from ml_backend.workbench import CandidateResult, WorkbenchReport, winning_prompts

    def result(model, label, prompt, ap):
        return CandidateResult(model, label, [prompt], ap, ap, 1, 1, {"threshold": 0.4, "precision": 1, "recall": 1, "f1": 1})

    results = [result("a", "Car", "car", 0.9), result("a", "Person", "person", 0.1),
               result("b", "Car", "car", 0.6), result("b", "Person", "person", 0.5)]
    report = WorkbenchReport(1, ["a", "b"], DetectParams(), results, "a", {})
    assert report.model_scores() == {"a": 0.5, "b": 0.55}
    report.detector, report.winners = "b", {"Car": results[2], "Person": results[3]}
    assert PromptsFile.model_validate(yaml.safe_load(winning_prompts(report))).detector == "b"


# -- the command ------------------------------------------------------------------------------------------------


def test_the_prompts_eval_command_writes_curves_report_and_prompts_and_reuses_the_cache(dataset, tiny_models, tmp_path):
    from typer.testing import CliRunner

    from ml_backend.cli import app

    gt_path, image_dir = dataset
    candidates = candidates_file(tmp_path / "candidates.yaml", "labels:\n  car: [car, truck]\n  Person: person\n")
    out = tmp_path / "out"
    args = ["prompts", "eval", "--coco", str(gt_path), "--images", str(image_dir), "--candidates", str(candidates),
            "--models", str(tiny_models["detector"]), "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--synonyms", "2"]
    env = {"MODEL_DIR": str(tmp_path / "model-dir"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "detector runs: 16 computed, 0 from the cache" in result.output  # 3 candidates + 1 synonym set, 4 images
    assert "car | truck" in result.output and "winning prompts:" in result.output
    curves = sorted(p.name for p in (out / "curves").glob("*.png"))
    assert curves == ["pr_Car.png", "pr_Person.png"]
    assert all(Image.open(out / "curves" / c).format == "PNG" for c in curves)
    doc = json.loads((out / "report.json").read_text())
    assert doc["images"] == 4 and len(doc["results"]) == 4 and doc["computed"] == 16
    assert {tuple(r["prompts"]) for r in doc["results"] if r["label"] == "Car"} == {("car",), ("truck",), ("car", "truck")} \
        or {tuple(r["prompts"]) for r in doc["results"] if r["label"] == "Car"} == {("car",), ("truck",), ("truck", "car")}
    prompts = PromptsFile.load(out / "prompts.yaml")
    assert set(prompts.labels) == {"Car", "Person"} and prompts.detector == str(tiny_models["detector"])
    assert prompts.labels["Car"].prompts == doc["winners"]["Car"]["prompts"]
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0 and "detector runs: 0 computed, 16 from the cache" in again.output


def test_the_workbench_compares_grounding_dino_with_owlv2_through_the_same_command(dataset, tiny_models, tmp_path):
    """A second registered text-prompted detector is a candidate model like any other: no adapter knows it."""
    from typer.testing import CliRunner

    from ml_backend.cli import app
    from ml_backend.models.tiny import write_tiny_kinds

    gt_path, image_dir = dataset
    owl = write_tiny_kinds(tmp_path / "tiny", ["owlv2"])["owlv2"]
    candidates = candidates_file(tmp_path / "candidates.yaml", "labels:\n  Car: [car]\n  Person: person\n")
    args = ["prompts", "eval", "--coco", str(gt_path), "--images", str(image_dir), "--candidates", str(candidates),
            "--models", f"{tiny_models['detector']},{owl}", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args, env={"MODEL_DIR": str(tmp_path / "model-dir"), "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {r["model"] for r in doc["results"]} == {str(tiny_models["detector"]), str(owl)}
    assert "detector runs: 16 computed" in result.output  # 2 models x 2 candidates x 4 images


def test_the_prompts_eval_command_answers_mistakes_with_one_line(dataset, tmp_path):
    from typer.testing import CliRunner

    from ml_backend.cli import app

    gt_path, image_dir = dataset
    bad = candidates_file(tmp_path / "candidates.yaml", "labels:\n  Truck: [truck]\n")
    runner = CliRunner()
    base = ["prompts", "eval", "--candidates", str(bad)]
    result = runner.invoke(app, base + ["--coco", str(gt_path), "--images", str(image_dir), "--models", "x",
                                        "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "error: label(s) 'Truck' of the candidates file are not in the ground truth" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, base + ["--coco", str(gt_path)])
    assert result.exit_code == 2 and "--coco needs --images DIR" in result.output
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "give one source" in result.output


def test_the_prompts_eval_command_reads_a_label_studio_project(label_studio, image_dir, tiny_models, tmp_path):
    from label_studio_sdk.client import LabelStudio
    from typer.testing import CliRunner

    from ml_backend.cli import app

    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    folder = image_dir / "workbench"
    write_images(folder)
    config = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels></View>"""
    project = ls.projects.create(title="workbench project", label_config=config)
    ls.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    ls.projects.import_tasks(id=project.id, request=[{"data": {"image": f"/data/local-files/?d=workbench/w{i}.png"}}
                                                     for i in range(4)])
    tids = sorted(t.id for t in ls.tasks.list(project=project.id))

    def rect(label, x1, y1, x2, y2, w, h):
        return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": w,
                "original_height": h, "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                                                "height": 100 * (y2 - y1) / h, "rotation": 0, "rectanglelabels": [label]}}

    ls.annotations.create(id=tids[0], result=[rect("Car", 10, 10, 60, 50, *SIZES[0]), rect("Person", 100, 5, 150, 80, *SIZES[0])])
    ls.annotations.create(id=tids[1], result=[rect("Car", 30, 20, 90, 70, *SIZES[1])])
    ls.annotations.create(id=tids[2], result=[])  # nothing here: an image of the ground truth without objects
    # tids[3] is not annotated: it is not part of the ground truth
    candidates = candidates_file(tmp_path / "candidates.yaml", "labels:\n  Car: [car, truck]\n  Person: [person]\n")
    result = CliRunner().invoke(app, [
        "prompts", "eval", "--project", str(project.id), "--url", label_studio, "--api-key", LEGACY_TOKEN,
        "--candidates", str(candidates), "--models", str(tiny_models["detector"]), "--out", str(tmp_path / "out"),
        "--cache", str(tmp_path / "cache")], env={"MODEL_DIR": str(tmp_path / "model-dir"), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["images"] == 3 and doc["unannotated"] == 1 and doc["computed"] == 9
    assert {r["label"]: r["truth"] for r in doc["results"]} == {"Car": 2, "Person": 1}
    assert PromptsFile.load(tmp_path / "out" / "prompts.yaml").labels.keys() == {"Car", "Person"}
