"""COCO detection metrics over core Detections, with pycocotools: one place for mAP, per-label AP and the
precision/recall tables that distill and the prompt workbench report. Labels match by `data["class_name"]`,
so ground truth and predictions need not share class ids."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field, replace

import numpy as np
import supervision as sv
from pycocotools.cocoeval import COCOeval

from . import coco as coco_format


@dataclass
class Matches:
    """One label's detections at IoU 0.5 as pycocotools matched them (the largest maxDets, all areas): each one's
    `scores` and whether it matched a ground-truth object (`tp`), and the number of objects (`truth`)."""

    scores: np.ndarray
    tp: np.ndarray
    truth: int

    @classmethod
    def of(cls, scores, tp, truth: int) -> Matches:
        scores, tp = np.asarray(scores, np.float64).reshape(-1), np.asarray(tp, bool).reshape(-1)
        if scores.shape != tp.shape:
            raise ValueError(f"{scores.size} scores but {tp.size} true/false flags")
        return cls(scores, tp, int(truth))


@dataclass
class CocoResult:
    """`map` is mAP@[.5:.95], `map50` mAP@0.5 (both over labels that have ground truth, -1 when none has);
    `per_label[name]` = {"ap", "ap50", "truth", "predicted"}; `precision` is pycocotools' array
    [iou thresholds, 101 recall points, labels] at all areas and the largest maxDets (-1 where undefined)."""

    map: float
    map50: float
    map75: float
    per_label: dict[str, dict] = field(default_factory=dict)
    images: int = 0
    precision: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)  # same shape: score threshold at each point
    matches: dict[str, Matches] = field(default_factory=dict, repr=False)  # per label, at IoU 0.5

    def as_dict(self) -> dict:
        return {"map": self.map, "map50": self.map50, "map75": self.map75, "images": self.images,
                "per_label": self.per_label}


def _mean(values: np.ndarray) -> float:
    values = values[values > -1]
    return round(float(values.mean()), 4) if values.size else -1.0


def _empty(d: sv.Detections | None) -> sv.Detections:
    return sv.Detections.empty() if d is None else d


def coco_evaluate(
    truth: list[sv.Detections | None],
    predictions: list[sv.Detections | None],
    labels: list[str],
    sizes: list[tuple[int, int]],
    max_detections: int = 100,
) -> CocoResult:
    """mAP of `predictions[i]` against `truth[i]` (image i of size `sizes[i]` = (width, height)), boxes only.
    Rows whose label is not in `labels` are ignored; `None` is an image with nothing on it."""
    if not (len(truth) == len(predictions) == len(sizes)):
        raise ValueError(f"{len(truth)} truths, {len(predictions)} predictions and {len(sizes)} sizes differ")
    known = set(labels)

    def kept(d: sv.Detections | None) -> sv.Detections:
        d = _empty(d)
        if not len(d):
            return d
        return d[np.array([str(n) in known for n in d.data["class_name"]], bool)]

    images, gt_anns, dt_anns = [], [], []
    for i, (t, p, (w, h)) in enumerate(zip(truth, predictions, sizes)):
        images.append(coco_format.image(i + 1, str(i), int(w), int(h)))
        gt_anns += coco_format.annotations(kept(t), i + 1, labels, scores=False, masks=False)
        dt_anns += _results(kept(p), i + 1, labels)
    gt = coco_format.index(coco_format.document(images, gt_anns, labels))
    truth_counts = {name: 0 for name in labels}
    pred_counts = {name: 0 for name in labels}
    for a in gt_anns:
        truth_counts[labels[a["category_id"] - 1]] += 1
    for a in dt_anns:
        pred_counts[labels[a["category_id"] - 1]] += 1
    per_label = {name: {"ap": -1.0, "ap50": -1.0, "truth": truth_counts[name], "predicted": pred_counts[name]}
                 for name in labels}
    nothing = {name: Matches.of([], [], truth_counts[name]) for name in labels}
    if not gt_anns:  # every detection is a false positive
        scores = {name: [a["raw_score"] for a in dt_anns if labels[a["category_id"] - 1] == name] for name in labels}
        return CocoResult(-1.0, -1.0, -1.0, per_label, len(images),
                          matches={name: Matches.of(s, np.zeros(len(s), bool), 0) for name, s in scores.items()})
    if not dt_anns:
        for name in labels:
            if truth_counts[name]:
                per_label[name] |= {"ap": 0.0, "ap50": 0.0}
        return CocoResult(0.0, 0.0, 0.0, per_label, len(images), matches=nothing)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dt_anns)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, max_detections]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # all areas, largest maxDets
    scores = ev.eval["scores"][:, :, :, 0, -1]
    for k, name in enumerate(labels):
        if truth_counts[name]:
            per_label[name] |= {"ap": max(_mean(precision[:, :, k]), 0.0), "ap50": max(_mean(precision[0, :, k]), 0.0)}
    with_truth = [k for k, name in enumerate(labels) if truth_counts[name]]
    sub = precision[:, :, with_truth]
    # a label with truth but no prediction has precision -1 in pycocotools; it counts as AP 0
    aps = [per_label[labels[k]]["ap"] for k in with_truth]
    ap50s = [per_label[labels[k]]["ap50"] for k in with_truth]
    ap75s = [max(_mean(sub[5, :, j]), 0.0) for j in range(len(with_truth))]
    return CocoResult(
        map=round(float(np.mean(aps)), 4), map50=round(float(np.mean(ap50s)), 4), map75=round(float(np.mean(ap75s)), 4),
        per_label=per_label, images=len(images), precision=precision, scores=scores,
        matches=nothing | _matches(ev, labels),
    )


def _results(d: sv.Detections, image_id: int, labels: list[str]) -> list[dict]:
    """A results list for pycocotools (scores rounded as `coco.annotations` writes them), each entry also with
    its detection's unrounded `raw_score`: the threshold an operating point picks must keep that detection."""
    if not len(d):
        return []
    raw = np.asarray(d.confidence, np.float64)
    # confidence = row number, to know which rows `annotations` kept (it drops boxes without area)
    out = coco_format.annotations(replace(d, confidence=np.arange(len(d), dtype=np.float64)), image_id, labels,
                                  masks=False)
    for ann in out:
        ann["raw_score"] = float(raw[int(ann["score"])])
        ann["score"] = round(ann["raw_score"], 4)
    return out


def _matches(ev: COCOeval, labels: list[str]) -> dict[str, Matches]:
    """Per label the detections' (unrounded) scores and true/false at IoU 0.5, from `ev.evalImgs` as `accumulate`
    reads them at all areas (detections matched to an ignored object are left out, as there)."""
    found: dict[str, tuple[list, list, int]] = {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        name = labels[e["category_id"] - 1]
        scores, tp, truth = found.setdefault(name, ([], [], 0))
        kept = ~np.asarray(e["dtIgnore"][0], bool).reshape(-1)
        scores += [ev.cocoDt.anns[i]["raw_score"] for i in np.asarray(e["dtIds"])[kept]]
        tp += list(np.asarray(e["dtMatches"][0])[kept] > 0)
        found[name] = (scores, tp, truth + int((~np.asarray(e["gtIgnore"], bool)).sum()))
    return {name: Matches.of(*value) for name, value in found.items()}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The Wilson score interval of the proportion `successes / n` (95% for the default z); None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if successes <= 0 else max(0.0, float(centre - half)),
            1.0 if successes >= n else min(1.0, float(centre + half)))


RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # pycocotools' recall thresholds (params.recThrs)


def pr_curve(result: CocoResult, label: int = 0, iou: int = 0) -> dict[str, np.ndarray] | None:
    """Label `label`'s precision/recall curve at IoU threshold index `iou` (0: IoU 0.5, 5: 0.75, of 0.5:0.05:0.95)
    from pycocotools' 101-point interpolated table: `recall`, `precision` and `scores` (the lowest score a box
    needs to be counted to reach that recall), keeping only the points the predictions reach. None when the label
    has no ground truth or nothing was predicted."""
    if result.precision is None or result.scores is None:
        return None
    precision = result.precision[iou, :, label]
    scores = result.scores[iou, :, label]
    reached = precision > 0  # -1: no ground truth; 0: recall never reached
    if not reached.any():
        return None
    return {"recall": RECALL_POINTS[reached], "precision": precision[reached], "scores": scores[reached]}


def best_f1_threshold(result: CocoResult, label: int = 0, iou: int = 0) -> dict[str, float] | None:
    """The score threshold that maximises F1 on `pr_curve` (at IoU 0.5 by default): `{"threshold", "precision",
    "recall", "f1"}`; the first (highest-threshold) point wins a tie. None where `pr_curve` is None; with nothing
    reached it answers None too, as there is no threshold that finds anything."""
    curve = pr_curve(result, label, iou)
    if curve is None:
        return None
    p, r = curve["precision"], curve["recall"]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(f1))
    return {"threshold": round(float(curve["scores"][i]), 4), "precision": round(float(p[i]), 4),
            "recall": round(float(r[i]), 4), "f1": round(float(f1[i]), 4)}
