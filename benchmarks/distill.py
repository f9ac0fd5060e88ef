"""Does distillation give a student that is good, fast and saves labelling, even beside a busy CPU?

```
HF_HUB_OFFLINE=1 python -m benchmarks.distill [--images 1000] [--size 128] [--minutes 9] [--out benchmarks/results/distill.json] [--smoke]
```

1. Generates `--images` synthetic images with exact boxes (`ml_backend.distill.synthetic`) of varied sizes (`SIZES`:
   square, wide and tall, around `--size`) with objects overlapping up to `MAX_OVERLAP` of the smaller box, and 200
   more, never seen in training, as the test set.
2. Runs `distill` from scratch (no downloads) with a training time limit, and reports its whole wall time (loading,
   training, ONNX export and parity, evaluation) and its quality gate.
3. Evaluates the exported student (ONNX Runtime, the served path) on the test set: COCO mAP@0.5 and mAP@[.5:.95].
4. Latency: the student on one test image (batch 1, ONNX Runtime, CPU) against the teacher, full-size Grounding DINO-T
   + SAM-B (random weights, `benchmarks/models.py`) pre-annotating the same image with masks.
5. Labelling effort: the student pre-annotates the test images at the threshold that saved the most effort on the
   validation split; `measure_effort` counts the edits to the exact labels against drawing every box.
6. A busy CPU: one training epoch (a fresh child process each) alone and beside a process spinning on one core, with
   OpenMP waiting passively (what `prelabel distill` sets) and with its default spin-waiting; busy / quiet ratio.

Targets: mAP50 >= 0.9, mAP >= 0.7, whole run <= 10 minutes, student/teacher latency <= 0.01, effort saved >= 60 %,
busy/quiet epoch ratio <= 3 with passive waiting. Exit status 1 when one is missed. `--smoke`: the same steps on
40 + 10 images around 64 px, 2 epochs, the tiny models as the teacher (seconds; the targets are not judged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.distill import wait_passively
from ml_backend.distill.synthetic import SHAPES, generate

from .harness import SMOKE_HELP, exit_status, result_path

# torch loads in `main` (after `wait_passively`), so that the epoch-timing children choose their own OpenMP policy

HERE = Path(__file__).parent
CACHE = HERE / "results" / ".cache"
SMOKE = {"images": 40, "test_images": 10, "size": 64, "minutes": 1.0, "epochs": 2, "teacher_repeats": 1,
         "epoch_images": 16}
TARGETS = {"map50": (">=", 0.9), "map": (">=", 0.7), "minutes": ("<=", 10.0), "latency_ratio": ("<=", 0.01),
           "effort_saved": (">=", 0.6), "busy_ratio": ("<=", 3.0)}
SIZE_FACTORS = ((1, 1), (1.5, 1), (1, 1.25), (1.25, 0.75))  # (width, height) x --size: square, wide, tall
MAX_OVERLAP = 0.4  # of the smaller box; a shape left with less than 60 % visible is not labelled (clutter)


def image_sizes(size: int) -> list[tuple[int, int]]:
    return [(round(w * size), round(h * size)) for w, h in SIZE_FACTORS]


def epoch_seconds(size: int, images: int) -> dict:
    """Seconds of one training epoch (with the model's build, its validation and checkpoint) of a fresh student on
    `images` synthetic images, and the torch threads. Runs in a child process (`busy_ratio`), whose environment sets
    the OpenMP wait policy."""
    import torch

    from ml_backend.distill.dataset import TensorSet
    from ml_backend.distill.train import TrainOptions, train
    from ml_backend.models.student import StudentConfig

    with tempfile.TemporaryDirectory() as tmp:
        records = generate(Path(tmp) / "data", images, seed=2, sizes=image_sizes(size), max_overlap=MAX_OVERLAP)
        arrays = [load(r.image) for r in records]
        truths = [r.annotations for r in records]
        train_set = TensorSet.from_arrays(arrays, truths, list(SHAPES), size, augment=True)
        val_set = TensorSet.from_arrays(arrays[:8], truths[:8], list(SHAPES), size)
        config = StudentConfig(classes=list(SHAPES), image_size=size)
        result = train(Path(tmp) / "student", config, train_set, val_set, TrainOptions(epochs=1), torch.device("cpu"),
                       resume=False, show_progress=False)
    return {"seconds": round(result.seconds, 2), "threads": result.threads}


def busy_ratio(size: int, images: int) -> dict:
    """An epoch's seconds alone and beside a process spinning on one core (killed afterwards), with OpenMP waiting
    passively (`prelabel distill`'s setting) and spinning (its default); a busy run stops after 20 x the quiet one."""
    code = f"import json; from benchmarks.distill import epoch_seconds; print(json.dumps(epoch_seconds({size}, {images})))"
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    rows = {}
    for name, env in (("passive", environ | {"OMP_WAIT_POLICY": "PASSIVE"}), ("default", environ)):
        def child(timeout: float) -> dict | None:
            try:
                done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      timeout=timeout, check=True, cwd=HERE.parent)
            except subprocess.TimeoutExpired:
                return None
            return json.loads(done.stdout.strip().splitlines()[-1])

        quiet = child(600)
        limit = max(60.0, 20 * quiet["seconds"])
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy = child(limit)
        finally:
            spinner.kill()
            spinner.wait()
        rows[name] = {"quiet_s": quiet["seconds"], "busy_s": None if busy is None else busy["seconds"],
                      "ratio": round((busy["seconds"] if busy else limit) / quiet["seconds"], 2),
                      "timed_out": busy is None, "threads": quiet["threads"]}
    return rows


def load(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def teacher_seconds(image: np.ndarray, repeats: int, smoke: bool = False) -> float:
    from benchmarks.models import write_models
    from ml_backend.distill.onnx_export import median_seconds
    from ml_backend.engine import Engine
    from ml_backend.models.tiny import write_tiny_models
    from ml_backend.ontology import PromptsFile
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
    parser.add_argument("--epoch-images", type=int, default=64, help="images of the busy-CPU epoch timing")
    parser.add_argument("--skip-busy", action="store_true", help="no busy-CPU epoch timing")
    parser.add_argument("--out", type=Path, help="default: results/distill.json (results/smoke/ with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    args.out = args.out or result_path("distill.json", args.smoke)

    wait_passively()  # as `prelabel distill` does, before torch loads
    import torch

    from ml_backend.distill.onnx_export import median_seconds
    from ml_backend.distill.run import DistillOptions, distill
    from ml_backend.distill.train import TrainOptions
    from ml_backend.effort import measure_effort
    from ml_backend.evaluation import coco_evaluate
    from ml_backend.models.student import StudentDetector
    from ml_backend.ontology import PromptsFile

    sizes = image_sizes(args.size)
    data = (CACHE / "smoke" if args.smoke else CACHE) / f"distill-{args.images}-{args.size}-varied"
    records = generate(data / "train", args.images, seed=0, sizes=sizes, max_overlap=MAX_OVERLAP)
    test = generate(data / "test", args.test_images, seed=1, sizes=sizes, max_overlap=MAX_OVERLAP)
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
    quality = coco_evaluate([r.annotations for r in test], predictions, list(SHAPES), [(r.width, r.height) for r in test])

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

    busy = None if args.skip_busy else busy_ratio(args.size, args.epoch_images)

    values = {"map50": quality.map50, "map": quality.map, "minutes": round(minutes, 2),
              "latency_ratio": None if teacher_s is None else round(student_s / teacher_s, 5),
              "effort_saved": round(effort.saved or 0.0, 4), "busy_ratio": busy and busy["passive"]["ratio"]}
    checks = {}
    for name, (op, target) in TARGETS.items():
        value = values[name]
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        checks[name] = {"value": value, "target": f"{op} {target}", "pass": ok}
    result = {
        "checks": checks,
        "test_set": quality.as_dict(),
        "validation": {k: report["student"][k] for k in ("map", "map50")},
        "quality_gate": {k: report["quality"][k] for k in ("passed", "problems", "min_map", "min_vs_teacher")},
        "data": {"sizes": sizes, "max_overlap": MAX_OVERLAP, "train_images": args.images,
                 "test_images": args.test_images, "test_objects": sum(len(r.annotations) for r in test)},
        "training": {k: report["training"][k] for k in ("epochs_run", "best_epoch", "stopped", "seconds", "threads")},
        "busy_cpu_epoch": busy,
        "latency_s": {"student": student_s, "teacher": teacher_s, "student_runtime": detector.runtime},
        "effort": {"threshold": best, **effort.as_dict()},
        "speed_table": report.get("speed"),
        "smoke": args.smoke,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "platform": platform.platform(),
                    "torch": torch.__version__},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, check in checks.items():
        mark = "n/a" if check["pass"] is None else ("ok" if check["pass"] else "MISS")
        print(f"{name:>15}: {check['value']}  (target {check['target']})  {mark}")
    if busy:
        print("busy CPU, one epoch alone -> beside a spinning process: " + ", ".join(
            f"{name} waiting {row['quiet_s']:.1f} -> {'>' if row['timed_out'] else ''}{row['busy_s'] or 0:.1f} s "
            f"(x{row['ratio']})" for name, row in busy.items()))
    print(f"student {1000 * student_s:.1f} ms/image, teacher {teacher_s if teacher_s is None else f'{teacher_s:.1f} s'}; "
          f"effort threshold {best}; result in {args.out}" + ("; smoke run: the targets are not judged" if args.smoke else ""))
    return exit_status(all(c["pass"] is not False for c in checks.values()), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
