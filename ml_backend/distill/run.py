"""`prelabel distill`: labelled records -> split -> trained student -> ONNX -> evaluation against the teacher ->
model card and report. Everything lands in one output directory; running again resumes there."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engine import Engine, RequestSpec
from ..evaluation import coco_evaluate
from ..jobs import STATE_FILE
from ..models import pick_device
from ..models.loading import hub_offline
from ..models.student import StudentConfig, StudentDetector
from ..media import MediaItem
from ..operating import INTERVALS, Targets, operating_points
from ..ontology import LabelSpec, Ontology, PromptsFile
from ..settings import Settings
from ..types import LabeledImage
from .dataset import DistillError, Example, TensorSet, stratified_split, training_examples, write_coco
from .onnx_export import export_onnx, speed_table, write_model_card
from .train import TrainOptions, train

log = logging.getLogger(__name__)
REPORT_FILE, SPLIT_FILE = "report.json", "split.json"
MIN_MAP, MIN_VS_TEACHER = 0.2, 0.5  # the quality gate's defaults (validation mAP@0.5; share of the teacher's)


@dataclass
class DistillOptions:
    image_size: int = 512
    fpn_channels: int = 128
    val_fraction: float = 0.2
    accept_predictions: float | None = None  # also train on predictions scoring >= this where nobody annotated
    pretrained: str = "auto"  # auto | imagenet | scratch
    export: bool = True
    resume: bool = True
    device: str = "auto"
    min_map: float = MIN_MAP  # the student fails below this validation mAP@0.5 (0: no floor)
    min_vs_teacher: float = MIN_VS_TEACHER  # ... or below this share of the teacher's mAP@0.5 on the same images
    targets: list[str] = field(default_factory=list)  # operating points (`--target`) the student's are chosen for
    train: TrainOptions = field(default_factory=TrainOptions)


def write_state(out: Path, **state) -> None:
    """`state.json`: what the run is doing now (read by the server's /metrics for background jobs)."""
    path = out / STATE_FILE
    previous = json.loads(path.read_text()) if path.exists() else {}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(previous | state | {"updated": time.time()}))
    tmp.replace(path)


def backbone_weights(mode: str):
    """ImageNet ResNet-18 weights for `auto` when cached or downloadable, for `imagenet` or fail; None for scratch."""
    if mode == "scratch":
        return None
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.exists():
        return weights
    if hub_offline():  # the user said: no network
        reachable, why = False, "HF_HUB_OFFLINE is set"
    else:
        try:
            socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
            reachable, why = True, ""
        except OSError:
            reachable, why = False, "download.pytorch.org cannot be reached"
    if reachable:
        return weights
    if mode == "imagenet":
        raise DistillError(f"ImageNet weights are not cached ({cached}) and {why}; use --pretrained scratch, or "
                           "copy the file there")
    log.warning("no ImageNet backbone weights (not cached, no network): training from scratch")
    return None


def _objects(examples: list[Example]) -> dict[str, int]:
    return dict(Counter(str(n) for e in examples for n in e.truth.data.get("class_name", [])))


def _split_keys(out: Path, train_ex: list[Example], val_ex: list[Example], seed: int, fraction: float, resume: bool) -> None:
    split = {"seed": seed, "val_fraction": fraction, "train": [e.record.key for e in train_ex],
             "val": [e.record.key for e in val_ex]}
    path = out / SPLIT_FILE
    if resume and path.exists() and (out / "checkpoints").exists():
        if json.loads(path.read_text()) != split:
            raise DistillError(f"the data changed since {out} was started (the split differs from {path}); "
                               "use --restart to train again from scratch, or another --out")
    path.write_text(json.dumps(split, indent=1))


def load_images(examples: list[Example], load: Callable[[LabeledImage], np.ndarray], size: int
                ) -> tuple[list[Example], list[tuple[np.ndarray, float]], list[tuple[int, int]], list[dict]]:
    """(examples whose image loaded, their letterboxed arrays with scales, their (width, height), failures
    `{"image", "error"}`), with a progress bar. Only the letterboxed copy stays in memory."""
    from ..models.student import letterbox
    from ..runner import progress_bar

    kept, boxed, sizes, failed = [], [], [], []
    with progress_bar("loading images") as progress:
        bar = progress.add_task("loading", total=len(examples))
        for e in examples:
            try:
                array = load(e.record)
                boxed.append(letterbox(array, size))
                sizes.append((array.shape[1], array.shape[0]))
                kept.append(e)
            except Exception as exc:  # noqa: BLE001 - every failure is reported by image, none silently dropped
                failed.append({"image": e.record.key, "error": f"{type(exc).__name__}: {exc}"})
                log.warning("image %s cannot be used: %s", e.record.key, exc)
            progress.advance(bar)
    return kept, boxed, sizes, failed


def distill(
    records: list[LabeledImage],
    labels: list[str],
    load: Callable[[LabeledImage], np.ndarray],
    out: Path,
    options: DistillOptions,
    source: str,
    show_progress: bool = True,
    teacher: Engine | None = None,
) -> dict:
    """Trains, exports and evaluates a student from `records` (their annotations; see `training_examples`),
    evaluating the teacher on the same validation images: `teacher` run through the engine when given, else the
    records' stored predictions. Returns the report (also written to `out/report.json`)."""
    out.mkdir(parents=True, exist_ok=True)
    if not options.resume:
        for name in ("checkpoints/last.pt", SPLIT_FILE):
            (out / name).unlink(missing_ok=True)
    write_state(out, state="preparing", source=source, started=time.time(), error=None)
    examples = training_examples(records, options.accept_predictions)
    counts = _objects(examples)
    classes = [name for name in labels if counts.get(name)]
    unused = [name for name in labels if not counts.get(name)]
    if unused:
        log.warning("labels without any annotated object are left out of the student: %s", unused)
    if not classes:
        raise DistillError(f"{source}: no annotated objects to learn from ({len(records)} images, "
                           f"{len(examples)} with annotations)")
    targets = Targets.parse(options.targets).matched(classes)  # before training: a wrong label fails at once
    strange = sorted(set(counts) - set(labels))
    if strange:
        raise DistillError(f"{source}: annotations use labels not in the label set {labels}: {strange}")
    train_ex, val_ex = stratified_split(examples, options.val_fraction, options.train.seed)
    _split_keys(out, train_ex, val_ex, options.train.seed, options.val_fraction, options.resume)
    write_coco(train_ex, classes, out / "train.json")
    write_coco(val_ex, classes, out / "val.json")
    log.info("%s: %d training and %d validation images, classes %s", source, len(train_ex), len(val_ex), classes)

    write_state(out, state="loading images")
    size = options.image_size
    train_ex, train_boxed, _, failed = load_images(train_ex, load, size)
    val_ex, val_boxed, val_sizes, val_failed = load_images(val_ex, load, size)
    failed += val_failed
    weights = backbone_weights(options.pretrained)
    config = StudentConfig(classes=classes, image_size=options.image_size, fpn_channels=options.fpn_channels,
                           pretrained_backbone=weights is not None)
    train_set = TensorSet(train_boxed, [e.truth for e in train_ex], classes, size, augment=True)
    val_set = TensorSet(val_boxed, [e.truth for e in val_ex], classes, size)
    del train_boxed, val_boxed
    device = pick_device(options.device)

    write_state(out, state="training", epoch=0, epochs=options.train.epochs)
    result = train(out, config, train_set, val_set, options.train, device, options.resume,
                   on_epoch=lambda entry: write_state(out, state="training", **entry), show_progress=show_progress,
                   backbone_weights=weights)
    if result.best_epoch == 0:
        raise DistillError(f"training stopped ({result.stopped}) before its first epoch ended; run again to resume")

    report: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source, "out": str(out),
        "data": {
            "train_images": len(train_ex), "val_images": len(val_ex),
            "accepted_prediction_images": sum(e.source == "prediction" for e in train_ex),
            "train_objects": _objects(train_ex), "val_objects": _objects(val_ex), "seed": options.train.seed,
            "val_fraction": options.val_fraction, "unused_labels": unused, "failed_images": failed,
        },
        "training": asdict(result) | {"device": str(device), "options": asdict(options.train)},
    }
    if options.export:
        write_state(out, state="exporting")
        sample = np.stack(val_set.images[:4]).astype(np.uint8) if len(val_set) else None
        report["onnx_parity"] = export_onnx(out, sample)
        report["speed"] = speed_table(out)

    write_state(out, state="evaluating")
    report["student"] = evaluate_student(out, val_ex, load, classes, options.train.eval_threshold, targets)
    if teacher is not None:
        report["teacher"] = evaluate_model(teacher, teacher.ontology(classes), val_ex, load, classes)
    else:
        report["teacher"] = evaluate_teacher(val_ex, val_sizes, classes)
    if report["teacher"]:
        report["student_vs_teacher"] = {
            "map": round(report["student"]["map"] - report["teacher"]["map"], 4),
            "map50": round(report["student"]["map50"] - report["teacher"]["map50"], 4),
        }
    report["quality"] = quality_gate(report, options.min_map, options.min_vs_teacher)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    write_model_card(out, report)
    write_state(out, state="done", finished=time.time(), student_map=report["student"]["map"],
                student_map50=report["student"]["map50"], quality_passed=report["quality"]["passed"])
    if not report["quality"]["passed"]:
        log.warning("%s", report["quality"]["message"])
    return report


def quality_gate(report: dict, min_map: float, min_vs_teacher: float) -> dict:
    """Does the student reach validation mAP@0.5 `min_map` and `min_vs_teacher` x the teacher's mAP@0.5 on the same
    images? `{"passed", "problems", "advice", "message", ...}`; the student is kept either way."""
    student, teacher, training = report["student"]["map50"], (report.get("teacher") or {}).get("map50"), report["training"]
    problems, checks = [], []
    if min_map > 0:
        checks.append(f"validation mAP@0.5 {max(student, 0):.3f} >= --min-map {min_map}")
        if student < min_map:
            problems.append(f"its validation mAP@0.5 {max(student, 0):.3f} is below --min-map {min_map}")
    if min_vs_teacher > 0 and teacher is not None and teacher > 0:
        checks.append(f">= {min_vs_teacher} x the teacher's {teacher:.3f}")
        if student < min_vs_teacher * teacher:
            problems.append(f"its validation mAP@0.5 {max(student, 0):.3f} is below {min_vs_teacher} x the teacher's "
                            f"{teacher:.3f} on the same {report['student']['images']} images (--min-vs-teacher)")
    history = training["history"]
    per_epoch = sum(h["seconds"] for h in history) / len(history) if history else 0.0
    objects = sum(report["data"]["train_objects"].values())
    epochs = f"{training['epochs_run']} epoch{'' if training['epochs_run'] == 1 else 's'}"
    advice = (f"training ran {epochs} ({training['stopped']}, {per_epoch:.0f} s per epoch with "
              f"{training.get('threads')} threads) on {report['data']['train_images']} images with {objects} objects: "
              "train longer (--restart with more --epochs or a longer --time-limit; slow epochs: is another program "
              "busy on the CPU? try --threads), or annotate more images")
    message = (f"the student did not pass the quality gate: {'; '.join(problems)}. {advice}. It is kept in "
               f"{report['out']} (model, ONNX, model card) all the same.") if problems else ""
    return {"passed": not problems, "problems": problems, "checks": checks, "advice": advice if problems else "",
            "message": message, "min_map": min_map, "min_vs_teacher": min_vs_teacher,
            "student_map50": student, "teacher_map50": teacher}


def evaluate_model(engine: Engine, ontology: Ontology, examples: list[Example],
                   load: Callable[[LabeledImage], np.ndarray], classes: list[str], targets: Targets | None = None
                   ) -> dict:
    """A detector through the engine (the path every entrance takes) on the original validation images, loaded
    again one at a time; an image it fails on counts as one with no detections, and is counted. With `targets`
    (matched to `classes`), also each class's operating point (`operating_points`: threshold, P/R/F1 with 95%
    intervals, target met or not)."""
    predictions, sizes, failed = [], [], 0
    for e in examples:
        array = load(e.record)
        result = engine.run([MediaItem(array, e.record.image)], RequestSpec(ontology))[0]
        if result.error is not None:
            log.warning("%s", result.error)
            failed += 1
        predictions.append(result.detections)
        sizes.append((array.shape[1], array.shape[0]))
    result = coco_evaluate([e.truth for e in examples], predictions, classes, sizes)
    points = {}
    if targets:
        points = {"targets": targets.as_list(), "intervals": INTERVALS, "operating_points": {
            name: p.as_dict() for name, p in operating_points(result.matches, targets).items()}}
    return result.as_dict() | {"model_id": engine.detector.model_id, "model_version": engine.model_version(ontology),
                               "failed_images": failed} | points


def evaluate_student(directory: Path, examples: list[Example], load: Callable[[LabeledImage], np.ndarray],
                     classes: list[str], threshold: float, targets: Targets | None = None) -> dict:
    """The served path: `StudentDetector` (ONNX Runtime when exported) through the engine; its boxes down to
    `threshold`, so that operating points for `targets` can be chosen above it."""
    detector = StudentDetector(directory)
    ontology = Ontology(tuple(LabelSpec(c, (c.casefold(),), threshold) for c in classes), nms_iou=0.6)
    engine = Engine(detector, None, PromptsFile(), Settings())
    return evaluate_model(engine, ontology, examples, load, classes, targets) | {"runtime": detector.runtime}


def evaluate_teacher(examples: list[Example], sizes: list[tuple[int, int]], classes: list[str]) -> dict | None:
    """The stored pre-annotations on the same validation images (of `sizes`), if the records carry them."""
    with_predictions = [i for i, e in enumerate(examples) if e.record.predictions is not None]
    if not with_predictions:
        return None
    sizes = [sizes[i] for i in with_predictions]
    result = coco_evaluate([examples[i].truth for i in with_predictions],
                           [examples[i].record.predictions for i in with_predictions], classes, sizes)
    versions = sorted({examples[i].record.model_version for i in with_predictions if examples[i].record.model_version})
    return result.as_dict() | {"model_version": ", ".join(versions) or None,
                               "missing_predictions": len(examples) - len(with_predictions)}


def print_distill(report: dict, console=None) -> None:
    """Student against teacher per label, then the overall figures."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=160)
    student, teacher = report["student"], report.get("teacher") or {}
    table = Table(title=f"student vs teacher on {student['images']} held-out images ({report['source']})")
    for column in ("label", "val objects", "student AP", "student AP50", "teacher AP", "teacher AP50"):
        table.add_column(column)

    def cell(value) -> str:
        return "n/a" if value is None or value < 0 else f"{value:.3f}"

    for name, s in student["per_label"].items():
        t = (teacher.get("per_label") or {}).get(name, {})
        table.add_row(name, str(s["truth"]), cell(s["ap"]), cell(s["ap50"]), cell(t.get("ap")), cell(t.get("ap50")))
    table.add_row("all", str(sum(s["truth"] for s in student["per_label"].values())), cell(student["map"]),
                  cell(student["map50"]), cell(teacher.get("map")), cell(teacher.get("map50")), style="bold")
    console.print(table)
    print_operating_points(student, console)
    training = report["training"]
    console.print(f"training: {training['epochs_run']} epochs ({training['stopped']}), best epoch "
                  f"{training['best_epoch']}, {training['seconds']:.0f} s on {training['device']} "
                  f"({training.get('threads')} threads)")
    if not teacher:
        console.print("teacher: no stored predictions on the validation images, so no comparison")
    elif teacher.get("model_id"):
        console.print(f"teacher: {teacher['model_id']} (model version {teacher['model_version']}), run on the "
                      f"held-out images" + (f"; it failed on {teacher['failed_images']}" if teacher["failed_images"] else ""))
    for row in report.get("speed", []):
        if row["batch"] == 1:
            console.print(f"speed: {row['runtime']} {row['device']} {1000 * row['s_per_image']:.1f} ms/image")
    quality = report.get("quality")
    if quality and quality["passed"]:
        console.print(f"quality gate passed: {', '.join(quality['checks']) or 'nothing to check (both checks off)'}")


def print_operating_points(evaluation: dict, console) -> None:
    """The student's operating points on the held-out images, when `--target` asked for them."""
    from rich.table import Table

    from ..operating import point_cells

    points = evaluation.get("operating_points")
    if points is None:
        return
    table = Table(title=f"student operating points on the held-out images (target {', '.join(evaluation['targets'])}"
                        f"; 95% intervals)")
    for column in ("label", "threshold", "P", "R", "F1", "TP/FP/FN", "result"):
        table.add_column(column)
    for name, p in points.items():
        table.add_row(name, *point_cells(p), f"{p['tp']}/{p['fp']}/{p['fn']}", p["note"],
                      style="red" if p["met"] is False else None)
    console.print(table)
