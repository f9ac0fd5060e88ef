"""An independent generator of labeled detection data with known label errors, for judging the review's flags.

Ground truth is exact: objects of three common classes and a rare one, on images of varied sizes (square, wide, tall,
thin), some in overlapping pairs of one class. Predictions are the truth with a little box noise and confidences in
[0.6, 1), plus low-confidence false positives. The human labels are the truth with injected errors: a wrong class,
a shifted box (IoU with the truth 0.4-0.6), a missing label; missing labels include ones that overlap a labeled
object of the same class and ones whose prediction has confidence 0.7. Kept apart from `benchmarks/review.py`'s own
generator on purpose: the review's thresholds are not tuned to the data they are tested on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.types import LabeledImage, make_detections

SIZES = [(640, 480), (320, 320), (1024, 160), (120, 720), (500, 375), (96, 96), (1280, 720), (200, 900)]
COMMON, RARE = ["cat", "dog", "bird"], "zebra"
CLASSES = [*COMMON, RARE]
ERRORS = ("wrong_class", "shifted_box", "missing_label")
MISSING_VARIANTS = ("plain", "overlapping", "confidence_0.7")


@dataclass
class Truth:
    width: int
    height: int
    boxes: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    pair_of: dict[int, int] = field(default_factory=dict)  # second of an overlapping same-class pair -> first


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def random_box(rng, w, h) -> np.ndarray:
    bw = rng.uniform(0.12, 0.4) * w
    bh = rng.uniform(0.12, 0.4) * h
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.array([x, y, x + bw, y + bh])


def scene(rng, w, h, pairs: bool) -> Truth:
    truth = Truth(w, h)
    for _ in range(rng.integers(2, 5)):
        truth.boxes.append(random_box(rng, w, h))
        truth.names.append(RARE if rng.random() < 0.04 else COMMON[rng.integers(len(COMMON))])
    if pairs:  # a second object of the first one's class, overlapping it (IoU ~0.2-0.35)
        a = truth.boxes[0]
        bw, bh = a[2] - a[0], a[3] - a[1]
        for _ in range(20):
            dx, dy = bw * rng.uniform(0.4, 0.55) * rng.choice([-1, 1]), bh * rng.uniform(0.0, 0.2) * rng.choice([-1, 1])
            b = a + np.array([dx, dy, dx, dy])
            if b[0] >= 0 and b[1] >= 0 and b[2] <= w and b[3] <= h and 0.15 < iou(a, b) < 0.45:
                truth.pair_of[len(truth.boxes)] = 0
                truth.boxes.append(b)
                truth.names.append(truth.names[0])
                break
    return truth


def shifted(rng, box, w, h) -> np.ndarray:
    """`box` moved along x or y so that its IoU with the original is 0.4-0.6 and it stays inside the image."""
    for _ in range(50):
        target = rng.uniform(0.4, 0.6)
        f = (1 - target) / (1 + target)  # a shift by f of the side gives IoU (1 - f) / (1 + f)
        axis = rng.integers(2)
        d = np.zeros(4)
        d[[axis, axis + 2]] = f * (box[axis + 2] - box[axis]) * rng.choice([-1, 1])
        moved = box + d
        if moved[0] >= 0 and moved[1] >= 0 and moved[2] <= w and moved[3] <= h:
            return moved
    raise AssertionError(f"cannot shift box {box} inside {w}x{h}")


@dataclass
class Injected:
    kind: str  # one of ERRORS
    image: int
    index: int  # into the record's annotations (wrong_class, shifted_box) or predictions (missing_label)
    variant: str = "plain"


def generate(folder: Path, images: int = 60, seed: int = 0, errors_per_kind: int = 12):
    """Records (images written to `folder`) and the injected errors. Each kind gets `errors_per_kind` errors;
    missing labels are split over MISSING_VARIANTS."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = [scene(rng, *SIZES[i % len(SIZES)], pairs=i % 3 == 0) for i in range(images)]
    objects = [(i, j) for i, s in enumerate(scenes) for j in range(len(s.boxes))]
    order = rng.permutation(len(objects))
    plan: dict[tuple[int, int], tuple[str, str]] = {}
    seconds = [objects[k] for k in order if objects[k][1] in scenes[objects[k][0]].pair_of]
    for o in seconds[: errors_per_kind // 3]:
        plan[o] = ("missing_label", "overlapping")
    firsts = {(i, a) for i, s in enumerate(scenes) for a in s.pair_of.values()}
    free = [objects[k] for k in order if objects[k] not in plan and objects[k] not in firsts]
    wanted = [("wrong_class", "plain")] * errors_per_kind + [("shifted_box", "plain")] * errors_per_kind
    wanted += [("missing_label", "plain")] * (errors_per_kind - 2 * (errors_per_kind // 3))
    wanted += [("missing_label", "confidence_0.7")] * (errors_per_kind // 3)
    for o, kind in zip(free, wanted):
        plan[o] = kind
    records, injected = [], []
    for i, s in enumerate(scenes):
        path = folder / f"scene-{i:03d}.png"
        Image.new("RGB", (s.width, s.height), tuple(int(v) for v in rng.integers(0, 255, 3))).save(path)
        p_boxes, p_scores, p_names, g_boxes, g_names = [], [], [], [], []
        for j, (box, name) in enumerate(zip(s.boxes, s.names)):
            kind, variant = plan.get((i, j), (None, None))
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            p_boxes.append(box + rng.normal(0, 0.02, 4) * side)
            p_scores.append(0.7 if variant == "confidence_0.7" else rng.uniform(0.6, 1.0))
            p_names.append(name)
            if kind == "missing_label":
                injected.append(Injected(kind, i, j, variant))
                continue
            if kind == "wrong_class":
                name = rng.choice([c for c in CLASSES if c != name])
            if kind == "shifted_box":
                box = shifted(rng, box, s.width, s.height)
            if kind:
                injected.append(Injected(kind, i, len(g_boxes)))
            g_boxes.append(box)
            g_names.append(name)
        for _ in range(rng.integers(0, 3)):  # low-confidence false positives
            p_boxes.append(random_box(rng, s.width, s.height))
            p_scores.append(rng.uniform(0.05, 0.3))
            p_names.append(COMMON[rng.integers(len(COMMON))])
        records.append(LabeledImage(
            key=path.name, image=str(path), width=s.width, height=s.height, link=f"https://tool.example/{i}",
            predictions=make_detections(p_boxes, p_scores, [CLASSES.index(n) for n in p_names], p_names),
            annotations=make_detections(g_boxes, np.ones(len(g_boxes)), [CLASSES.index(n) for n in g_names],
                                        g_names)))
    return records, injected


def flag_recall(injected: list[Injected], label_flags: dict[tuple[int, int], bool],
                prediction_flags: dict[tuple[int, int], bool]) -> dict:
    """Per error kind (and missing-label variant) the share of injected errors flagged on their own object, and the
    share of the other objects (correct labels, predictions of labeled objects) that are flagged anyway."""
    out = {}
    for kind in ERRORS:
        errs = [e for e in injected if e.kind == kind]
        flags = prediction_flags if kind == "missing_label" else label_flags
        out[kind] = sum(flags[(e.image, e.index)] for e in errs) / len(errs)
    for variant in MISSING_VARIANTS:
        errs = [e for e in injected if e.kind == "missing_label" and e.variant == variant]
        out[f"missing_label/{variant}"] = sum(prediction_flags[(e.image, e.index)] for e in errs) / len(errs)
    wrong_labels = {(e.image, e.index) for e in injected if e.kind != "missing_label"}
    missing = {(e.image, e.index) for e in injected if e.kind == "missing_label"}
    correct = [f for o, f in label_flags.items() if o not in wrong_labels]
    out["false_flag_rate"] = (sum(correct) + sum(f for o, f in prediction_flags.items() if o not in missing)) / (
        len(correct) + len(prediction_flags) - len(missing))
    out["label_false_flag_rate"] = sum(correct) / len(correct)
    return out
