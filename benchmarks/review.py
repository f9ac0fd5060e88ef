"""Do the review's flags and its ranking find injected label errors?

```
python -m benchmarks.review [--images 200] [--error-rate 0.1] [--out benchmarks/results/review.json] [--fiftyone] [--smoke]
```

A generated dataset: images of varied sizes (square, wide, tall, thin) with coloured rectangles (class = colour,
one class rare), some in overlapping pairs of one class, with exact boxes; "predictions" are the true boxes with a
little noise and confidences in [0.6, 1), plus a few low-confidence false positives. Then a fraction of the true
objects get a label error in the ground truth: a wrong class, a box shifted along one axis to IoU 0.4-0.6 with the
truth, or a deleted box (some with a prediction of confidence 0.7; also the second label of every other overlapping
pair).
Reported per error type: the share flagged (`label_issue` on the label, `overlooked` on the deleted box's
prediction; targets >= 80 %), the flag rate on the correct objects (correct labels and the predictions of labeled
objects), and the share in the top 20 % of the ranking (`ml_backend.review.mistakes.ranked_objects`). With
`--fiftyone` the same records also go through the whole review (dataset, evaluation, mistakenness, cleanlab, views)
and its wall time is reported. Exit status 1 when a target is missed. `--smoke`: 30 images (the same measurements
and JSON, in seconds; the targets are not judged on so few errors).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.types import LabeledImage, make_detections

from .harness import SMOKE_HELP, exit_status, result_path

CLASSES = ["Car", "Person", "Dog", "Zebra"]  # Zebra is rare
COLOURS = {"Car": (220, 40, 40), "Person": (40, 200, 60), "Dog": (50, 80, 230), "Zebra": (230, 230, 230)}
SIZES = [(128, 96), (96, 96), (256, 48), (48, 200), (160, 120), (300, 100)]
ERROR_TYPES = ("wrong_class", "shifted_box", "deleted_box")
TARGET_RECALL, TOP_FRACTION, TARGET_FLAG_RATE = 0.8, 0.2, 0.15


def _iou(a, b) -> float:
    iw, ih = max(0, min(a[2], b[2]) - max(a[0], b[0])), max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


def _scene(rng, w, h, pair: bool) -> tuple[list[np.ndarray], list[str]]:
    boxes, names = [], []
    for _ in range(rng.integers(1, 5)):
        bw, bh = rng.uniform(0.15, 0.45) * w, rng.uniform(0.15, 0.45) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append(np.array([x, y, x + bw, y + bh], np.float32))
        names.append("Zebra" if rng.random() < 0.04 else CLASSES[rng.integers(3)])
    if pair:  # a second object of the first one's class overlapping it
        a = boxes[0]
        for _ in range(20):
            d = np.array([(a[2] - a[0]) * rng.uniform(0.4, 0.55) * rng.choice([-1, 1]), 0], np.float32)
            b = a + np.tile(d, 2)
            if b[0] >= 0 and b[2] <= w and 0.15 < _iou(a, b) < 0.45:
                boxes.append(b)
                names.append(names[0])
                break
    return boxes, names


def _shift(rng, box, w, h) -> np.ndarray:
    """`box` moved along x or y to IoU 0.4-0.6 with where it was, inside the image (or as near as it gets)."""
    for _ in range(50):
        target = rng.uniform(0.4, 0.6)
        axis = rng.integers(2)
        d = np.zeros(4, np.float32)
        d[[axis, axis + 2]] = (1 - target) / (1 + target) * (box[axis + 2] - box[axis]) * rng.choice([-1, 1])
        moved = box + d
        if moved[0] >= 0 and moved[1] >= 0 and moved[2] <= w and moved[3] <= h:
            return moved
    return moved


def synthetic_records(out_dir: Path, images: int = 200, error_rate: float = 0.1, seed: int = 0,
                      sizes: list[tuple[int, int]] = SIZES) -> tuple[list[LabeledImage], list[dict]]:
    """Records (images written to `out_dir`; image i has size `sizes[i % len(sizes)]`, every third one an
    overlapping same-class pair) and the injected errors `{"type", "image", "label"|"prediction", "variant"}`
    (indices into the record list and into its annotations / predictions)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = []
    for i in range(images):
        w, h = sizes[i % len(sizes)]
        array = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        boxes, names = _scene(rng, w, h, pair=i % 3 == 0)
        for box, name in zip(boxes, names):
            x1, y1, x2, y2 = np.round(box).astype(int)
            array[y1:y2, x1:x2] = COLOURS[name]
        path = out_dir / f"synthetic-{i:04d}.png"
        Image.fromarray(array).save(path)
        truth.append((path, w, h, np.array(boxes, np.float32).reshape(-1, 4), names))
    n_objects = sum(len(t[4]) for t in truth)
    picked = rng.choice([(i, j) for i, t in enumerate(truth) for j in range(len(t[4]))],
                        size=int(round(error_rate * n_objects)), replace=False)
    errors_at = {(int(i), int(j)): ERROR_TYPES[k % 3] for k, (i, j) in enumerate(picked)}
    for i in range(0, images, 6):  # every other overlapping pair loses its second label
        boxes, names = truth[i][3], truth[i][4]
        if len(names) > 1 and names[-1] == names[0] and _iou(boxes[0], boxes[-1]) > 0.15:
            errors_at.pop((i, 0), None)
            errors_at[(i, len(names) - 1)] = "deleted_box"
    records, injected = [], []
    for i, (path, w, h, boxes, names) in enumerate(truth):
        sides = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        noisy = boxes + rng.normal(0, 0.02, boxes.shape).astype(np.float32) * sides
        scores = rng.uniform(0.6, 1.0, len(boxes))
        p_boxes, p_names, p_scores = list(noisy), list(names), list(scores)
        if rng.random() < 0.3:  # a low-confidence false positive
            x, y = rng.uniform(0, 0.8 * w), rng.uniform(0, 0.8 * h)
            p_boxes.append(np.array([x, y, x + 0.2 * w, y + 0.2 * h], np.float32))
            p_names.append(CLASSES[rng.integers(3)])
            p_scores.append(rng.uniform(0.05, 0.3))
        g_boxes, g_names = [], []
        for j, (box, name) in enumerate(zip(boxes, names)):
            kind = errors_at.get((i, j))
            if kind == "deleted_box":
                variant = "overlapping" if i % 3 == 0 and j == len(names) - 1 and len(names) > 1 and \
                    names[j] == names[0] and _iou(boxes[0], box) > 0.15 else "plain"
                if variant == "plain" and rng.random() < 0.3:
                    variant = "confidence_0.7"
                    p_scores[j] = 0.7
                injected.append({"type": kind, "image": i, "prediction": j, "variant": variant})
                continue
            if kind == "wrong_class":
                name = rng.choice([c for c in CLASSES if c != name])
            if kind == "shifted_box":
                box = _shift(rng, box, w, h)
            if kind:
                injected.append({"type": kind, "image": i, "label": len(g_boxes)})
            g_boxes.append(box)
            g_names.append(name)
        records.append(LabeledImage(
            key=path.stem, image=str(path), width=w, height=h,
            predictions=make_detections(p_boxes, p_scores, [CLASSES.index(n) for n in p_names], p_names),
            annotations=make_detections(g_boxes, np.ones(len(g_boxes)), [CLASSES.index(n) for n in g_names], g_names),
            link=f"https://labeling.example/tasks/{i}", model_version="synthetic-v1",
        ))
    return records, injected


def as_cleanlab_lists(records: list[LabeledImage]):
    labels = [(r.annotations.xyxy, [str(n) for n in r.annotations.data["class_name"]]) for r in records]
    preds = [(r.predictions.xyxy, [str(n) for n in r.predictions.data["class_name"]], r.predictions.confidence)
             for r in records]
    return labels, preds


def measure(records: list[LabeledImage], injected: list[dict], top_fraction: float = TOP_FRACTION) -> dict:
    """Per error type: injected, flagged (on its own object) and found in the top `top_fraction` of the ranking;
    the flag rate on correct objects; the calibrated thresholds."""
    from ml_backend.review import mistakes

    labels, preds = as_cleanlab_lists(records)
    issues = mistakes.find_label_issues(labels, preds, CLASSES)
    ranking = mistakes.ranked_objects(issues)
    top = ranking[: int(np.ceil(top_fraction * len(ranking)))]
    in_top = {("label" if kind != "overlooked" else "prediction", i, j) for _, kind, i, j in top}
    label_flag = {(i, j): bool(b or s) for i, (bad, swap) in enumerate(zip(issues.label_flags["badloc"],
                                                                            issues.label_flags["swap"]))
                  for j, (b, s) in enumerate(zip(bad, swap))}
    pred_flag = {(i, j): bool(f) for i, fl in enumerate(issues.overlooked_flags) for j, f in enumerate(fl)}

    def where(e):
        return ("prediction", e["image"], e["prediction"]) if "prediction" in e else ("label", e["image"], e["label"])

    def flagged(e):
        _, i, j = where(e)
        return (pred_flag if "prediction" in e else label_flag)[(i, j)]

    per_type = {}
    groups = {t: [e for e in injected if e["type"] == t] for t in ERROR_TYPES}
    for variant in ("overlapping", "confidence_0.7"):
        groups[f"deleted_box/{variant}"] = [e for e in injected if e.get("variant") == variant]
    for t, errs in groups.items():
        n, hit, top_hit = len(errs), sum(map(flagged, errs)), sum(where(e) in in_top for e in errs)
        per_type[t] = {"injected": n, "flagged": int(hit), "flag_recall": hit / n if n else None,
                       "in_top": int(top_hit), "recall_in_top": top_hit / n if n else None}
    wrong = {where(e) for e in injected}
    correct = [f for (i, j), f in label_flag.items() if ("label", i, j) not in wrong]
    correct += [f for (i, j), f in pred_flag.items() if ("prediction", i, j) not in wrong]
    found = sum(v["in_top"] for t, v in per_type.items() if t in ERROR_TYPES)
    return {"objects_ranked": len(ranking), "top_k": len(top), "injected": len(injected),
            "objects": {"labels": len(label_flag), "predictions": len(pred_flag)},
            "flagged": {"labels": sum(label_flag.values()), "predictions": sum(pred_flag.values())},
            "flag_rate_on_correct_objects": sum(correct) / max(1, len(correct)),
            "found_in_top": found, "recall_in_top": found / max(1, len(injected)), "per_type": per_type,
            "thresholds": {"confident": mistakes.confident_threshold(labels, preds),
                           "badloc_cut": mistakes.badloc_cut(issues.label_scores["badloc"]),
                           "swap_cut": mistakes.SWAP_CUT}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--error-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: results/review.json (results/smoke/ with --smoke)")
    parser.add_argument("--fiftyone", action="store_true", help="also run the whole review on the records")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        args.images = 30
    out = args.out or result_path("review.json", args.smoke)
    with tempfile.TemporaryDirectory(prefix="prelabel-review-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        records, injected = synthetic_records(tmp / "images", args.images, args.error_rate, args.seed)
        t1 = time.perf_counter()
        result = measure(records, injected)
        result["ranking_s"] = round(time.perf_counter() - t1, 3)
        result["generate_s"] = round(t1 - t0, 3)
        if args.fiftyone:
            from ml_backend.review import configure_fiftyone

            configure_fiftyone(tmp / "db")
            from ml_backend.review import run_review
            from ml_backend.review.dataset import stop_database

            t2 = time.perf_counter()
            try:
                report = run_review(records, "review-benchmark", tmp / "cache", overwrite=True, console=False)
            finally:
                stop_database()
            result["fiftyone_review_s"] = round(time.perf_counter() - t2, 2)
            result["fiftyone_views"] = report.views
    recalls = [v["flag_recall"] for t, v in result["per_type"].items() if t in ERROR_TYPES]
    result |= {"smoke": args.smoke, "images": args.images, "error_rate": args.error_rate, "seed": args.seed,
               "target": {"flag_recall": TARGET_RECALL, "flag_rate_on_correct_objects": TARGET_FLAG_RATE,
                          "recall_in_top": TARGET_RECALL, "top_fraction": TOP_FRACTION},
               "passed": min(r or 0 for r in recalls) >= TARGET_RECALL and result["recall_in_top"] >= TARGET_RECALL
               and result["flag_rate_on_correct_objects"] <= TARGET_FLAG_RATE, "machine": platform.node(),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"flagged per error type (target >= {TARGET_RECALL:.0%}), and found in the top {TOP_FRACTION:.0%} of "
          f"{result['objects_ranked']} ranked objects:")
    for t, v in result["per_type"].items():
        if v["injected"]:
            print(f"  {t:28s} flagged {v['flagged']:3d}/{v['injected']:3d} = {v['flag_recall']:.1%}   "
                  f"in top {v['in_top']:3d} = {v['recall_in_top']:.1%}")
    print(f"flag rate on correct objects: {result['flag_rate_on_correct_objects']:.1%} "
          f"(target <= {TARGET_FLAG_RATE:.0%}); thresholds {result['thresholds']}")
    if "fiftyone_review_s" in result:
        print(f"whole review on FiftyOne: {result['fiftyone_review_s']} s; views {result['fiftyone_views']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}" + ("; smoke run: the targets are not judged" if args.smoke else ""))
    return exit_status(result["passed"], args.smoke)


if __name__ == "__main__":
    sys.exit(main())
