"""Does the review's mistake ranking find injected label errors?

```
python -m benchmarks.review [--images 200] [--error-rate 0.1] [--out benchmarks/results/review.json] [--fiftyone] [--smoke]
```

A generated dataset: images of coloured rectangles (class = colour) with exact boxes; "predictions" are the true
boxes with a few pixels of noise and confidences in [0.6, 1), plus a few low-confidence false positives. Then a
fraction of the true objects get a label error in the ground truth: a wrong class, a box shifted by about half its
size, or a deleted box. The ranking (`ml_backend.review.mistakes.ranked_objects` over cleanlab's per-box scores)
must put >= 80% of the injected errors in its top 20% of objects; the figure is reported per error type. With
`--fiftyone` the same records also go through the whole review (dataset, evaluation, mistakenness, cleanlab, views)
and its wall time is reported. Exit status 1 when the target is missed. `--smoke`: 30 images (the same ranking and
JSON, in seconds; the recall is not judged on so few errors).
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

CLASSES = ["Car", "Person", "Dog"]
COLOURS = {"Car": (220, 40, 40), "Person": (40, 200, 60), "Dog": (50, 80, 230)}
ERROR_TYPES = ("wrong_class", "shifted_box", "deleted_box")
TARGET_RECALL, TOP_FRACTION = 0.8, 0.2


def synthetic_records(out_dir: Path, images: int = 200, error_rate: float = 0.1, seed: int = 0,
                      size: tuple[int, int] = (128, 96)) -> tuple[list[LabeledImage], list[dict]]:
    """Records (images written to `out_dir`) and the injected errors `{"type", "image", "label"|"prediction"}`
    (indices into the record list and into its annotations / predictions)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = []
    for i in range(images):
        array = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        boxes, names = [], []
        for _ in range(rng.integers(1, 5)):
            bw, bh = rng.integers(16, 48), rng.integers(16, 40)
            x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
            name = CLASSES[rng.integers(len(CLASSES))]
            array[y : y + bh, x : x + bw] = COLOURS[name]
            boxes.append([x, y, x + bw, y + bh])
            names.append(name)
        path = out_dir / f"synthetic-{i:04d}.png"
        Image.fromarray(array).save(path)
        truth.append((path, np.array(boxes, np.float32), names))
    n_objects = sum(len(n) for _, _, n in truth)
    picked = rng.choice([(i, j) for i, (_, _, n) in enumerate(truth) for j in range(len(n))],
                        size=int(round(error_rate * n_objects)), replace=False)
    errors_at = {(int(i), int(j)): ERROR_TYPES[k % 3] for k, (i, j) in enumerate(picked)}
    records, injected = [], []
    for i, (path, boxes, names) in enumerate(truth):
        noisy = boxes + rng.normal(0, 1.0, boxes.shape).astype(np.float32)
        scores = rng.uniform(0.6, 1.0, len(boxes))
        p_boxes, p_names, p_scores = list(noisy), list(names), list(scores)
        if rng.random() < 0.2:  # a low-confidence false positive
            x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
            p_boxes.append(np.array([x, y, x + 20, y + 20], np.float32))
            p_names.append(CLASSES[rng.integers(len(CLASSES))])
            p_scores.append(rng.uniform(0.05, 0.3))
        g_boxes, g_names = [], []
        for j, (box, name) in enumerate(zip(boxes, names)):
            kind = errors_at.get((i, j))
            if kind == "deleted_box":
                injected.append({"type": kind, "image": i, "prediction": j})
                continue
            if kind == "wrong_class":
                name = CLASSES[(CLASSES.index(name) + 1 + rng.integers(2)) % len(CLASSES)]
            if kind == "shifted_box":
                bw, bh = box[2] - box[0], box[3] - box[1]
                shift = np.array([bw, bh]) * rng.uniform(0.45, 0.6) * rng.choice([-1, 1], 2)
                box = box + np.tile(shift, 2).astype(np.float32)
                box = np.clip(box, 0, [w, h, w, h])
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


def recall_in_top(records: list[LabeledImage], injected: list[dict], top_fraction: float = TOP_FRACTION) -> dict:
    from ml_backend.review.mistakes import find_label_issues, ranked_objects

    labels, preds = as_cleanlab_lists(records)
    issues = find_label_issues(labels, preds, CLASSES)
    ranking = ranked_objects(issues)
    top = ranking[: int(np.ceil(top_fraction * len(ranking)))]
    in_top_labels = {(i, j) for _, kind, i, j in top if kind != "overlooked"}
    in_top_preds = {(i, j) for _, kind, i, j in top if kind == "overlooked"}
    per_type = {}
    for t in ERROR_TYPES:
        errs = [e for e in injected if e["type"] == t]
        found = sum(((e["image"], e["prediction"]) in in_top_preds) if "prediction" in e
                    else ((e["image"], e["label"]) in in_top_labels) for e in errs)
        per_type[t] = {"injected": len(errs), "found": int(found), "recall": found / len(errs) if errs else None}
    found = sum(v["found"] for v in per_type.values())
    flagged_labels = sum(int(f.sum()) for fl in issues.label_flags.values() for f in fl)
    return {"objects_ranked": len(ranking), "top_k": len(top), "injected": len(injected), "found": found,
            "recall": found / max(1, len(injected)), "per_type": per_type,
            "cleanlab_flags": {"label_boxes": flagged_labels,
                               "overlooked": int(sum(f.sum() for f in issues.overlooked_flags))}}


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
        result = recall_in_top(records, injected)
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
    result |= {"smoke": args.smoke, "images": args.images, "error_rate": args.error_rate, "seed": args.seed,
               "target": {"recall_in_top": TARGET_RECALL, "top_fraction": TOP_FRACTION},
               "passed": result["recall"] >= TARGET_RECALL, "machine": platform.node(),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"injected errors found in the top {TOP_FRACTION:.0%} of {result['objects_ranked']} ranked objects: "
          f"{result['found']}/{result['injected']} = {result['recall']:.1%} (target >= {TARGET_RECALL:.0%})")
    for t, v in result["per_type"].items():
        print(f"  {t:12s} {v['found']:3d}/{v['injected']:3d} = {v['recall'] or 0:.1%}")
    if "fiftyone_review_s" in result:
        print(f"whole review on FiftyOne: {result['fiftyone_review_s']} s; views {result['fiftyone_views']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}" + ("; smoke run: the recall is not judged" if args.smoke else ""))
    return exit_status(result["passed"], args.smoke)


if __name__ == "__main__":
    sys.exit(main())
