"""`prelabel review`: records from a real Label Studio project, COCO and CVAT exports -> a persistent FiftyOne dataset
on a real MongoDB (own database directory, stopped afterwards); refresh, likely mistakes, statistics, the way back."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.review import synthetic_records
from ml_backend.errors import ConfigError
from ml_backend.labelstudio.convert import mask_to_rle
from ml_backend.review.dataset import configure_fiftyone, stop_database
from ml_backend.review.stats import label_stats, print_stats, save_plots, save_statistics
from ml_backend.types import LabeledImage, make_detections

from .conftest import LEGACY_TOKEN, encode, free_port, make_image

pytest.importorskip("fiftyone", reason="FiftyOne is installed by the project's review extra")


@pytest.fixture(scope="module", autouse=True)
def fiftyone_db(tmp_path_factory):
    """An isolated MongoDB (set before fiftyone is first imported), stopped at the end of the module."""
    configure_fiftyone(tmp_path_factory.mktemp("fiftyone-db"))
    yield
    stop_database(timeout=5)


@pytest.fixture
def mongodb(fiftyone_db):
    """For a test that uses the module's MongoDB (FiftyOne starts it at the first dataset call): marks it `mongodb`."""


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate([(160, 90), (120, 200)]):
        (folder / f"img{i}.png").write_bytes(encode(make_image(w, h, i)))
    return folder


def unique(name: str) -> str:
    return f"{name}-{np.random.default_rng().integers(1 << 30)}"


# -- Label Studio ------------------------------------------------------------------------------------------------

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Person"/></PolygonLabels>
</View>"""


def region(kind: str, value: dict, w: int, h: int, score: float | None = None) -> dict:
    name = {"rectanglelabels": "box", "brushlabels": "brush", "polygonlabels": "poly"}[kind]
    r = {"from_name": name, "to_name": "image", "type": kind, "original_width": w, "original_height": h, "value": value}
    return r | ({"score": score} if score is not None else {})


def rect(label: str, x: float, y: float, bw: float, bh: float, w: int, h: int, score=None) -> dict:
    """A rectangle given in pixels."""
    value = {"x": 100 * x / w, "y": 100 * y / h, "width": 100 * bw / w, "height": 100 * bh / h, "rotation": 0,
             "rectanglelabels": [label]}
    return region("rectanglelabels", value, w, h, score)


def test_a_label_studio_project_becomes_a_dataset_refreshed_without_duplicates(mongodb, label_studio, image_dir, tmp_path):
    import fiftyone as fo
    from label_studio_sdk.client import LabelStudio

    from ml_backend.labelstudio.images import LabelStudioImageSource
    from ml_backend.labelstudio.records import project_records
    from ml_backend.labelstudio.views import create_review_tab
    from ml_backend.review import run_review
    from ml_backend.settings import Settings

    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    folder = image_dir / "review"
    folder.mkdir(exist_ok=True)
    sizes = [(160, 90), (120, 200), (100, 80)]
    for i, (w, h) in enumerate(sizes):
        (folder / f"r{i}.png").write_bytes(encode(make_image(w, h, 10 + i)))
    project = ls.projects.create(title="review project", label_config=CONFIG)
    ls.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    ls.projects.import_tasks(id=project.id, request=[{"data": {"image": f"/data/local-files/?d=review/r{i}.png"}}
                                                     for i in range(3)])
    tids = sorted(t.id for t in ls.tasks.list(project=project.id))
    ls.projects.import_predictions(id=project.id, request=[
        {"task": t, "model_version": "old", "score": 0.1, "result": [rect("Person", 1, 1, 5, 5, *sizes[i], 0.1)]}
        for i, t in enumerate(tids)] + [
        {"task": t, "model_version": "gdino-v1", "score": 0.8, "result": [rect("Car", 10, 20, 40, 30, *sizes[i], 0.8)]}
        for i, t in enumerate(tids)])
    ls.projects.update(id=project.id, model_version="gdino-v1")
    brush = np.zeros((90, 160), bool)
    brush[30:60, 50:90] = True
    ls.annotations.create(id=tids[0], result=[
        rect("Car", 12, 20, 40, 30, 160, 90),
        region("brushlabels", {"format": "rle", "rle": mask_to_rle(brush), "brushlabels": ["Person"]}, 160, 90)])
    ls.annotations.create(id=tids[1], result=[region("polygonlabels", {
        "points": [[10, 10], [60, 10], [60, 50]], "closed": True, "polygonlabels": ["Person"]}, 120, 200)])
    ls.annotations.create(id=tids[1], was_cancelled=True, result=[rect("Car", 0, 0, 9, 9, 120, 200)])

    records = project_records(ls, project.id, label_studio)
    by_key = {r.key: r for r in records}
    assert sorted(by_key) == sorted(map(str, tids))
    first = by_key[str(tids[0])]
    assert first.model_version == "gdino-v1" and first.link == f"{label_studio}/projects/{project.id}/data?task={tids[0]}"
    np.testing.assert_allclose(first.predictions.xyxy, [[10, 20, 50, 50]], atol=1e-3)
    assert list(first.annotations.data["class_name"]) == ["Car", "Person"]
    assert first.annotations.mask[1].sum() == brush.sum() and list(first.annotations.data["has_mask"]) == [False, True]
    second = by_key[str(tids[1])]
    assert list(second.annotations.data["class_name"]) == ["Person"]  # the cancelled annotation is not used
    np.testing.assert_allclose(second.annotations.xyxy, [[12, 20, 72, 100]], atol=1.5)
    assert by_key[str(tids[2])].annotations is None

    loader = LabelStudioImageSource(Settings(label_studio_url=label_studio, label_studio_api_key=LEGACY_TOKEN))
    name = unique("ls-review")
    report = run_review(records, name, tmp_path / "cache", loader, console=False)
    assert report.build.added == 3 and report.build.total == 3
    dataset = fo.load_dataset(name)
    assert dataset.persistent
    sample = dataset.match(fo.ViewField("key") == str(tids[0])).first()
    assert sample.task_link == first.link and sample.model_version == "gdino-v1"
    pred = sample.prelabel.detections[0]
    assert pred.confidence == pytest.approx(0.8) and pred.label == "Car"
    np.testing.assert_allclose(pred.bounding_box, [10 / 160, 20 / 90, 40 / 160, 30 / 90], atol=1e-6)
    car, person = sample.ground_truth.detections
    assert car.mask is None and person.mask.shape == (30, 40) and person.mask.all()  # cropped to its box
    assert Path(sample.filepath).is_file() and Path(sample.filepath).is_relative_to(tmp_path / "cache")

    # a new annotation arrives: refreshing updates that sample, adds none
    ls.annotations.create(id=tids[2], result=[rect("Person", 5, 5, 20, 20, 100, 80)])
    report = run_review(project_records(ls, project.id, label_studio), name, tmp_path / "cache", loader, console=False)
    assert (report.build.added, report.build.updated, len(dataset)) == (0, 3, 3)
    assert len(dataset.distinct("key")) == 3
    assert dataset.match(fo.ViewField("key") == str(tids[2])).first().ground_truth.detections[0].label == "Person"

    # back to Label Studio: a Data Manager tab of exactly the flagged tasks
    flagged = [tids[0], tids[2]]
    view_id = create_review_tab(ls, project.id, flagged, "prelabel review")
    assert sorted(t.id for t in ls.tasks.list(project=project.id, view=view_id)) == flagged
    again = create_review_tab(ls, project.id, flagged[:1], "prelabel review")  # replaced, not duplicated
    titles = [v.data["title"] for v in ls.views.list(project=project.id)]
    assert titles.count("prelabel review") == 1
    assert [t.id for t in ls.tasks.list(project=project.id, view=again)] == flagged[:1]


def test_a_label_studio_region_that_cannot_be_read_is_named_with_its_task_and_label():
    from ml_backend.labelstudio.records import result_objects

    empty = np.zeros((10, 20), bool)
    brush = region("brushlabels", {"format": "rle", "rle": mask_to_rle(empty), "brushlabels": ["Car"]}, 20, 10)
    with pytest.raises(ConfigError, match=r"project 3 task 7 annotation 9: brushlabels region .* \(label 'Car'\) covers no pixel"):
        result_objects([brush | {"id": "r1"}], "project 3 task 7 annotation 9")
    unlabeled = rect("Car", 1, 1, 5, 5, 20, 10)
    unlabeled["value"]["rectanglelabels"] = []
    with pytest.raises(ConfigError, match="task 7 .* has no label"):
        result_objects([unlabeled], "project 3 task 7 annotation 9")
    objects, w, h = result_objects([rect("Car", 2, 3, 4, 5, 20, 10, 0.7), {"type": "textarea", "value": {}}], "t")
    assert (w, h) == (20, 10) and len(objects) == 1 and objects[0]["score"] == 0.7
    np.testing.assert_allclose(objects[0]["box"], [2, 3, 6, 8], atol=1e-5)


# -- COCO and CVAT -----------------------------------------------------------------------------------------------


def test_a_coco_export_with_polygons_rle_and_predictions_becomes_a_dataset(mongodb, images, tmp_path):
    import fiftyone as fo
    from pycocotools import mask as mask_utils

    from ml_backend.review import run_review
    from ml_backend.coco import read_records

    full = np.zeros((200, 120), np.uint8)
    full[50:100, 20:60] = 1
    rle = mask_utils.encode(np.asfortranarray(full))
    doc = {
        "images": [{"id": 1, "file_name": "img0.png", "width": 160, "height": 90},
                   {"id": 2, "file_name": "img1.png", "width": 120, "height": 200}],
        "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "Person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 10, 40, 40], "iscrowd": 0,
             "segmentation": [[60, 10, 100, 10, 100, 50, 60, 50]]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 50, 40, 50], "iscrowd": 1,
             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    results = [{"image_id": 1, "category_id": 1, "bbox": [11, 10, 40, 30], "score": 0.9},
               {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.4}]
    (tmp_path / "pred.json").write_text(json.dumps(results))

    records = read_records(tmp_path / "gt.json", images, tmp_path / "pred.json", model_version="coco-v1")
    assert [r.key for r in records] == ["img0.png", "img1.png"]
    assert records[1].annotations.mask[0].sum() == full.sum()
    name = unique("coco-review")
    report = run_review(records, name, tmp_path / "cache", console=False)
    dataset = fo.load_dataset(name)
    assert report.build.added == 2
    s0, s1 = dataset.match(fo.ViewField("key") == "img0.png").first(), dataset.match(fo.ViewField("key") == "img1.png").first()
    np.testing.assert_allclose(s0.ground_truth.detections[0].bounding_box, [10 / 160, 10 / 90, 40 / 160, 30 / 90])
    assert s0.ground_truth.detections[1].mask.shape == (40, 40)  # polygon mask cropped to its box
    assert s1.ground_truth.detections[0].mask.shape == (50, 40) and s1.ground_truth.detections[0].mask.all()
    assert s0.prelabel.detections[0].confidence == pytest.approx(0.9)
    assert set(report.evaluation) >= {"Car", "Person"}
    assert report.evaluation["Person"]["recall"] == 0.0 and report.evaluation["Car"]["precision"] == 0.5
    assert report.views["missed by the model"] >= 1
    # the same export again: nothing new; an export without img1 keeps it, unless pruning
    assert run_review(records, name, tmp_path / "cache", console=False).build.added == 0 and len(dataset) == 2
    assert run_review(records[:1], name, tmp_path / "cache", console=False).build.total == 2
    assert run_review(records[:1], name, tmp_path / "cache", prune=True, console=False).build.removed == 1
    assert dataset.distinct("key") == ["img0.png"]


def cvat_xml(path: Path) -> Path:
    from cvat_sdk.masks import encode_mask

    mask = np.zeros((200, 120), bool)
    mask[100:110, 30:50] = True
    mask[105, 30:35] = False
    *runs, x1, y1, x2, y2 = encode_mask(mask)
    path.write_text(f"""<?xml version="1.0" encoding="utf-8"?>
<annotations><version>1.1</version>
  <meta><task><labels><label><name>Car</name></label><label><name>Person</name></label></labels></task></meta>
  <image id="0" name="img0.png" width="160" height="90">
    <box label="Car" source="manual" occluded="0" xtl="10" ytl="20" xbr="50" ybr="50" z_order="0"/>
    <box label="Car" source="auto" occluded="0" xtl="11" ytl="20" xbr="50" ybr="50" z_order="0">
      <attribute name="score">0.75</attribute></box>
    <polygon label="Person" source="manual" occluded="0" points="60.0,10.0;100.0,10.0;100.0,40.0" z_order="0"/>
    <points label="Person" source="manual" occluded="0" points="1,1" z_order="0"/>
  </image>
  <image id="1" name="img1.png" width="120" height="200">
    <mask label="Person" source="manual" occluded="0" rle="{', '.join(map(str, runs))}" left="{x1}" top="{y1}"
          width="{x2 - x1 + 1}" height="{y2 - y1 + 1}" z_order="0"/>
  </image>
</annotations>""")
    return path


def test_a_cvat_xml_export_with_boxes_polygons_and_masks_becomes_a_dataset(mongodb, images, tmp_path):
    import fiftyone as fo

    from ml_backend.cvat.records import cvat_xml_records
    from ml_backend.review import run_review

    records = cvat_xml_records(cvat_xml(tmp_path / "annotations.xml"), images, link_base="https://cvat.example/tasks/3")
    first, second = records
    assert list(first.annotations.data["class_name"]) == ["Car", "Person"]  # the <points> shape is not a box
    assert first.predictions.confidence[0] == pytest.approx(0.75) and first.link == "https://cvat.example/tasks/3?frame=0"
    np.testing.assert_allclose(first.annotations.xyxy[1], [60, 10, 100, 40])
    assert second.annotations.mask[0].sum() == 200 - 5 and second.annotations.mask[0][105, 30:35].sum() == 0
    np.testing.assert_allclose(second.annotations.xyxy[0], [30, 100, 50, 110])
    name = unique("cvat-review")
    run_review(records, name, tmp_path / "cache", console=False)
    sample = fo.load_dataset(name).match(fo.ViewField("key") == "img1.png").first()
    assert sample.ground_truth.detections[0].mask.shape == (10, 20)
    assert sample.ground_truth.detections[0].mask.sum() == 195


@pytest.mark.parametrize("broken, problem", [
    ('rle="1, 2"', "rle covers 3 pixels"),
    ('rle="x"', "cannot read points"),
])
def test_a_broken_cvat_mask_is_named_with_its_image_and_label(images, tmp_path, broken, problem):
    from ml_backend.cvat.records import cvat_xml_records

    path = cvat_xml(tmp_path / "annotations.xml")
    text = path.read_text()
    start = text.index('rle="')
    path.write_text(text[:start] + broken + text[text.index('"', start + 5) + 1:])
    with pytest.raises(ConfigError, match=problem) as err:
        cvat_xml_records(path, images)
    assert "img1.png" in str(err.value) and "Person" in str(err.value)


def test_a_coco_image_missing_from_the_folder_is_named(images, tmp_path):
    from ml_backend.coco import read_records

    doc = {"images": [{"id": 1, "file_name": "nope.png", "width": 4, "height": 4}], "annotations": [],
           "categories": [{"id": 1, "name": "Car"}]}
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="image nope.png of .*gt.json is not in"):
        read_records(tmp_path / "gt.json", images)


# -- likely mistakes, embeddings, views --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tiny_models, tmp_path_factory):
    """The tiny SAM's encoder, re-initialised at std 0.02: its saved 1e-10 init makes every feature vanish."""
    import torch

    from ml_backend.models import build_segmenter
    from ml_backend.review.embeddings import EncoderEmbedder

    segmenter = build_segmenter(str(tiny_models["segmenter"]), tmp_path_factory.mktemp("models"), torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in segmenter.model.vision_encoder.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return EncoderEmbedder(segmenter)


def test_injected_label_errors_fill_the_views_and_the_flagged_links(mongodb, embedder, tmp_path):
    import fiftyone as fo

    from ml_backend.review import run_review

    records, injected = synthetic_records(tmp_path / "synthetic", images=24, error_rate=0.2, seed=3)
    copy = tmp_path / "synthetic" / "copy.png"
    shutil.copy(records[0].image, copy)  # a near duplicate
    records.append(LabeledImage(key="copy", image=str(copy), width=128, height=96, predictions=records[0].predictions,
                                annotations=records[0].annotations, link="https://labeling.example/tasks/copy"))
    name = unique("mistakes")
    report = run_review(records, name, tmp_path / "cache", embedder=embedder,
                        plots_dir=tmp_path / "plots", console=False)
    dataset = fo.load_dataset(name)
    assert report.views["likely mistakes"] > 0 and report.views["missed by the model"] > 0
    assert report.views["near duplicates"] >= 2 and any({records[0].key, "copy"} <= set(g) for g in report.duplicates)
    assert set(dataset.list_saved_views()) >= {"likely mistakes", "missed by the model", "near duplicates"}
    # every injected wrong class / shifted box is flagged on its own object
    images_with_label_errors = {records[e["image"]].key for e in injected if "label" in e}
    flagged = {f.key for f in report.flagged if "likely mistakes" in f.reasons}
    assert len(images_with_label_errors & flagged) >= 0.8 * len(images_with_label_errors)
    assert all(f.link for f in report.flagged)
    objects = dataset.filter_labels("ground_truth", fo.ViewField("label_issue") == True)  # noqa: E712
    assert objects.count("ground_truth.detections") > 0
    assert set(objects.distinct("ground_truth.detections.issue_type")) <= {"badloc", "swap"}
    assert dataset.has_field("mistakenness") and dataset.has_field("uniqueness")
    assert report.visualization == "umap" and "ground_truth_viz" in dataset.list_brain_runs()
    viz = dataset.load_brain_results("ground_truth_viz")
    assert viz.points.shape == (dataset.count("ground_truth.detections"), 2)
    assert len(report.plots) == 4 and all(p.read_bytes()[:4] == b"\x89PNG" for p in report.plots)
    assert report.statistics == tmp_path / "plots" / "statistics.json"
    # a refresh without embeddings keeps the near duplicates found before
    refreshed = run_review(records, name, tmp_path / "cache", console=False)
    assert refreshed.duplicates == report.duplicates and refreshed.views["near duplicates"] >= 2
    assert {records[0].key, "copy"} <= {f.key for f in refreshed.flagged if "near duplicates" in f.reasons}
    # what --app serves: the App on loopback, showing this dataset
    from ml_backend.review import open_app

    port = free_port()
    session = open_app(name, "127.0.0.1", port)
    try:
        assert session.dataset.name == name
        deadline = time.time() + 60
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "the FiftyOne App did not answer"
                time.sleep(0.5)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        fo.close_app()


def test_the_detector_backbone_embeds_objects_when_there_is_no_sam(base_pipeline, tmp_path):
    from ml_backend.review.embeddings import BackboneEmbedder, make_embedder

    embedder = make_embedder(segmenter=None, detector=base_pipeline.detector)
    assert isinstance(embedder, BackboneEmbedder)
    image = np.array(make_image(120, 90, 1))
    whole, objects = embedder(image, np.array([[0, 0, 60, 45], [60, 45, 120, 90]], np.float32))
    assert whole.ndim == 1 and objects.shape[0] == 2 and objects.shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(objects, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(objects[0], objects[1])
    with pytest.raises(ConfigError, match="--no-embeddings"):
        make_embedder(None, None)


# -- statistics ----------------------------------------------------------------------------------------------------


def test_label_statistics_on_a_known_dataset_and_plots(tmp_path, capsys):
    def rec(key, names, boxes):
        return LabeledImage(key=key, image=f"{key}.png", width=100, height=100,
                            annotations=make_detections(boxes, np.ones(len(names)), [0] * len(names), names))

    records = [
        rec("a", ["Car", "Car", "Person"], [[0, 0, 10, 10], [0, 0, 20, 20], [0, 0, 50, 50]]),
        rec("b", ["Car"] * 11, [[0, 0, 10, 10]] * 11),
        rec("c", [], []),
        LabeledImage(key="d", image="d.png"),  # not annotated
    ]
    stats = label_stats(records)
    assert (stats.images, stats.annotated) == (4, 3)
    assert stats.objects == {"Car": 13, "Person": 1} and stats.images_per_class == {"Car": 2, "Person": 1}
    assert stats.imbalance == 13.0 and stats.rare == ["Person"]
    assert sorted(stats.labels_per_image) == [0, 3, 11]
    assert stats.box_areas["Person"] == [pytest.approx(0.5)]
    from rich.console import Console

    print_stats(stats, Console(width=120))
    out = capsys.readouterr().out
    assert "imbalance 13.0x" in out and "class 'Person' is rare (1 objects)" in out
    written = save_plots(stats, tmp_path / "plots")
    assert [p.name for p in written] == ["objects_per_class.png", "images_per_class.png", "box_sizes.png",
                                        "labels_per_image.png"]
    assert all(Image.open(p).size[0] > 100 for p in written)
    numbers = json.loads(save_statistics(stats, tmp_path / "plots" / "statistics.json").read_text())
    assert numbers["classes"]["Car"] == {"objects": 13, "images": 2, "rare": False,
                                         "box_size": {"min": 0.1, "median": 0.1, "max": 0.2}}
    assert numbers["imbalance"] == 13.0 and numbers["rare"] == ["Person"] and numbers["annotated"] == 3
    assert numbers["labels_per_image"] == {"min": 0, "median": 3, "max": 11, "histogram": {"0": 1, "3": 1, "11": 1}}


# -- the command ---------------------------------------------------------------------------------------------------


def test_the_review_command_reads_a_cvat_export_and_writes_flagged_tasks_and_plots(mongodb, images, tiny_models, tmp_path):
    from typer.testing import CliRunner

    from ml_backend.cli import app

    xml = cvat_xml(tmp_path / "annotations.xml")
    args = ["review", "--cvat", str(xml), "--images", str(images), "--out", str(tmp_path / "out"), "--name",
            unique("cli-cvat"), "--segmenter", str(tiny_models["segmenter"]), "--viz", "pca", "--no-app"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    flagged = json.loads((tmp_path / "out" / "flagged.json").read_text())
    assert flagged["dataset"].startswith("cli-cvat") and {f["key"] for f in flagged["flagged"]} <= {"img0.png", "img1.png"}
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) == 4
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 added, 2 refreshed, 0 removed" in again.output


def test_the_review_flags_each_injected_error_on_its_object_and_in_flagged_json(mongodb, tmp_path):
    """The whole review (review_folder) on an independent generator's data: flags on the objects, issue_type on every
    object, flagged.json and statistics.json."""
    import fiftyone as fo

    from ml_backend.review import review_folder

    from .review_errors import flag_recall, generate

    records, injected = generate(tmp_path / "generated", images=45, seed=7)
    name = unique("flags")
    report = review_folder(records, name, tmp_path / "out")
    dataset = fo.load_dataset(name)
    label_flags, prediction_flags, types = {}, {}, {}
    for i, record in enumerate(records):
        sample = dataset.match(fo.ViewField("key") == record.key).first()
        for j, det in enumerate(sample.ground_truth.detections):
            label_flags[(i, j)] = det.label_issue
            types[(i, j)] = det.issue_type
            assert det.issue_type in ("swap", "badloc") if det.label_issue else det.issue_type == "none"
        for j, det in enumerate(sample.prelabel.detections):
            prediction_flags[(i, j)] = det.overlooked
            assert det.issue_type == ("overlooked" if det.overlooked else "none")
    result = flag_recall(injected, label_flags, prediction_flags)
    assert min(result[k] for k in ("wrong_class", "shifted_box", "missing_label")) >= 0.8, result
    assert result["false_flag_rate"] <= 0.15, result
    assert all(types[(e.image, e.index)] == "swap" for e in injected if e.kind == "wrong_class")
    assert dataset.count("ground_truth.detections.issue_type") == dataset.count("ground_truth.detections")
    assert dataset.count("prelabel.detections.issue_type") == dataset.count("prelabel.detections")
    # what people open: the saved view and flagged.json hold every image with an injected error
    with_errors = {records[e.image].key for e in injected}
    assert with_errors <= set(dataset.load_saved_view("likely mistakes").values("key"))
    flagged = json.loads((tmp_path / "out" / "flagged.json").read_text())
    assert with_errors <= {f["key"] for f in flagged["flagged"] if "likely mistakes" in f["reasons"]}
    statistics = json.loads((tmp_path / "out" / "plots" / "statistics.json").read_text())
    assert statistics["annotated"] == len(records) == statistics["images"]
    assert statistics["objects"] == sum(len(r.annotations) for r in records)
    assert statistics["classes"]["zebra"]["rare"] and "zebra" in statistics["rare"]
    assert sum(statistics["labels_per_image"]["histogram"].values()) == len(records)
    assert report.statistics == tmp_path / "out" / "plots" / "statistics.json"


def test_the_review_command_names_a_missing_source(tmp_path):
    from typer.testing import CliRunner

    from ml_backend.cli import app

    result = CliRunner().invoke(app, ["review", "--coco", str(tmp_path / "gt.json")])
    assert result.exit_code == 2 and "--coco and --cvat need --images DIR" in result.output
    result = CliRunner().invoke(app, ["review", "--coco", str(tmp_path / "gt.json"), "--images", str(tmp_path)])
    assert result.exit_code == 2 and "cannot read COCO file" in result.output


def test_a_configured_clip_model_embeds_images_and_object_crops(mongodb, images, tmp_path):
    from typer.testing import CliRunner

    from ml_backend.cli import app
    from ml_backend.models.tiny import write_tiny_clip
    from ml_backend.review.embeddings import ClipEmbedder

    clip = write_tiny_clip(tmp_path / "clip")
    embedder = ClipEmbedder(str(clip), tmp_path, torch.device("cpu"))
    image = np.array(make_image(80, 60, seed=2))
    whole, objects = embedder(image, np.array([[0, 0, 40, 30], [70, 50, 80, 60], [79.5, 59.5, 80, 60]], np.float32))
    assert whole.shape == (8,) and objects.shape == (3, 8)
    assert np.allclose(np.linalg.norm(objects, axis=1), 1, atol=1e-5) and not np.allclose(objects[0], objects[1])
    xml = cvat_xml(tmp_path / "annotations.xml")
    result = CliRunner().invoke(app, ["review", "--cvat", str(xml), "--images", str(images), "--out", str(tmp_path / "out"),
                                      "--name", unique("cli-clip"), "--embedding-model", str(clip), "--viz", "pca"])
    assert result.exit_code == 0, result.output
