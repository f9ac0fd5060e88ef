"""Operating points (`--target`): the threshold chosen for a precision, recall or F1 target on hand-computed cases,
the unreachable case said plainly, per-label overrides, the Wilson interval against known values, the matches
pycocotools gives, and the outputs of `prelabel prompts eval --target` and of distill's model card."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import supervision as sv
import yaml
from PIL import Image
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.evaluation import Matches, coco_evaluate, wilson_interval
from ml_backend.ontology import PromptsFile
from ml_backend.operating import (
    Target, TargetError, Targets, f1_interval, operating_point, operating_points, threshold_points,
)
from ml_backend.types import make_detections
from ml_backend.workbench import (
    CandidateResult, DetectParams, PredictionCache, TeacherComparison, WorkbenchReport, image_hash, model_key,
)

from .test_workbench import coco_doc, write_images

# Car, scores high to low (T: matches an object, F: does not), 8 objects of which 2 are never detected:
#   score  .95 .90 .85 .80 .70 .60 .50 .40 .30 .20
#   match   T   T   F   T   T   F   T   F   F   T
#   TP      1   2   2   3   4   4   5   5   5   6
#   FP      0   0   1   1   1   2   2   3   4   4
#   P      1.0 1.0 .67 .75 .80 .67 .71 .63 .56 .60
#   R      .13 .25 .25 .38 .50 .50 .63 .63 .63 .75
#   F1 = 2TP / (2TP + FP + FN), FN = 8 - TP:  .22 .40 .36 .50 .62 .57 .67 .63 .59 .67
CAR = Matches.of([.95, .9, .85, .8, .7, .6, .5, .4, .3, .2], [1, 1, 0, 1, 1, 0, 1, 0, 0, 1], 8)


def point(text: str | None, matches: Matches = CAR):
    return operating_point("Car", matches, Target.parse(text) if text else None)


def counts(p) -> tuple:
    return p.threshold, p.tp, p.fp, p.fn


# -- the selection on hand-computed cases ------------------------------------------------------------------------


def test_a_precision_target_takes_the_threshold_with_the_most_recall_that_reaches_it():
    p = point("precision=0.8")  # reached at .95, .90 and .70: most recall at .70
    assert counts(p) == (0.7, 4, 1, 4) and p.met and p.chosen_by == "target"
    assert (p.precision, p.recall, p.f1) == (0.8, 0.5, pytest.approx(8 / 13))
    assert p.note() == "precision >= 0.8 met"
    assert counts(point("precision=1")) == (0.9, 2, 0, 6)  # a tie on precision: the one with more recall


def test_a_recall_target_takes_the_best_precision_that_still_reaches_it():
    p = point("recall=0.5")  # reached from .70 down: precision .80 there is the best
    assert counts(p) == (0.7, 4, 1, 4) and p.met
    assert counts(point("recall=0.75")) == (0.2, 6, 4, 2)
    # not always the highest threshold: here a lower one is both more precise and finds more
    lower = Matches.of([.9, .8, .7], [0, 1, 1], 2)
    assert counts(point("recall=0.5", lower)) == (0.7, 2, 1, 0)


def test_an_f1_target_takes_the_most_recall_among_thresholds_reaching_it():
    p = point("f1=0.6")  # .70 (.62), .50 (.67), .40 (.63), .20 (.67): most recall at .20
    assert counts(p) == (0.2, 6, 4, 2) and p.met and p.f1 == pytest.approx(2 / 3)
    assert counts(point("f1=0.65")) == (0.2, 6, 4, 2)


def test_an_unreachable_target_says_so_with_the_best_value_and_falls_back_to_the_best_f1():
    p = point("recall=0.9")  # recall never passes .75 (at .20)
    assert p.met is False and p.chosen_by == "best F1 (target not reached)"
    assert p.best == {"value": 0.75, "threshold": 0.2}
    assert counts(p) == (0.5, 5, 2, 3)  # best F1 2/3 at .50 and .20: the higher threshold wins the tie
    assert p.note() == ("recall >= 0.9 NOT reached: the best recall is 0.750 (at threshold 0.2); threshold at "
                        "the best F1 instead")
    q = point("precision=0.9", Matches.of([.9, .8], [0, 1], 1))
    assert q.met is False and q.best == {"value": 0.5, "threshold": 0.8} and counts(q) == (0.8, 1, 1, 0)
    nothing = point("precision=0.5", Matches.of([], [], 3))
    assert nothing.met is False and counts(nothing) == (None, 0, 0, 3) and nothing.precision is None
    assert nothing.recall == 0 and "nothing was detected" in nothing.note()
    assert point("recall=0.5", Matches.of([.9], [0], 0)) is None  # no object of the label: no recall to speak of


def test_without_a_target_the_point_is_the_best_f1():
    p = point(None)
    assert counts(p) == (0.5, 5, 2, 3) and p.met is None and p.chosen_by == "best F1 (no target)"


def test_tied_scores_are_one_threshold_and_the_written_threshold_keeps_the_chosen_boxes():
    tied = Matches.of([.8, .8, .8, .5], [1, 0, 1, 1], 3)
    points = threshold_points(tied)
    assert points["threshold"].tolist() == [0.8, 0.5] and points["tp"].tolist() == [2, 3]
    # a threshold of .8 keeps all three .8 boxes: precision 1 (the first one alone) is no point on the curve
    assert point("precision=1", tied).best == {"value": 0.75, "threshold": 0.5}
    # float32 scores: written rounded down to 4 decimals where no lower score slips in, else exactly
    scores = np.array([0.612371, 0.61231, 0.3], np.float32)
    p = point("recall=0.6", Matches.of(scores, [1, 1, 0], 3))
    assert p.threshold == 0.6123 and p.tp == 2
    q = point("recall=0.3", Matches.of(scores, [1, 0, 1], 3))  # 0.6123 would also keep .61231: exact instead
    assert q.threshold == float(scores[0]) and q.tp == 1 and q.fp == 0
    assert scores[1] < np.float32(q.threshold) <= scores[0]
    assert point("recall=1", Matches.of(scores, [1, 1, 1], 3)).threshold == 0.3


def test_a_label_target_overrides_the_overall_one_and_labels_match_case_insensitively():
    person = Matches.of([.9, .8, .7, .6], [1, 0, 1, 0], 2)
    targets = Targets.parse(["recall=0.5", "car:precision=0.8"]).matched(["Car", "Person"])
    assert targets.as_list() == ["recall=0.5", "Car:precision=0.8"]
    points = operating_points({"Car": CAR, "Person": person}, targets)
    assert str(points["Car"].target) == "Car:precision=0.8" and counts(points["Car"]) == (0.7, 4, 1, 4)
    assert str(points["Person"].target) == "recall=0.5" and counts(points["Person"]) == (0.9, 1, 0, 1)
    only_car = Targets.parse(["Car:f1=0.6"]).matched(["Car", "Person"])
    points = operating_points({"Car": CAR, "Person": person}, only_car)
    assert points["Person"].target is None and points["Person"].chosen_by == "best F1 (no target)"
    assert Target.parse("Traffic light:F1=0.9") == Target("f1", 0.9, "Traffic light")


@pytest.mark.parametrize("texts, problem", [
    (["precision"], "give METRIC=VALUE with METRIC one of precision, recall, f1"),
    (["accuracy=0.9"], "'accuracy=0.9': give METRIC=VALUE"),
    (["precision=95"], "must be a number above 0 and at most 1"),
    (["recall=0"], "must be a number above 0 and at most 1"),
    (["f1=high"], "must be a number above 0 and at most 1"),
    ([":precision=0.9"], "the label before ':' is empty"),
    (["precision=0.9", "recall=0.8"], "give one overall target"),
    (["Car:precision=0.9", "Car:recall=0.8"], "label 'Car' has two targets"),
    (["Truck:recall=0.8"], "label 'Truck' is not in the data; its labels are: 'Car', 'Person'"),
])
def test_a_bad_target_is_named(texts, problem):
    with pytest.raises(TargetError, match=problem):
        Targets.parse(texts).matched(["Car", "Person"])


# -- intervals ---------------------------------------------------------------------------------------------------


def test_the_wilson_interval_against_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 5) == (0.0, pytest.approx(0.4345, abs=1e-4))
    assert wilson_interval(3, 0) is None
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((1, 1), (4, 5), (17, 40), (99, 100)):
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == (pytest.approx(ci.low, abs=1e-6), pytest.approx(ci.high, abs=1e-6))


def test_the_intervals_of_a_point_come_from_its_counts():
    p = point("precision=0.8")  # TP 4, FP 1, FN 4
    assert p.precision_ci == wilson_interval(4, 5) and p.recall_ci == wilson_interval(4, 8)
    j_lo, j_hi = wilson_interval(4, 9)  # J = TP / (TP + FP + FN), F1 = 2J / (1 + J)
    assert p.f1_ci == (pytest.approx(2 * j_lo / (1 + j_lo)), pytest.approx(2 * j_hi / (1 + j_hi)))
    assert p.f1_ci[0] < p.f1 < p.f1_ci[1]
    assert f1_interval(10, 0, 0)[1] == 1.0 and f1_interval(10, 0, 0)[0] < 1  # perfect on 10 objects: not certain
    assert f1_interval(0, 0, 0) is None


# -- matches from pycocotools ------------------------------------------------------------------------------------


def test_coco_evaluate_gives_each_detection_its_unrounded_score_and_match():
    truth = [make_detections(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.ones(2), np.zeros(2, int),
                             ["Car", "Car"]), None]
    found = [make_detections(np.array([[0, 0, 10, 10], [5, 5, 5, 9], [50, 50, 60, 60], [21, 20, 40, 40]], np.float32),
                             np.array([0.123456, 0.9, 0.8, 0.33333]), np.zeros(4, int), ["Car"] * 4),
             make_detections(np.array([[1, 1, 9, 9]], np.float32), np.array([0.7]), np.zeros(1, int), ["Car"])]
    result = coco_evaluate(truth, found, ["Car", "Bus"], [(64, 64), (32, 32)])
    m = result.matches["Car"]  # the box without area is dropped, the others keep their own score
    expected = [(0.123456, True), (0.33333, True), (0.7, False), (0.8, False)]  # pycocotools sees 0.1235, 0.3333
    assert sorted(zip(m.scores.tolist(), m.tp.tolist())) == [(float(np.float32(s)), tp) for s, tp in expected]
    assert m.truth == 2 and result.matches["Bus"].truth == 0 and not len(result.matches["Bus"].scores)
    nothing = coco_evaluate(truth, [None, sv.Detections.empty()], ["Car"], [(64, 64), (32, 32)])
    assert nothing.matches["Car"].truth == 2 and not len(nothing.matches["Car"].scores)


# -- the command -------------------------------------------------------------------------------------------------


def cached_workbench(tmp_path, ref: str):
    """Two images and predictions put into the cache (no model runs). Car ('car'): per image a right box at .9 and
    a false one at .3, and on image 0 a false one at .95 -> precision never passes 2/3, best F1 at .9 (2 TP, 1 FP).
    Person ('pedestrian', 4 people): TP .9, TP .8, FP .7, TP .6, FP .5 -> precision 1 down to .8 (recall .5)."""
    paths = write_images(tmp_path / "images")[:2]
    cars = [[[10, 10, 50, 40]], [[20, 30, 60, 80]]]
    people = [[[60, 5, 90, 60], [100, 10, 140, 70]], [[5, 5, 40, 50], [70, 10, 120, 60]]]
    (tmp_path / "gt.json").write_text(json.dumps(coco_doc(paths, {"Car": cars, "Person": people})))
    model_dir = tmp_path / "model-dir"
    key, params = model_key(ref, model_dir), DetectParams()
    cache = PredictionCache(tmp_path / "cache")
    far = np.array([[300, 300, 310, 310]], np.float32)
    for i, p in enumerate(paths):
        h = image_hash(np.array(Image.open(p).convert("RGB")))
        car_boxes = cars[i] + [[0, 60, 30, 89]] + ([[100, 0, 130, 20]] if i == 0 else [])
        cache.put(h, key, ("car",), params, np.array(car_boxes, np.float32), np.array([0.9, 0.3, 0.95][:len(car_boxes)]))
        right, fp = np.array(people[i], np.float32), far + 5 * i
        pedestrian = [(right[0], 0.9 - 0.1 * i), (fp[0], 0.7 - 0.2 * i)] + ([(right[1], 0.6)] if i == 0 else [])
        cache.put(h, key, ("pedestrian",), params, np.array([b for b, _ in pedestrian]),
                  np.array([s for _, s in pedestrian], np.float32))
    cache.close()
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text(f"models: [{ref}]\nlabels:\n  Car: [car]\n  Person: [pedestrian]\n")
    return ["prompts", "eval", "--coco", str(tmp_path / "gt.json"), "--images", str(tmp_path / "images"),
            "--candidates", str(candidates), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")], \
        {"MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1", "COLUMNS": "220"}


@pytest.mark.slow  # builds a workbench run end to end (the full suite runs it)
def test_prompts_eval_with_targets_writes_the_chosen_thresholds_intervals_and_what_is_not_reached(tiny_models,
                                                                                                   tmp_path):
    args, env = cached_workbench(tmp_path, str(tiny_models["detector"]))
    result = CliRunner().invoke(app, args + ["--target", "precision=0.95", "--target", "car:precision=0.9"], env=env)
    assert result.exit_code == 0, result.output
    assert "detector runs: 0 computed" in result.output
    # Person: precision >= .95 met at .8 with 2 TP of 4; Car: precision >= .9 never, best 2/3 at .9 = its best F1.
    # Scores are float32: .9 is 0.89999998, so its threshold is written 0.8999 (0.9 would lose those boxes)
    assert "Person: precision >= 0.95 met" in result.output
    assert ("Car: precision >= 0.9 NOT reached: the best precision is 0.667 (at threshold 0.8999); threshold at the "
            "best F1 instead") in result.output
    p_lo, p_hi = wilson_interval(2, 2)
    assert f"1.00 [{p_lo:.2f}, {p_hi:.2f}]" in result.output  # Person's precision in the table

    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["targets"] == ["precision=0.95", "Car:precision=0.9"] and "Wilson" in doc["intervals"]
    person = doc["winners"]["Person"]["operating_point"]
    assert person | {"precision_ci": None, "recall_ci": None, "f1_ci": None} == {
        "target": "precision=0.95", "met": True, "chosen_by": "target", "note": "precision >= 0.95 met",
        "threshold": 0.8, "tp": 2, "fp": 0, "fn": 2, "truth": 4, "precision": 1.0, "recall": 0.5, "f1": 0.6667,
        "precision_ci": None, "recall_ci": None, "f1_ci": None, "best": None}
    assert person["precision_ci"] == [round(p_lo, 4), round(p_hi, 4)]
    assert person["recall_ci"] == [round(v, 4) for v in wilson_interval(2, 4)]
    car = doc["winners"]["Car"]["operating_point"]
    assert (car["met"], car["threshold"], car["tp"], car["fp"], car["fn"]) == (False, 0.8999, 2, 1, 0)
    assert car["best"] == {"value": 0.6667, "threshold": 0.8999}
    assert all("operating_point" in r for r in doc["results"])

    prompts_path = tmp_path / "out" / "prompts.yaml"
    prompts = PromptsFile.load(prompts_path)  # still loadable, thresholds the chosen ones
    assert prompts.labels["Person"].threshold == 0.8 and prompts.labels["Car"].threshold == 0.8999
    text = prompts_path.read_text()
    assert "#   Person: AP" in text and "precision >= 0.95 met; at 0.8: P 1.00 [" in text
    assert "Car: AP" in text and "precision >= 0.9 NOT reached" in text

    plain = CliRunner().invoke(app, args, env=env)  # without a target: the best-F1 threshold, as before
    assert plain.exit_code == 0 and PromptsFile.load(prompts_path).labels["Person"].threshold == 0.6
    assert "targets" not in json.loads((tmp_path / "out" / "report.json").read_text())


def test_prompts_eval_names_a_bad_target_before_any_model_runs(tiny_models, tmp_path):
    args, env = cached_workbench(tmp_path, str(tiny_models["detector"]))
    result = CliRunner().invoke(app, args + ["--target", "Truck:recall=0.8"], env=env)
    assert result.exit_code == 2 and "label 'Truck' is not in the data; its labels are: 'Car', 'Person'" in result.output
    result = CliRunner().invoke(app, args + ["--target", "precision=high"], env=env)
    assert result.exit_code == 2 and "--target 'precision=high'" in result.output
    assert not (tmp_path / "out").exists()


# -- distill's model card ----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_distilled_students_model_card_states_its_operating_points(tmp_path):
    from ml_backend.distill.synthetic import generate

    generate(tmp_path / "data", 12, seed=5, size=(64, 64))
    out = tmp_path / "student"
    args = ["distill", "--coco", str(tmp_path / "data" / "annotations.json"), "--images", str(tmp_path / "data" / "images"),
            "--out", str(out), "--image-size", "64", "--pretrained", "scratch", "--epochs", "1", "--batch-size", "8",
            "--no-export", "--min-map", "0", "--min-vs-teacher", "0", "--target", "recall=0.01",
            "--target", "Circle:precision=1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    student = report["student"]
    assert student["targets"] == ["recall=0.01", "circle:precision=1"]
    points = student["operating_points"]
    assert set(points) == {name for name, s in student["per_label"].items() if s["truth"]}
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Operating points (held-out validation split, target recall=0.01, circle:precision=1)" in card
    assert "Wilson" in card
    for name, p in points.items():
        assert p["tp"] + p["fn"] == student["per_label"][name]["truth"]
        target = "circle:precision=1" if name == "circle" else "recall=0.01"
        assert p["target"] == target
        if p["threshold"] is not None:
            assert p["precision_ci"] == [round(v, 4) for v in wilson_interval(p["tp"], p["tp"] + p["fp"])]
        assert p["recall_ci"] == [round(v, 4) for v in wilson_interval(p["tp"], p["tp"] + p["fn"])]
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} | {target} |"))
        assert f"{p['tp']} / {p['fp']} / {p['fn']}" in row and p["note"] in row
    thresholds = {n: p["threshold"] for n, p in points.items() if p["threshold"] is not None}
    if thresholds:  # the card's prompts file loads, with the chosen thresholds
        snippet = card.split("```yaml\n", 1)[1].split("```", 1)[0]
        served = PromptsFile.model_validate(yaml.safe_load(snippet))
        assert {n: e.threshold for n, e in served.labels.items()} == thresholds
    assert "student operating points on the held-out images" in result.output


def test_distill_names_a_bad_target_before_training(tmp_path):
    from ml_backend.distill.synthetic import generate

    generate(tmp_path / "data", 4, seed=1, size=(64, 64))
    base = ["distill", "--coco", str(tmp_path / "data" / "annotations.json"), "--images",
            str(tmp_path / "data" / "images"), "--out", str(tmp_path / "student"), "--image-size", "64"]
    result = CliRunner().invoke(app, base + ["--target", "Truck:recall=0.5"])
    assert result.exit_code == 2, result.output
    assert "label 'Truck' is not in the data; its labels are: 'circle', 'square', 'triangle'" in result.output
    result = CliRunner().invoke(app, base + ["--target", "precision=2"])
    assert result.exit_code == 2 and "--target 'precision=2'" in result.output
    assert not (tmp_path / "student" / "checkpoints").exists()


# -- choosing the winner by the target ---------------------------------------------------------------------------


def test_with_a_target_the_candidate_that_meets_it_wins_over_a_better_ap():
    target = Target.parse("precision=0.9")
    # 'car': P 1.0 at .8 with recall .5 (meets it); 'auto': its best precision is 3/4 (misses it), but a better AP
    meets = operating_point("Car", Matches.of([.9, .8, .7], [1, 1, 0], 4), target)
    misses = operating_point("Car", Matches.of([.9, .8, .7, .6], [0, 1, 1, 1], 4), target)
    auto = CandidateResult("m1", "Car", ["auto"], ap=0.6, ap50=0.8, truth=4, predicted=4, best=None, operating=misses)
    car = CandidateResult("m2", "Car", ["car"], ap=0.4, ap50=0.5, truth=4, predicted=3, best=None, operating=meets)
    assert (meets.met, meets.recall, misses.met) == (True, 0.5, False)
    assert max([auto, car], key=CandidateResult.rank) is car
    assert max([replace(auto, operating=None), replace(car, operating=None)], key=CandidateResult.rank).name == "auto"
    # both meet it: the one with more recall there wins, whatever the AP
    more = operating_point("Car", Matches.of([.9, .8, .7], [1, 1, 1], 4), target)
    assert max([car, replace(car, prompts=["vehicle"], ap=0.1, operating=more)], key=CandidateResult.rank).name == "vehicle"
    # neither meets it: the closer one
    closer = operating_point("Car", Matches.of([.9, .8, .7], [0, 1, 1], 4), target)  # best precision 2/3
    far = operating_point("Car", Matches.of([.9, .8, .7], [0, 0, 1], 4), target)  # 1/3
    assert not closer.met and not far.met and closer.best["value"] > far.best["value"]
    assert max([replace(auto, operating=far), replace(car, operating=closer)], key=CandidateResult.rank).name == "car"

    teachers = TeacherComparison.of("Car", ["m1", "m2"], [auto, car])
    assert teachers.better == "m2" and teachers.as_dict()["by"].startswith("target met")
    report = WorkbenchReport(images=2, models=["m1", "m2"], params=DetectParams(), results=[auto, car], detector="m1",
                             winners={}, targets=[str(target)])
    assert report.targets_met() == {"m1": 0, "m2": 1} and report.as_dict()["targets_met"] == {"m1": 0, "m2": 1}
