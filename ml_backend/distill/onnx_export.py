"""ONNX export of the student, checked against PyTorch with ONNX Runtime, and its model card."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..models.student import LICENSE, ONNX_FILE, StudentConfig, StudentRaw, load_student_weights
from .dataset import DistillError

log = logging.getLogger(__name__)
OPSET = 18


def export_onnx(directory: Path, sample: np.ndarray | None = None, atol: float = 1e-3) -> dict:
    """Writes `directory/model.onnx` (input `images`: uint8 (B, 3, S, S); outputs `boxes`, `scores`) and checks
    that ONNX Runtime and PyTorch agree on `sample` (uint8 (B, 3, S, S); random images if None) within `atol`
    (boxes compared relative to the input size). Returns the parity figures; raises DistillError when they differ."""
    import onnxruntime as ort

    config, model = load_student_weights(directory)
    raw = StudentRaw(model, config.image_size).eval()
    size = config.image_size
    if sample is None:
        sample = np.random.default_rng(0).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    path = directory / ONNX_FILE
    example = torch.from_numpy(sample[:1])
    with torch.inference_mode():
        torch.onnx.export(
            raw, (example,), str(path), input_names=["images"], output_names=["boxes", "scores"],
            dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
        boxes, scores = (t.numpy() for t in raw(torch.from_numpy(sample)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    o_boxes, o_scores = session.run(None, {"images": sample})
    parity = {
        "images": int(len(sample)),
        "max_abs_diff_scores": float(np.abs(o_scores - scores).max()),
        "max_abs_diff_boxes_relative": float(np.abs(o_boxes - boxes).max() / size),
        "atol": atol,
    }
    parity["ok"] = parity["max_abs_diff_scores"] <= atol and parity["max_abs_diff_boxes_relative"] <= atol
    if not parity["ok"]:
        raise DistillError(f"ONNX Runtime and PyTorch disagree beyond {atol}: {parity}")
    log.info("exported %s; ONNX Runtime matches PyTorch (scores within %.2g, boxes within %.2g of the input size)",
             path, parity["max_abs_diff_scores"], parity["max_abs_diff_boxes_relative"])
    return parity


def median_seconds(fn, repeats: int = 5) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_runtime(run, batch: np.ndarray, repeats: int = 5) -> float:
    """Median seconds per image of `run(batch)`."""
    return median_seconds(lambda: run(batch), repeats) / len(batch)


def speed_table(directory: Path, repeats: int = 5) -> list[dict]:
    """Seconds per image of the student on this machine: PyTorch and ONNX Runtime, batch 1 and 8, on CPU (and
    CUDA PyTorch where present)."""
    import onnxruntime as ort

    config, model = load_student_weights(directory)
    size = config.image_size
    raw = StudentRaw(model, size).eval()
    session = ort.InferenceSession(str(directory / ONNX_FILE), providers=["CPUExecutionProvider"])
    rows = []
    for batch_size in (1, 8):
        batch = np.random.default_rng(1).integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8)
        with torch.inference_mode():
            rows.append({"runtime": "pytorch", "device": "cpu", "batch": batch_size,
                         "s_per_image": time_runtime(lambda b: raw(torch.from_numpy(b)), batch, repeats)})
        rows.append({"runtime": "onnxruntime", "device": "cpu", "batch": batch_size,
                     "s_per_image": time_runtime(lambda b: session.run(None, {"images": b}), batch, repeats)})
        if torch.cuda.is_available():
            cuda = raw.cuda()

            def on_gpu(b: np.ndarray) -> None:
                cuda(torch.from_numpy(b).cuda())
                torch.cuda.synchronize()

            with torch.inference_mode():
                rows.append({"runtime": "pytorch", "device": "cuda", "batch": batch_size,
                             "s_per_image": time_runtime(on_gpu, batch, repeats)})
            raw = raw.cpu()
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if value < 0 else f"{value:.3f}"
    return str(value)


def _operating_lines(directory: Path, student: dict) -> list[str]:
    """The student's operating points (`--target`) as a table, and the thresholds as a prompts file snippet."""
    import yaml

    from ..operating import markdown_table

    points = student.get("operating_points")
    if points is None:
        return []
    thresholds = {name: p["threshold"] for name, p in points.items() if p["threshold"] is not None}
    return [
        "", f"## Operating points (held-out validation split, target {', '.join(student['targets'])})", "",
        "Per class the score threshold that meets the target with the most recall at IoU 0.5 (or the best F1 where "
        f"no threshold meets it, as the result says); {student['intervals']}.", "",
        *markdown_table(points),
        *(["", "Serve it at these thresholds with this prompts file:", "", "```yaml",
           yaml.safe_dump({"detector": f"student:{directory}", "labels": {n: {"threshold": t} for n, t in
                                                                        thresholds.items()}}, sort_keys=False).strip(),
           "```"] if thresholds else []),
    ]


def _quality_lines(quality: dict | None) -> list[str]:
    if not quality:
        return []
    if quality["passed"]:
        return [f"Quality gate: passed ({', '.join(quality['checks']) or 'nothing to check: both checks off'}).", ""]
    return ["## Did not pass the quality gate", "",
            *[f"- The student is far below what its data allows: {p}." for p in quality["problems"]],
            f"- What to do: {quality['advice']}.", "- Do not serve it for pre-annotation as it is.", ""]


def write_model_card(directory: Path, report: dict) -> Path:
    """`MODEL_CARD.md` beside the model: classes, data counts, metrics (student and teacher), speed, license."""
    config = StudentConfig.load(directory)
    data, student, teacher = report["data"], report["student"], report.get("teacher") or {}
    lines = [
        f"# Student detector `{directory.name}`", "",
        f"Trained by `prelabel distill` on {report['created']} from {report['source']}.", "",
        *_quality_lines(report.get("quality")),
        "## Model",
        f"- Architecture: FCOS, ResNet-18 + FPN ({config.levels} levels, {config.fpn_channels} channels, "
        f"{config.head_convs} head convolutions), square input {config.image_size} px (letterboxed).",
        f"- Initialisation: {'ImageNet ResNet-18 backbone' if config.pretrained_backbone else 'from scratch (random)'}.",
        f"- Files: `{ONNX_FILE}` (input `images` uint8 B x 3 x {config.image_size} x {config.image_size}, RGB, "
        "top-left letterboxed; outputs `boxes` B x N x 4 xyxy input pixels and `scores` B x N x C; apply "
        "a score threshold and class-wise NMS), `model.pt` (PyTorch state dict), `student.json` (configuration).",
        f"- Serve it: `prelabel serve --detector student:{directory}`.", "",
        "## Classes", "",
        "| class | train objects | val objects | AP | AP50 | teacher AP | teacher AP50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in config.classes:
        s = student["per_label"].get(name, {})
        t = (teacher.get("per_label") or {}).get(name, {})
        lines.append(f"| {name} | {data['train_objects'].get(name, 0)} | {data['val_objects'].get(name, 0)} | "
                     f"{_cell(s.get('ap', -1.0))} | {_cell(s.get('ap50', -1.0))} | {_cell(t.get('ap', -1.0))} | "
                     f"{_cell(t.get('ap50', -1.0))} |")
    lines += [
        "", "## Data",
        f"- {data['train_images']} training images ({data['accepted_prediction_images']} of them labelled by accepted "
        f"predictions), {data['val_images']} validation images (human annotations only); split seed {data['seed']}, "
        f"class-stratified, validation fraction {data['val_fraction']}.", "",
        "## Metrics (held-out validation split, COCO, pycocotools)", "",
        "| model | mAP@[.5:.95] | mAP@0.5 | images |", "|---|---|---|---|",
        f"| student | {_cell(student['map'])} | {_cell(student['map50'])} | {student['images']} |",
    ]
    if teacher:
        name = (f"teacher `{teacher['model_id']}` ({teacher.get('model_version')}, run now)" if teacher.get("model_id")
                else f"teacher ({teacher.get('model_version') or 'stored predictions'})")
        lines.append(f"| {name} | {_cell(teacher['map'])} | {_cell(teacher['map50'])} | {teacher['images']} |")
    else:
        lines.append("| teacher | n/a | n/a | no stored teacher predictions on the validation images |")
    lines += _operating_lines(directory, student)
    training = report["training"]
    lines += [
        "", "## Training",
        f"- {training['epochs_run']} epochs ({training['stopped']}), best at epoch {training['best_epoch']}, "
        f"{training['seconds']:.0f} s on {training['device']}.", "",
        "## Speed (seconds per image, this machine)", "", "| runtime | device | batch | s / image |", "|---|---|---|---|",
    ]
    lines += [f"| {r['runtime']} | {r['device']} | {r['batch']} | {r['s_per_image']:.4f} |" for r in report.get("speed", [])]
    parity = report.get("onnx_parity") or {}
    if parity:
        lines += ["", f"ONNX Runtime vs PyTorch: scores within {parity['max_abs_diff_scores']:.2g}, boxes within "
                  f"{parity['max_abs_diff_boxes_relative']:.2g} of the input size (tolerance {parity['atol']})."]
    lines += ["", "## License", "", f"{LICENSE}.", ""]
    path = directory / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
