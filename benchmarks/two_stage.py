"""`python -m benchmarks.two_stage [--out PATH] [--images N] [--boxes N] [--full-size | --detector REF --classifier REF | --smoke]`:
what does classifying every detected box (two-stage: `RectangleLabels` + `<Choices perRegion="true">`) cost on top
of detection alone? Measured in one run, on the same decoded images, through `LabelStudioBackend.infer` (what
`/predict` runs after fetching):

- `two_stage_vs_detector_only`: two-stage time ÷ detector-only time (medians, order alternated);
- `classifier_forwards_per_batch`: image forwards of the classifier per batch of tasks (all crops of all images of a
  batch go in one forward: ceil(crops / PRELABEL_CLASSIFIER_BATCH_SIZE), 1 by default), against the N calls a
  per-box loop would make;
- `batched_vs_per_box_classifier`: the batched crop classification ÷ the same crops classified one call per box.

Tiny random models by default (seconds; shows the call structure); `--full-size` writes Grounding DINO-T and CLIP
ViT-B/32 with random weights (timings like trained ones) to benchmarks/results/.cache; `--detector`/`--classifier`
take real models (local directories or cached hub ids; nothing is downloaded). `--smoke`: the tiny models on 2 small
images, one repeat (the forwards-per-batch and regions checks still decide the exit status)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may be downloaded

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ml_backend.media import decode_image  # noqa: E402
from ml_backend.labelstudio.backend import LabelStudioBackend, LoadedTasks  # noqa: E402
from ml_backend.labelstudio.config import parse_config  # noqa: E402
from ml_backend.engine import Engine
from ml_backend.types import crop  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402

from .harness import SMOKE_HELP, make_image, result_path  # noqa: E402
from .run import CACHE, machine  # noqa: E402

DETECT = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Product"/></RectangleLabels></View>"""
TWO_STAGE = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Product"/></RectangleLabels>
<Choices name="brand" toName="image" perRegion="true">
  <Choice value="Cola"/><Choice value="Pepsi"/><Choice value="Fanta"/><Choice value="Other"/>
</Choices></View>"""
PROMPTS = """box_threshold: 0.0      # random weights score every query alike: threshold 0 and a cap give N boxes
text_threshold: 0.0
nms_iou: 1.0
max_detections: {boxes}
templates: ["a photo of a {{}}", "a close-up photo of a {{}}"]
labels:
  Product: [bottle, can]
  Cola: [red soda can, cola bottle]
  Pepsi: [blue soda can]
"""

console = Console()


def write_full_size_clip(out: Path) -> Path:
    """CLIP ViT-B/32 (`CLIPConfig()` defaults, 224 px) with random weights and the tiny WordPiece tokenizer."""
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ml_backend.models.tiny import write_vocab

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = BertTokenizerFast(vocab=str(write_vocab(Path(tmp) / "vocab.txt")), do_lower_case=True)
    config = CLIPConfig(text_config={"eos_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
                                     "pad_token_id": tokenizer.pad_token_id})
    CLIPModel(config).eval().save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    (out / ".complete").touch()
    return out


def model_refs(args, tmp: Path) -> tuple[str, str, str]:
    """(detector, classifier, what they are)."""
    if args.detector or args.classifier:
        if not (args.detector and args.classifier):
            raise SystemExit("--detector and --classifier go together")
        return args.detector, args.classifier, "given"
    if args.full_size:
        from .models import write_detector

        return (str(write_detector(CACHE / "models" / "grounding-dino-t")),
                str(write_full_size_clip(CACHE / "models" / "clip-vit-b-32")), "full-size, random weights")
    from ml_backend.models.tiny import write_tiny_classifier, write_tiny_detector

    return str(write_tiny_detector(tmp / "detector")), str(write_tiny_classifier(tmp / "clip")), "tiny, random weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.two_stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: results/two_stage[-full].json")
    parser.add_argument("--images", type=int, default=4, help="tasks in the batch (one image each)")
    parser.add_argument("--boxes", type=int, default=8, help="boxes per image (the tiny detector has 10 queries)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--full-size", action="store_true", help="Grounding DINO-T + CLIP ViT-B/32, random weights")
    parser.add_argument("--detector", help="a real detector: local directory or cached hub id")
    parser.add_argument("--classifier", help="a real CLIP/SigLIP: local directory or cached hub id")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        if args.full_size or args.detector or args.classifier:
            raise SystemExit("--smoke runs the tiny models: not with --full-size, --detector or --classifier")
        args.images, args.boxes, args.repeats, args.size = 2, 4, 1, (160, 120)
    out = args.out or result_path("two_stage-full.json" if args.full_size or args.detector else "two_stage.json",
                                  args.smoke)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prelabel-two-stage-") as tmp:
        tmp = Path(tmp)
        detector, classifier, kind = model_refs(args, tmp)
        prompts = tmp / "prompts.yaml"
        prompts.write_text(PROMPTS.format(boxes=args.boxes))
        settings = Settings(detector=detector, segmenter="", classifier=classifier, prompts=prompts,
                            model_dir=CACHE / "model-dir", batch_size=args.images, device=args.device)
        pipeline = Engine.from_settings(settings)
        backend = LabelStudioBackend.for_batch(pipeline)
        folder = tmp / "images"
        paths = [make_image(folder / f"two-stage-{i}.jpg", seed=300 + i, size=tuple(args.size)) for i in range(args.images)]
        images = [decode_image(p.read_bytes(), p.name, settings.max_image_pixels) for p in paths]
        tasks = [{"id": i + 1, "data": {"image": p.name}} for i, p in enumerate(paths)]

        def batch() -> LoadedTasks:
            return LoadedTasks(tasks, [None] * len(tasks), [(i, "image", img) for i, img in enumerate(images)])

        configs = {name: parse_config(xml) for name, xml in (("detector_only", DETECT), ("two_stage", TWO_STAGE))}
        ontology = backend.ontology_for(configs["two_stage"])
        versions = {name: backend.version_for(c, ontology) for name, c in configs.items()}
        classify = pipeline.classifier

        def run(name: str) -> tuple[float, list[dict], int]:
            calls = classify.forward_calls["image"]
            start = time.perf_counter()
            entries = backend.infer(batch(), configs[name], ontology, versions[name])
            return time.perf_counter() - start, entries, classify.forward_calls["image"] - calls

        for name in configs:  # warm-up (and the text embeddings, computed once and cached)
            run(name)
        times: dict[str, list[float]] = {"detector_only": [], "two_stage": []}
        forwards, regions = [], 0
        for r in range(args.repeats):
            for name in (("detector_only", "two_stage") if r % 2 == 0 else ("two_stage", "detector_only")):
                seconds, entries, calls = run(name)
                times[name].append(seconds)
                if name == "two_stage":
                    forwards.append(calls)
                    regions = sum(1 for e in entries for x in e["result"] if x["type"] == "choices")
        boxes = sum(1 for e in run("detector_only")[1] for x in e["result"] if x["type"] == "rectanglelabels")

        # the same crops, batched (what two-stage does) vs one classifier call per box (what it avoids)
        detections = pipeline.detect([img.array for img in images], ontology)
        crops = [crop(img.array, xyxy) for img, det in zip(images, detections) for xyxy in det.xyxy]
        per_box_s, batched_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            classify.embed_images(crops)
            batched_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for one in crops:
                classify.embed_images([one])
            per_box_s.append(time.perf_counter() - start)

    detector_s, two_stage_s = statistics.median(times["detector_only"]), statistics.median(times["two_stage"])
    expected_forwards = math.ceil(len(crops) / settings.classifier_batch_size)
    result = {
        "ratios": {
            "two_stage_vs_detector_only": round(two_stage_s / detector_s, 3),
            "batched_vs_per_box_classifier": round(statistics.median(batched_s) / statistics.median(per_box_s), 3),
        },
        "classifier_forwards_per_batch": max(forwards),
        "classifier_forwards_expected": expected_forwards,
        "per_box_classifier_calls_avoided": len(crops),
        "boxes": boxes,
        "per_region_choices": regions,
        "images": args.images,
        "smoke": args.smoke,
        "device": str(pipeline.classifier.device),
        "image_wh": list(args.size),
        "classifier_batch_size": settings.classifier_batch_size,
        "seconds": {
            "detector_only": times["detector_only"], "two_stage": times["two_stage"],
            "crops_batched": batched_s, "crops_per_box": per_box_s,
        },
        "models": {"detector": detector if kind == "given" else Path(detector).name,
                   "classifier": classifier if kind == "given" else Path(classifier).name, "kind": kind},
        "passed": max(forwards) == expected_forwards and regions == boxes,
        "machine": machine(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    table = Table(title=f"two-stage on {args.images} images x {args.boxes} boxes ({kind})")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("two-stage ÷ detector-only", f"{result['ratios']['two_stage_vs_detector_only']:.3f} "
                  f"({two_stage_s:.3f} s vs {detector_s:.3f} s)")
    table.add_row("classifier forwards per batch", f"{max(forwards)} for {len(crops)} boxes (expected {expected_forwards})")
    table.add_row("batched ÷ per-box classifier", f"{result['ratios']['batched_vs_per_box_classifier']:.3f}")
    table.add_row("per-region choices / boxes", f"{regions} / {boxes}")
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
