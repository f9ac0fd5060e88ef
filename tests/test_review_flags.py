"""The review's flags (not just its ranking) catch each kind of injected label error at a bounded false-flag rate,
on data from an independent generator (`tests/review_errors.py`): varied image sizes, overlapping objects of one
class, a rare class."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.review.mistakes import find_label_issues, ranked_objects

from .review_errors import flag_recall, generate

pytest.importorskip("cleanlab", reason="cleanlab is installed by the project's review extra")
MIN_RECALL, MAX_FALSE_FLAGS = 0.8, 0.15


def lists(records):
    labels = [(r.annotations.xyxy, [str(n) for n in r.annotations.data["class_name"]]) for r in records]
    preds = [(r.predictions.xyxy, [str(n) for n in r.predictions.data["class_name"]], r.predictions.confidence)
             for r in records]
    return labels, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flags_catch_wrong_classes_shifted_boxes_and_missing_labels(tmp_path, seed):
    records, injected = generate(tmp_path, images=60, seed=seed)
    labels, preds = lists(records)
    classes = sorted({n for _, names in labels for n in names} | {n for _, names, _ in preds for n in names})
    issues = find_label_issues(labels, preds, classes)
    label_flags = {(i, j): bool(issues.label_flags["badloc"][i][j] or issues.label_flags["swap"][i][j])
                   for i, (_, names) in enumerate(labels) for j in range(len(names))}
    prediction_flags = {(i, j): bool(f) for i, flags in enumerate(issues.overlooked_flags) for j, f in enumerate(flags)}
    result = flag_recall(injected, label_flags, prediction_flags)
    for kind in ("wrong_class", "shifted_box", "missing_label", "missing_label/overlapping",
                 "missing_label/confidence_0.7"):
        assert result[kind] >= MIN_RECALL, (kind, result)
    assert result["false_flag_rate"] <= MAX_FALSE_FLAGS, result
    # a wrong class is a swap, whatever its badloc score, in the flags and in the ranking; scores run lower = more
    # suspicious
    kinds = {(i, j): kind for _, kind, i, j in ranked_objects(issues) if kind != "overlooked"}
    for e in injected:
        if e.kind == "wrong_class":
            assert issues.label_flags["swap"][e.image][e.index] and kinds[e.image, e.index] == "swap", e
        if e.kind == "missing_label":
            assert issues.overlooked[e.image][e.index] < np.median(np.concatenate(issues.overlooked)), e


def test_the_review_benchmark_reports_flag_recall_per_error_type_and_the_flag_rate(tmp_path):
    import json

    from benchmarks.review import ERROR_TYPES, main

    assert main(["--images", "60", "--seed", "4", "--out", str(tmp_path / "review.json")]) == 0
    result = json.loads((tmp_path / "review.json").read_text())
    for kind in ERROR_TYPES:
        assert result["per_type"][kind]["injected"] > 0 and result["per_type"][kind]["flag_recall"] >= MIN_RECALL
    assert result["per_type"]["deleted_box/overlapping"]["injected"] > 0
    assert 0 <= result["flag_rate_on_correct_objects"] <= MAX_FALSE_FLAGS and result["passed"]
    assert {"confident", "badloc_cut", "swap_cut"} <= set(result["thresholds"])


def test_the_ranking_calls_a_flagged_swap_a_swap_even_when_its_badloc_score_is_lower():
    from ml_backend.review.mistakes import LabelIssues

    issues = LabelIssues(
        classes=["a", "b"],
        label_scores={"badloc": [np.array([0.10, 0.30])], "swap": [np.array([0.20, 0.90])]},
        label_flags={"badloc": [np.array([False, False])], "swap": [np.array([True, False])]},
        overlooked=[np.array([0.5])], overlooked_flags=[np.array([False])],
    )
    assert ranked_objects(issues) == [(0.10, "swap", 0, 0), (0.30, "badloc", 0, 1), (0.5, "overlooked", 0, 0)]
