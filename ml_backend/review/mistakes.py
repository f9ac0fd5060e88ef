"""Likely labeling mistakes: FiftyOne's evaluation (`prelabel` vs `ground_truth`) and mistakenness, and cleanlab's
object-detection label issues (overlooked, bad location, swapped class) per object and per sample."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from ..effort import match_boxes
from ..types import box_iou
from .convert import to_pixels

log = logging.getLogger(__name__)

PRED, GT = "prelabel", "ground_truth"
ISSUE_TYPES = ("overlooked", "badloc", "swap")


@dataclass
class LabelIssues:
    """cleanlab's findings in neutral form: per image, the label boxes' scores and the predicted boxes' overlooked
    scores (lower = more likely a mistake) and the flags `find_label_issues` gives them."""

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


# cleanlab's defaults (0.95 / 0.5) suit trained detectors; zero-shot detectors' confident boxes score 0.4-0.8.
# LOW_PROBABILITY: predictions above it count for badly located labels. A prediction counts as confident (for
# overlooked and swapped labels) above the 5th percentile of the confidences of predictions a label confirms (the
# model's own confidence on real objects), at most HIGH_PROBABILITY.
HIGH_PROBABILITY, LOW_PROBABILITY, CONFIRMED_PERCENTILE = 0.5, 0.3, 5
# a label pairs with a prediction of its class at IoU >= MATCH_IOU (one to one, best overlap first); a prediction
# that no label pairs with is explained by a label of another class at IoU >= SWAP_IOU (a swapped class)
MATCH_IOU, SWAP_IOU = 0.3, 0.5
# flag cuts (scores run 0-1, lower = more suspicious; cleanlab's similarity ~ 0.9 IoU + 0.1 closeness): a swap score
# under SWAP_CUT means a confident prediction of another class covers the box (IoU >~ 0.5); a badloc score is
# flagged when it is an outlier among all labels' badloc scores (median - 4 robust SDs), the cut kept within
# BADLOC_CUT (under 0.25 always a mistake, over 0.65 the box still overlaps its prediction at IoU ~0.7).
# cleanlab's own per-class thresholds flag too.
SWAP_CUT, BADLOC_CUT, OUTLIER_SDS = 0.5, (0.25, 0.65), 4.0


def match(pred_boxes: np.ndarray, pred_names, label_boxes: np.ndarray, label_names, min_iou: float) -> np.ndarray:
    """Per prediction the index of the label of its class it pairs with (-1: none); one to one, greedy, highest IoU
    first (`effort.match_boxes`), at IoU >= `min_iou`."""
    paired = np.full(len(pred_boxes), -1)
    if not len(pred_boxes) or not len(label_boxes):
        return paired
    same = np.asarray(pred_names, object)[:, None] == np.asarray(label_names, object)[None, :]
    iou = box_iou(pred_boxes, label_boxes) * same
    for p, l in match_boxes(iou, hungarian=False):
        if iou[p, l] >= min_iou:
            paired[p] = l
    return paired


def confident_threshold(labels, predictions) -> float:
    """The confidence above which a prediction counts as a real object: CONFIRMED_PERCENTILE of the confidences of
    the predictions that labels confirm, at most HIGH_PROBABILITY (which also applies when nothing is confirmed)."""
    confirmed = [pscore[match(np.asarray(pbox).reshape(-1, 4), pnames, np.asarray(lbox).reshape(-1, 4), lnames,
                              0.5) >= 0]
                 for (lbox, lnames), (pbox, pnames, pscore) in zip(labels, predictions)]
    confirmed = np.concatenate([np.zeros(0), *confirmed])
    return float(min(HIGH_PROBABILITY, np.percentile(confirmed, CONFIRMED_PERCENTILE))) if len(confirmed) else \
        HIGH_PROBABILITY


def badloc_cut(scores: list[np.ndarray]) -> float:
    """The badloc flag cut calibrated on this data: median - OUTLIER_SDS robust SDs (1.4826 MAD) of the scores of
    labels that a prediction locates (score < 1), within BADLOC_CUT."""
    located = np.concatenate([np.zeros(0), *scores])
    located = located[located < 1]
    if len(located) < 5:
        return BADLOC_CUT[0]
    median = np.median(located)
    return float(np.clip(median - OUTLIER_SDS * 1.4826 * np.median(np.abs(located - median)), *BADLOC_CUT))


def find_label_issues(labels, predictions, classes: list[str], high_probability_threshold: float | None = None,
                      low_probability_threshold: float = LOW_PROBABILITY) -> LabelIssues:
    """Per-box scores (cleanlab's, as `cleanlab.object_detection.filter.find_label_issues` computes them) and flags,
    kept per box so that each object can be flagged and ranked. Predicted boxes above `high_probability_threshold`
    (default: `confident_threshold`) count for overlooked and swapped labels, those above
    `low_probability_threshold` for badly located ones. Labels are flagged by the cuts above; a prediction is
    overlooked when it is confident, no label of its class pairs with it and no label of another class explains it
    (its score: cleanlab's, or 1 - confidence where cleanlab leaves it unscored)."""
    from cleanlab.internal.constants import ALPHA, BADLOC_THRESHOLD_FACTOR, SWAP_THRESHOLD_FACTOR
    from cleanlab.object_detection import filter as clf
    from cleanlab.object_detection import rank

    if high_probability_threshold is None:
        high_probability_threshold = confident_threshold(labels, predictions)
    # cleanlab reads a 3-class prediction whose class 0 has 5 boxes (and equal counts in classes 1 and 2) as its
    # other format; a 4th, empty class keeps the format unambiguous
    padded = classes + ["\0unused"] if len(classes) == 3 else classes
    cl_labels, cl_preds, orders = cleanlab_inputs(labels, predictions, padded)
    aux = rank._get_valid_inputs_for_compute_scores(ALPHA, cl_labels, cl_preds)
    per_class_ap = clf._get_per_class_ap(cl_labels, cl_preds)
    lab_thr = clf._process_class_list([rank._separate_label(lab)[1] for lab in cl_labels], per_class_ap)

    def flags(scores, thresholds, factor, cut):
        return [np.array([(1.0 if np.isnan(s) else s) <= max(t * factor, cut) for s, t in zip(sc, th)], bool)
                for sc, th in zip(scores, thresholds)]

    overlooked = rank.compute_overlooked_box_scores(alpha=ALPHA, high_probability_threshold=high_probability_threshold,
                                                    auxiliary_inputs=aux)
    badloc = rank.compute_badloc_box_scores(alpha=ALPHA, low_probability_threshold=low_probability_threshold,
                                            auxiliary_inputs=aux)
    swap = rank.compute_swap_box_scores(alpha=ALPHA, high_probability_threshold=high_probability_threshold,
                                        auxiliary_inputs=aux)
    # back from cleanlab's class-by-class order to ours
    unsort = [np.argsort(o) if len(o) else o for o in orders]
    issues = LabelIssues(classes=classes)
    for i, ((lbox, lnames), (pbox, pnames, pscore)) in enumerate(zip(labels, predictions)):
        # cleanlab leaves unscored (NaN) a prediction that overlaps any label, e.g. an unlabeled object next to a
        # labeled one of its class: whether a label pairs with it decides
        pbox, lbox, pscore = np.asarray(pbox).reshape(-1, 4), np.asarray(lbox).reshape(-1, 4), np.asarray(pscore)
        unpaired = match(pbox, pnames, lbox, lnames, MATCH_IOU) < 0
        other = np.asarray(pnames, object)[:, None] != np.asarray(lnames, object)[None, :]
        explained = (box_iou(pbox, lbox) * other).max(1, initial=0) >= SWAP_IOU if len(pbox) else unpaired
        candidate = unpaired & ~explained
        cl_score = np.nan_to_num(overlooked[i][unsort[i]], nan=1.0) if len(pbox) else np.zeros(0)
        issues.overlooked.append(np.where(candidate, np.fmin(cl_score, 1.0 - pscore), 1.0))
        issues.overlooked_flags.append(candidate & (pscore >= high_probability_threshold))
    issues.label_scores = {"badloc": [np.nan_to_num(s, nan=1.0) for s in badloc],
                           "swap": [np.nan_to_num(s, nan=1.0) for s in swap]}
    cut = badloc_cut(issues.label_scores["badloc"])
    issues.label_flags = {"badloc": flags(badloc, lab_thr, BADLOC_THRESHOLD_FACTOR, cut),
                          "swap": flags(swap, lab_thr, SWAP_THRESHOLD_FACTOR, SWAP_CUT)}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a "Pruning 0 predictions" note
        issues.image_scores = rank.get_label_quality_scores(cl_labels, cl_preds)
    return issues


def ranked_objects(issues: LabelIssues) -> list[tuple[float, str, int, int]]:
    """Every object, most suspicious first: `(score, kind, image index, box index)`; a label box scores the lower
    of badloc and swap, its kind "swap" when flagged as one (a wrong class, whatever its badloc score) else the lower
    one's; a predicted box its overlooked score."""
    out = []
    for i, over in enumerate(issues.overlooked):
        out.extend((float(s), "overlooked", i, j) for j, s in enumerate(over))
    for i, (bad, swap) in enumerate(zip(issues.label_scores["badloc"], issues.label_scores["swap"])):
        for j, (b, s) in enumerate(zip(bad, swap)):
            kind = "swap" if issues.label_flags["swap"][i][j] or s < b else "badloc"
            out.append((float(min(b, s)), kind, i, j))
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
    `issue_type` and `issue_score`; on each prediction `overlooked` (bool), `issue_type` and `overlooked_score`;
    per sample `label_quality` and `label_issues` (count). `issue_type` is on every object: what it was flagged for
    (labels: `swap` = wrong class, before `badloc` = badly located; predictions: `overlooked`), else `none`.
    Scores run 0-1, lower = more suspicious."""
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
            flagged = [t for t in ISSUE_TYPES[::-1] if t != "overlooked" and issues.label_flags[t][i][j]]
            det["issue_score"] = float(min(bad, swap))
            det["issue_type"] = flagged[0] if flagged else "none"
            det["label_issue"] = bool(flagged)
            count += det["label_issue"]
        for j, det in enumerate(sample[PRED].detections):
            det["overlooked_score"] = float(issues.overlooked[i][j])
            det["overlooked"] = bool(issues.overlooked_flags[i][j])
            det["issue_type"] = "overlooked" if det["overlooked"] else "none"
            count += det["overlooked"]
        sample["label_quality"] = float(issues.image_scores[i])
        sample["label_issues"] = count
        sample.save()
    return issues
