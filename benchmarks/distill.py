"""Does distillation give a student that is good, fast and saves labelling?

```
HF_HUB_OFFLINE=1 python -m benchmarks.distill [--images 1000] [--size 128] [--minutes 9] [--out benchmarks/results/distill.json] [--smoke]
```

1. Generates `--images` synthetic images with exact boxes (`ml_backend.distill.synthetic`) and 200 more, never seen in
   training, as the test set.
2. Runs `distill` from scratch (no downloads) with a training time limit, and reports its whole wall time (loading,
   training, ONNX export and parity, evaluation).
3. Evaluates the exported student (ONNX Runtime, the served path) on the test set: COCO mAP@0.5 and mAP@[.5:.95].
4. Latency: the student on one test image (batch 1, ONNX Runtime, CPU) against the teacher, full-size Grounding DINO-T
   + SAM-B (random weights, `benchmarks/models.py`) pre-annotating the same image with masks.
5. Labelling effort: the student pre-annotates the test images at the threshold that saved the most effort on the
   validation split; `measure_effort` counts the edits to the exact labels against drawing every box.

Targets: mAP50 >= 0.9, mAP >= 0.7, whole run <= 10 minutes, student/teacher latency <= 0.01, effort saved >= 60 %.
Exit status 1 when one is missed. `--smoke`: the same steps on 40 + 10 images of 64 px, 2 epochs, the tiny models as
the teacher (seconds; the targets are not judged).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ml_backend.effort import measure_effort
from ml_backend.distill.onnx_export import median_seconds
from ml_backend.distill.run import DistillOptions, distill
from ml_backend.distill.synthetic import SHAPES, generate
from ml_backend.distill.train import TrainOptions
from ml_backend.evaluation import coco_evaluate
from ml_backend.models.student import StudentDetector
from ml_backend.ontology import PromptsFile

from .harness import SMOKE_HELP, exit_status, result_path  # noqa: E402

HERE = Path(__file__).parent
CACHE = HERE / "results" / ".cache"
SMOKE = {"images": 40, "test_images": 10, "size": 64, "minutes": 1.0, "epochs": 2, "teacher_repeats": 1}
TARGETS = {"map50": (">=", 0.9), "map": (">=", 0.7), "minutes": ("<=", 10.0), "latency_ratio": ("<=", 0.01),
           "effort_saved": (">=", 0.6)}


def load(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def teacher_seconds(image: np.ndarray, repeats: int, smoke: bool = False) -> float:
    from benchmarks.models import write_models
    from ml_backend.engine import Engine
    from ml_backend.models.tiny import write_tiny_models
    from ml_backend.settings import Settings

    models = write_tiny_models(CACHE / "smoke" / "models") if smoke else write_models(CACHE / "models")
    settings = Settings(detector=str(models["detector"]), segmenter=str(models["segmenter"]), device="cpu",
                        model_dir=CACHE)
    pipeline = Engine.from_settings(settings)
    ontology = PromptsFile().ontology([s for s in SHAPES])

    def run():
        (det,) = pipeline.detect([image], ontology)
        if not len(det):  # random weights may find nothing: time SAM on one box anyway, as a real teacher would
            det.xyxy = np.array([[10, 10, 60, 60]], np.float32)
        pipeline.segmenter.segment(image, boxes=det.xyxy[:3])

    return median_seconds(run, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="synthetic image side and the student's input size")
    parser.add_argument("--minutes", type=float, default=9.0, help="training time limit")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--teacher-repeats", type=int, default=2)
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--out", type=Path, help="default: results/distill.json (results/smoke/ with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    args.out = args.out or result_path("distill.json", args.smoke)

    size = (args.size, args.size)
    data = (CACHE / "smoke" if args.smoke else CACHE) / f"distill-{args.images}-{args.size}"
    records = generate(data / "train", args.images, seed=0, size=size)
    test = generate(data / "test", args.test_images, seed=1, size=size)
    out = data / "student"
    options = DistillOptions(image_size=args.size, pretrained="scratch", resume=False, device="cpu",
                             train=TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                                patience=args.epochs, time_limit_s=args.minutes * 60))
    started = time.perf_counter()
    report = distill(records, list(SHAPES), lambda r: load(r.image), out, options, "synthetic shapes")
    minutes = (time.perf_counter() - started) / 60

    detector = StudentDetector(out)
    test_images = [load(r.image) for r in test]
    low = PromptsFile(box_threshold=0.05).ontology(list(SHAPES))
    predictions = detector.detect(test_images, low)
    quality = coco_evaluate([r.annotations for r in test], predictions, list(SHAPES), [size] * len(test))

    val_keys = set(json.loads((out / "split.json").read_text())["val"])
    val = [r for r in records if r.key in val_keys]
    val_predictions = detector.detect([load(r.image) for r in val], low)

    def saved(preds, truths, threshold: float) -> float:
        return measure_effort([(p[p.confidence >= threshold], t) for p, t in zip(preds, truths)]).saved or 0.0

    thresholds = [round(t, 2) for t in np.arange(0.1, 0.95, 0.05)]
    best = max(thresholds, key=lambda t: saved(val_predictions, [r.annotations for r in val], t))
    effort = measure_effort([(p[p.confidence >= best], r.annotations) for p, r in zip(predictions, test)])

    image = test_images[0]
    student_s = median_seconds(lambda: detector.detect([image], low), 20)
    teacher_s = None if args.skip_teacher else teacher_seconds(image, args.teacher_repeats, args.smoke)

    values = {"map50": quality.map50, "map": quality.map, "minutes": round(minutes, 2),
              "latency_ratio": None if teacher_s is None else round(student_s / teacher_s, 5),
              "effort_saved": round(effort.saved or 0.0, 4)}
    checks = {}
    for name, (op, target) in TARGETS.items():
        value = values[name]
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        checks[name] = {"value": value, "target": f"{op} {target}", "pass": ok}
    result = {
        "checks": checks,
        "test_set": quality.as_dict(),
        "validation": {k: report["student"][k] for k in ("map", "map50")},
        "training": {k: report["training"][k] for k in ("epochs_run", "best_epoch", "stopped", "seconds")},
        "latency_s": {"student": student_s, "teacher": teacher_s, "student_runtime": detector.runtime},
        "effort": {"threshold": best, **effort.as_dict()},
        "speed_table": report.get("speed"),
        "smoke": args.smoke,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, check in checks.items():
        mark = "n/a" if check["pass"] is None else ("ok" if check["pass"] else "MISS")
        print(f"{name:>15}: {check['value']}  (target {check['target']})  {mark}")
    print(f"student {1000 * student_s:.1f} ms/image, teacher {teacher_s if teacher_s is None else f'{teacher_s:.1f} s'}; "
          f"effort threshold {best}; result in {args.out}" + ("; smoke run: the targets are not judged" if args.smoke else ""))
    return exit_status(all(c["pass"] is not False for c in checks.values()), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
