"""`prelabel effort`: the edit-effort measure on hand-made prediction/annotation pairs with known answers, and the
command end to end against a real Label Studio project."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml_backend.effort import EditCounts, EffortError, EffortWeights, measure_effort, records_effort, task_edits
from ml_backend.types import LabeledImage, make_detections

from .conftest import LEGACY_TOKEN


def dets(*boxes):
    """Detections from (label, x1, y1, x2, y2) tuples."""
    if not boxes:
        return make_detections(np.zeros((0, 4)), [], [], [])
    names = [b[0] for b in boxes]
    return make_detections([b[1:] for b in boxes], np.ones(len(boxes)), [0] * len(boxes), names)


def counts(report_or_counts) -> tuple:
    c = getattr(report_or_counts, "overall", report_or_counts)
    return c.kept, c.relabelled, c.moved, c.deleted, c.added, c.boxes


# moved + relabelled + deleted + added + one kept, on one image; computed by hand:
# effort = 0 (kept) + 0.2 (relabel) + 0.5 (move) + 0.1 (delete) + 1.0 (add) = 1.8; scratch = 4 annotated boxes
PREDICTED = dets(("Car", 0, 0, 10, 10),       # kept
                 ("Car", 20, 0, 30, 10),      # relabelled to Person (same box)
                 ("Car", 40, 0, 50, 10),      # moved: annotation shifted by 2 px, IoU 8/12 = 0.667
                 ("Person", 80, 80, 90, 90))  # deleted: nothing annotated there
ANNOTATED = dets(("Car", 0, 0, 10, 10),
                 ("Person", 20, 0, 30, 10),
                 ("Car", 42, 0, 52, 10),
                 ("Person", 60, 20, 70, 30))  # added


def test_every_prediction_kept_saves_all_the_effort():
    boxes = [("Car", 0, 0, 10, 10), ("Person", 20, 20, 40, 50), ("Car", 5, 5, 15, 15)]
    report = measure_effort([(dets(*boxes), dets(*reversed(boxes)))])
    assert counts(report) == (3, 0, 0, 0, 0, 3)
    assert report.saved == 1.0 and report.as_dict()["overall"]["saved_percent"] == 100.0
    assert report.labels["Car"].saved(report.weights) == 1.0


@pytest.mark.parametrize("predictions", [None, dets()], ids=["no prediction", "empty prediction"])
def test_nothing_predicted_means_every_box_added_and_nothing_saved(predictions):
    report = measure_effort([(predictions, dets(("Car", 0, 0, 10, 10), ("Person", 5, 5, 9, 9)))])
    assert counts(report) == (0, 0, 0, 0, 2, 2)
    assert report.saved == 0.0 and report.without_prediction == 1
    assert report.as_dict()["overall"].items() >= {"edit_effort": 2.0, "scratch_effort": 2.0, "saved_percent": 0.0}.items()


def test_moved_relabelled_deleted_and_added_boxes_cost_what_was_computed_by_hand():
    report = measure_effort([(PREDICTED, ANNOTATED)])
    assert counts(report) == (1, 1, 1, 1, 1, 4)
    assert report.overall.edit_effort(report.weights) == pytest.approx(1.8)
    assert report.saved == pytest.approx(1 - 1.8 / 4)  # 55 %
    # per label: Car = kept + moved (0.5 of 2 boxes -> 75 %); Person = relabelled + added + the deleted Person
    # (0.2 + 1.0 + 0.1 = 1.3 of 2 boxes -> 35 %)
    assert counts(report.labels["Car"]) == (1, 0, 1, 0, 0, 2)
    assert counts(report.labels["Person"]) == (0, 1, 0, 1, 1, 2)
    doc = report.as_dict()
    assert doc["labels"]["Car"]["saved_percent"] == pytest.approx(75.0)
    assert doc["labels"]["Person"]["saved_percent"] == pytest.approx(35.0)
    # the greedy fallback (no scipy) agrees here; other weights change only the arithmetic
    assert counts(measure_effort([(PREDICTED, ANNOTATED)], hungarian=False)) == counts(report)
    cheap = measure_effort([(PREDICTED, ANNOTATED)], weights=EffortWeights.parse(["move=0.25", "add=2"]))
    assert cheap.saved == pytest.approx(1 - (0.2 + 0.25 + 0.1 + 2.0) / 8)


def test_a_box_moved_and_relabelled_counts_as_both():
    edits = task_edits(dets(("Car", 0, 0, 10, 10)), dets(("Person", 2, 0, 12, 10)))
    assert counts(edits["Person"]) == (0, 1, 1, 0, 0, 1)
    assert edits["Person"].edit_effort(EffortWeights()) == pytest.approx(0.7)


def test_the_iou_threshold_is_inclusive():
    predicted, annotated = dets(("Car", 0, 0, 100, 100)), dets(("Car", 0, 0, 90, 100))  # IoU exactly 0.9
    assert counts(task_edits(predicted, annotated, iou=0.9)["Car"]) == (1, 0, 0, 0, 0, 1)
    assert counts(task_edits(predicted, annotated, iou=0.91)["Car"]) == (0, 0, 1, 0, 0, 1)
    relabelled = dets(("Person", 0, 0, 90, 100))
    assert counts(task_edits(predicted, relabelled, iou=0.9)["Person"]) == (0, 1, 0, 0, 0, 1)
    assert counts(task_edits(predicted, relabelled, iou=0.91)["Person"]) == (0, 1, 1, 0, 0, 1)
    # boxes that touch without overlapping are no match: one deleted, one added
    far = task_edits(predicted, dets(("Car", 100, 0, 150, 100)))
    assert counts(far["Car"]) == (0, 0, 0, 1, 1, 1)


def test_matching_is_one_to_one_and_maximises_total_iou():
    # greedy takes the best single pair (big prediction - A1, IoU 0.9) and leaves the small prediction without a
    # partner; Hungarian pairs small - A1 (0.889) and big - A2 (0.111): summed IoU 1.0 > 0.9
    predicted = dets(("Car", 0, 0, 10, 10), ("Car", 0, 0, 10, 8))
    annotated = dets(("Car", 0, 0, 10, 9), ("Car", 0, 8, 10, 18))
    assert counts(task_edits(predicted, annotated, iou=0.9)["Car"]) == (0, 0, 2, 0, 0, 2)
    assert counts(task_edits(predicted, annotated, iou=0.9, hungarian=False)["Car"]) == (1, 0, 0, 1, 1, 2)


def test_records_without_an_annotation_are_skipped_and_counted():
    records = [LabeledImage(key="1", image="a.png", predictions=PREDICTED, annotations=ANNOTATED),
               LabeledImage(key="2", image="b.png", predictions=PREDICTED),  # not annotated
               LabeledImage(key="3", image="c.png", annotations=dets(("Car", 0, 0, 5, 5)))]
    report = records_effort(records)
    assert (report.tasks, report.skipped_unannotated, report.without_prediction) == (2, 1, 1)
    assert counts(report) == (1, 1, 1, 1, 2, 5)


def test_unusable_options_are_named():
    with pytest.raises(EffortError, match="KIND=VALUE"):
        EffortWeights.parse(["jump=1"])
    with pytest.raises(EffortError, match="not a number"):
        EffortWeights.parse(["move=a lot"])
    with pytest.raises(EffortError, match="add must be > 0"):
        EffortWeights(add=0)
    with pytest.raises(EffortError, match=r"\(0, 1\]"):
        task_edits(PREDICTED, ANNOTATED, iou=0)
    assert EditCounts().saved(EffortWeights()) is None  # nothing annotated: undefined, not 100 %


# -- the command against a real Label Studio -----------------------------------------------------------------------

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
</View>"""
W, H = 200, 100


def rect(label: str, xyxy, score: float | None = None) -> dict:
    from ml_backend.labelstudio.convert import box_to_percent

    r = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": W, "original_height": H,
         "value": box_to_percent(xyxy, W, H) | {"rectanglelabels": [label]}}
    return r | ({"score": score} if score is not None else {})


def test_the_effort_command_measures_a_label_studio_project(label_studio, tmp_path):
    from label_studio_sdk.client import LabelStudio
    from typer.testing import CliRunner

    from ml_backend.cli import app
    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    project = ls.projects.create(title="effort project", label_config=CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"data": {"image": f"/data/upload/effort/{i}.png"}}
                                                     for i in range(4)])
    a, b, c, d = sorted(t.id for t in ls.tasks.list(project=project.id))
    ls.projects.import_predictions(id=project.id, request=[
        # an older model version on task a, which --model-version v1 leaves out
        {"task": a, "model_version": "v0", "result": [rect("Person", (0, 0, 200, 100), 0.3)]},
        {"task": a, "model_version": "v1", "result": [rect("Car", (10, 10, 60, 60), 0.9),
                                                      rect("Person", (100, 10, 150, 60), 0.8)]},
        {"task": b, "model_version": "v1", "result": [rect("Car", (0, 0, 50, 50), 0.9),
                                                      rect("Person", (150, 50, 190, 90), 0.6)]},
        {"task": d, "model_version": "v1", "result": [rect("Car", (0, 0, 20, 20), 0.9)]},  # never annotated
    ])
    # a: Car kept, Person relabelled to Car; b: Car moved (IoU 2000/3000), the Person deleted and another drawn;
    # c: nothing predicted, one Person drawn; d: not annotated (skipped)
    ls.annotations.create(id=a, result=[rect("Car", (10, 10, 60, 60)), rect("Car", (100, 10, 150, 60))])
    ls.annotations.create(id=b, result=[rect("Car", (10, 0, 60, 50)), rect("Person", (60, 60, 90, 90))])
    ls.annotations.create(id=c, result=[rect("Person", (5, 5, 25, 25))])

    out = tmp_path / "effort.json"
    result = CliRunner().invoke(app, ["effort", "--project", str(project.id), "--url", label_studio, "--api-key",
                                      LEGACY_TOKEN, "--model-version", "v1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "effort saved: 44.0 %" in result.output and "overall" in result.output
    doc = json.loads(out.read_text())
    assert doc["project"] == project.id and doc["model_versions"] == ["v1"] and doc["iou"] == 0.9
    assert doc["tasks"] == {"measured": 3, "skipped_unannotated": 1, "without_prediction": 1}
    overall = doc["overall"]
    assert {k: overall[k] for k in ("kept", "relabelled", "moved", "deleted", "added", "boxes")} == \
        {"kept": 1, "relabelled": 1, "moved": 1, "deleted": 1, "added": 2, "boxes": 5}
    # effort 0 + 0.2 + 0.5 + 0.1 + 2 x 1.0 = 2.8 of 5 boxes from scratch
    assert overall["edit_effort"] == pytest.approx(2.8) and overall["saved_percent"] == pytest.approx(44.0)
    car, person = doc["labels"]["Car"], doc["labels"]["Person"]
    assert (car["kept"], car["relabelled"], car["moved"], car["boxes"]) == (1, 1, 1, 3)
    assert car["saved_percent"] == pytest.approx(100 * (1 - 0.7 / 3))
    assert (person["added"], person["deleted"], person["boxes"]) == (2, 1, 2)
    assert person["saved_percent"] == pytest.approx(-5.0)

    # a looser threshold and dearer drawing: b's Car (IoU 0.67) now counts as kept; effort 0.2 + 0.1 + 2 x 2 = 4.3
    # of 5 x 2 from scratch
    result = CliRunner().invoke(app, ["effort", "--project", str(project.id), "--url", label_studio, "--api-key",
                                      LEGACY_TOKEN, "--model-version", "v1", "--iou", "0.5", "--weight", "add=2",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    overall = json.loads(out.read_text())["overall"]
    assert (overall["kept"], overall["moved"], overall["scratch_effort"]) == (2, 0, 10.0)
    assert overall["saved_percent"] == pytest.approx(57.0)

    result = CliRunner().invoke(app, ["effort", "--project", str(project.id), "--url", label_studio, "--api-key",
                                      LEGACY_TOKEN, "--weight", "draw=2"])
    assert result.exit_code == 2 and "KIND=VALUE" in result.output
    result = CliRunner().invoke(app, ["effort", "--project", "999999", "--url", label_studio, "--api-key", LEGACY_TOKEN])
    assert result.exit_code == 2 and "no project 999999" in result.output
