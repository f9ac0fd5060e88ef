"""Likely labeling mistakes: FiftyOne's evaluation (`prelabel` vs `ground_truth`) and mistakenness, and cleanlab's
object-detection label issues (overlooked, bad location, swapped class) per object and per sample."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from ..types import box_iou
from .convert import to_pixels

log = logging.getLogger(__name__)

PRED, GT = "prelabel", "ground_truth"
ISSUE_TYPES = ("overlooked", "badloc", "swap")


@dataclass
class LabelIssues:
    """cleanlab's findings in neutral form: per image, the label boxes' scores and the predicted boxes' overlooked
    scores (lower = more likely a mistake) and the flags cleanlab's own thresholds give."""

    classes: list[str]
    label_scores: dict[str, list[np.ndarray]] = field(default_factory=dict)  # badloc / swap, per image per label
    overlooked: list[np.ndarray] = field(default_factory=list)  # per image per prediction
    label_flags: dict[str, list[np.ndarray]] = field(default_factory=dict)
    overlooked_flags: list[np.ndarray] = field(default_factory=list)
    image_scores: np.ndarray | None = None  # cleanlab's label quality per image (low = suspicious)


def cleanlab_inputs(labels: list[tuple[np.ndarray, list[str]]],
                    predictions: list[tuple[np.ndarray, list[str], np.ndarray]], classes: list[str]) -> tuple[list[dict], list[list[np.ndarray]], list[np.ndarray]]:
    """cleanlab's format: labels `{"bboxes": xyxy, "labels": class idx}`, predictions one (M_k, 5) array per class.
    Also returns, per image, the order cleanlab sees predictions in (class by class) as indices into ours."""
    index = {c: i for i, c in enumerate(classes)}
    cl_labels, cl_preds, orders = [], [], []
    for (lbox, lnames), (pbox, pnames, pscore) in zip(labels, predictions):
        cl_labels.append({"bboxes": np.asarray(lbox, np.float32).reshape(-1, 4),
                          "labels": np.array([index[n] for n in lnames], int)})
        pidx = np.array([index[n] for n in pnames], int)
        per_class, order = [], []
        for k in range(len(classes)):
            rows = np.flatnonzero(pidx == k)
            order.extend(rows.tolist())
            per_class.append(np.hstack([np.asarray(pbox, np.float32).reshape(-1, 4)[rows],
                                        np.asarray(pscore, np.float32)[rows, None]]).reshape(-1, 5))
        cl_preds.append(per_class)
        orders.append(np.array(order, int))
    return cl_labels, cl_preds, orders


# cleanlab's defaults (0.95 / 0.5) suit trained detectors; zero-shot detectors' confident boxes score 0.4-0.8
HIGH_PROBABILITY, LOW_PROBABILITY = 0.5, 0.3
# cleanlab's per-class thresholds (AP-scaled) miss many clear cases on small or noisy sets; a score under this is
# flagged too (on generated data injected errors score < 0.2, correct labels >= 0.2 in 99%)
ISSUE_SCORE = 0.2


def find_label_issues(labels, predictions, classes: list[str], high_probability_threshold: float = HIGH_PROBABILITY,
                      low_probability_threshold: float = LOW_PROBABILITY) -> LabelIssues:
    """Per-box scores and flags, computed as `cleanlab.object_detection.filter.find_label_issues` does (same
    scores, same per-class thresholds) but kept per box so that each object can be flagged and ranked. Predicted
    boxes above `high_probability_threshold` count for overlooked and swapped labels, those above
    `low_probability_threshold` for badly located ones."""
    from cleanlab.internal.constants import (ALPHA, BADLOC_THRESHOLD_FACTOR, OVERLOOKED_THRESHOLD_FACTOR,
                                             SWAP_THRESHOLD_FACTOR)
    from cleanlab.object_detection import filter as clf
    from cleanlab.object_detection import rank

    # cleanlab reads a 3-class prediction whose class 0 has 5 boxes (and equal counts in classes 1 and 2) as its
    # other format; a 4th, empty class keeps the format unambiguous
    padded = classes + ["\0unused"] if len(classes) == 3 else classes
    cl_labels, cl_preds, orders = cleanlab_inputs(labels, predictions, padded)
    aux = rank._get_valid_inputs_for_compute_scores(ALPHA, cl_labels, cl_preds)
    per_class_ap = clf._get_per_class_ap(cl_labels, cl_preds)
    lab_thr = clf._process_class_list([rank._separate_label(lab)[1] for lab in cl_labels], per_class_ap)
    pred_thr = clf._process_class_list([rank._separate_prediction(p)[1] for p in cl_preds], per_class_ap)

    def flags(scores, thresholds, factor):
        return [np.array([(1.0 if np.isnan(s) else s) <= max(t * factor, ISSUE_SCORE) for s, t in zip(sc, th)], bool)
                for sc, th in zip(scores, thresholds)]

    overlooked = rank.compute_overlooked_box_scores(alpha=ALPHA, high_probability_threshold=high_probability_threshold,
                                                    auxiliary_inputs=aux)
    badloc = rank.compute_badloc_box_scores(alpha=ALPHA, low_probability_threshold=low_probability_threshold,
                                            auxiliary_inputs=aux)
    swap = rank.compute_swap_box_scores(alpha=ALPHA, high_probability_threshold=high_probability_threshold,
                                        auxiliary_inputs=aux)
    for i, lab in enumerate(cl_labels):
        # cleanlab leaves a prediction unscored (NaN) on an image without labels, or when it overlaps a label of
        # another class; a confident prediction that no same-class label covers is overlooked as it is confident
        preds = np.vstack(cl_preds[i])
        if len(preds):
            pred_labels = np.concatenate([np.full(len(p), k) for k, p in enumerate(cl_preds[i])])
            same_class = pred_labels[:, None] == lab["labels"][None, :]
            same = (box_iou(preds[:, :4], lab["bboxes"]) * same_class).max(1, initial=0)
            uncovered = np.where(same < 0.1, 1.0 - preds[:, 4], 1.0)
            overlooked[i] = np.fmin(np.where(np.isnan(overlooked[i]), 1.0, overlooked[i]), uncovered)
    over_flags = flags(overlooked, pred_thr, OVERLOOKED_THRESHOLD_FACTOR)
    # back from cleanlab's class-by-class order to ours
    unsort = [np.argsort(o) if len(o) else o for o in orders]
    issues = LabelIssues(classes=classes)
    issues.overlooked = [np.nan_to_num(s, nan=1.0)[u] for s, u in zip(overlooked, unsort)]
    issues.overlooked_flags = [f[u] for f, u in zip(over_flags, unsort)]
    issues.label_scores = {"badloc": [np.nan_to_num(s, nan=1.0) for s in badloc],
                           "swap": [np.nan_to_num(s, nan=1.0) for s in swap]}
    issues.label_flags = {"badloc": flags(badloc, lab_thr, BADLOC_THRESHOLD_FACTOR),
                          "swap": flags(swap, lab_thr, SWAP_THRESHOLD_FACTOR)}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a "Pruning 0 predictions" note
        issues.image_scores = rank.get_label_quality_scores(cl_labels, cl_preds)
    return issues


def ranked_objects(issues: LabelIssues) -> list[tuple[float, str, int, int]]:
    """Every object, most suspicious first: `(score, kind, image index, box index)`; a label box scores the lower
    of badloc and swap (kind = the lower one), a predicted box its overlooked score."""
    out = []
    for i, over in enumerate(issues.overlooked):
        out.extend((float(s), "overlooked", i, j) for j, s in enumerate(over))
    for i, (bad, swap) in enumerate(zip(issues.label_scores["badloc"], issues.label_scores["swap"])):
        for j, (b, s) in enumerate(zip(bad, swap)):
            out.append((float(b), "badloc", i, j) if b <= s else (float(s), "swap", i, j))
    return sorted(out, key=lambda t: t[0])


# -- FiftyOne side ---------------------------------------------------------------------------------------------


def _pixel_objects(sample, field_name: str, scores: bool = False):
    w, h = sample.metadata.width, sample.metadata.height
    dets = sample[field_name].detections if sample[field_name] is not None else []
    boxes = np.array([to_pixels(d.bounding_box, w, h) for d in dets], np.float32).reshape(-1, 4)
    names = [d.label for d in dets]
    if scores:
        return boxes, names, np.array([1.0 if d.confidence is None else d.confidence for d in dets], np.float32)
    return boxes, names


def evaluate(dataset, eval_key: str = "eval") -> dict:
    """`evaluate_detections(prelabel vs ground_truth)` on the annotated samples with predictions; per-class
    precision/recall/f1/support, and `eval` = tp/fp/fn on every object."""
    view = dataset.exists(GT).exists(PRED)
    if len(view) == 0:
        return {}
    results = view.evaluate_detections(PRED, gt_field=GT, eval_key=eval_key, progress=False)
    return results.report()


def mistakenness(dataset) -> None:
    import fiftyone.brain as fob

    view = dataset.exists(GT).exists(PRED)
    if len(view):
        fob.compute_mistakenness(view, PRED, label_field=GT, progress=False)


def store_label_issues(dataset) -> LabelIssues | None:
    """cleanlab on every annotated sample with predictions: on each ground-truth object `label_issue` (bool),
    `issue_type`, `issue_score`; on each prediction `overlooked` (bool) and `overlooked_score`; per sample
    `label_quality` and `label_issues` (count)."""
    view = dataset.exists(GT).exists(PRED)
    if len(view) == 0:
        return None
    view.compute_metadata()
    samples = list(view.select_fields([GT, PRED, "metadata"]))
    labels = [_pixel_objects(s, GT) for s in samples]
    preds = [_pixel_objects(s, PRED, scores=True) for s in samples]
    classes = sorted({n for _, names in labels for n in names} | {n for _, names, _ in preds for n in names})
    issues = find_label_issues(labels, preds, classes)
    for i, sample in enumerate(view.select_fields([GT, PRED])):  # same order as `samples`
        count = 0
        for j, det in enumerate(sample[GT].detections):
            bad, swap = issues.label_scores["badloc"][i][j], issues.label_scores["swap"][i][j]
            flagged = {t: bool(issues.label_flags[t][i][j]) for t in ("badloc", "swap")}
            kind = min(("badloc", bad), ("swap", swap), key=lambda t: t[1])[0]
            det["issue_score"] = float(min(bad, swap))
            det["issue_type"] = kind if any(flagged.values()) else None
            det["label_issue"] = any(flagged.values())
            count += det["label_issue"]
        for j, det in enumerate(sample[PRED].detections):
            det["overlooked_score"] = float(issues.overlooked[i][j])
            det["overlooked"] = bool(issues.overlooked_flags[i][j])
            count += det["overlooked"]
        sample["label_quality"] = float(issues.image_scores[i])
        sample["label_issues"] = count
        sample.save()
    return issues
