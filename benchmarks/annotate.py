"""`python -m benchmarks.annotate [--out PATH] [--images N] [--batch-size B] [--smoke]`: does `prelabel annotate`'s pipeline
hide image I/O behind the model? Throughput of the pipeline (HTTP fetch and decode of the next batches in background
threads, batched detection, Label Studio JSON) ÷ the bare detector on the same, already decoded images at the same
batch size, measured in one run on full-size Grounding DINO-T (random weights). Target >= 0.95."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from rich.console import Console  # noqa: E402

from ml_backend.media import decode_image  # noqa: E402
from ml_backend.labelstudio.backend import LabelStudioBackend  # noqa: E402
from ml_backend.labelstudio.config import parse_config  # noqa: E402
from ml_backend.engine import Engine  # noqa: E402
from ml_backend.runner import Report, chunks, run_batches  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402

from .harness import SMOKE_HELP, ImageHost, exit_status, make_image, result_path  # noqa: E402
from .models import write_detector  # noqa: E402
from .run import CACHE, IMAGE_WH, PROMPTS, SMOKE_IMAGE_WH, machine  # noqa: E402

TARGET = 0.95
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels></View>"""

console = Console()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.annotate", description=__doc__)
    parser.add_argument("--out", type=Path, help="default: results/annotate.json (results/smoke/ with --smoke)")
    parser.add_argument("--images", type=int, default=4, help="images per pass (two passes of each side)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    out = args.out or result_path("annotate.json", args.smoke)
    started = time.perf_counter()
    root, image_wh = (CACHE / "smoke", SMOKE_IMAGE_WH) if args.smoke else (CACHE, IMAGE_WH)
    if args.smoke:
        from ml_backend.models.tiny import write_tiny_detector

        detector = write_tiny_detector(root / "models" / "annotate-detector")
    else:
        detector = write_detector(CACHE / "models" / "grounding-dino-t")
    prompts = root / "prompts.yaml"
    prompts.write_text(PROMPTS)
    folder = root / "images"
    paths = [make_image(folder / f"annotate-{i}.jpg", seed=200 + i, size=image_wh) for i in range(args.images)]
    # the image host is on loopback, which the SSRF guard refuses unless the host is allowed by name
    settings = Settings(detector=str(detector), segmenter="", prompts=prompts, model_dir=root / "model-dir",
                        batch_size=args.batch_size, allowed_hosts=["127.0.0.1"])
    backend = LabelStudioBackend.for_batch(Engine.from_settings(settings))
    config = parse_config(CONFIG)
    ontology = backend.ontology_for(config)
    version = backend.version_for(config, ontology)
    host = ImageHost(folder)
    tasks = [{"id": i, "data": {"image": f"{host.url}/{p.name}"}} for i, p in enumerate(paths)]
    arrays = [decode_image(p.read_bytes(), p.name, settings.max_image_pixels).array for p in paths]

    def bare() -> float:
        start = time.perf_counter()
        for batch in chunks(arrays, args.batch_size):
            backend.engine.detect(batch, ontology)
        return time.perf_counter() - start

    def pipeline() -> float:
        report = Report(total=len(tasks))
        run_batches(chunks(tasks, args.batch_size), lambda t: backend.load_tasks(t, config),
                    lambda loaded: backend.infer(loaded, config, ontology, version), lambda t, e: None, report,
                    label="pipeline")
        if report.done != len(tasks):
            raise RuntimeError(f"pipeline failed: {report.failed}")
        return report.seconds

    try:
        backend.engine.detect(arrays[:1], ontology)  # warm-up
        runs = {"bare_s": [], "pipeline_s": []}
        for side in ("bare", "pipeline", "pipeline", "bare"):  # balanced order: drift favours neither
            seconds = bare() if side == "bare" else pipeline()
            runs[f"{side}_s"].append(seconds)
            console.log(f"{side}: {len(tasks)} images in {seconds:.2f} s ({len(tasks) / seconds:.3f} img/s)")
    finally:
        host.close()
    bare_s, pipe_s = statistics.mean(runs["bare_s"]), statistics.mean(runs["pipeline_s"])
    ratio = bare_s / pipe_s  # throughput ratio = inverse time ratio for the same images
    result = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "setup": {"smoke": args.smoke, "images": len(tasks), "image_wh": image_wh, "batch_size": args.batch_size,
                  "detector": "tiny random Grounding DINO (ml_backend.models.tiny)" if args.smoke else
                              "GroundingDinoConfig() (Swin-T + BERT-base), random weights",
                  "pipeline": "runner.run_batches: HTTP fetch + decode prefetched in threads, detect, Label Studio JSON",
                  "bare": "pipeline.detect on decoded arrays"},
        "runs": runs,
        "ratio": {"pipeline_vs_bare_throughput": ratio, "target": TARGET, "pass": ratio >= TARGET},
        "total_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    verdict = "[green]pass[/]" if ratio >= TARGET else "[red]FAIL[/]"
    console.print(f"pipeline ÷ bare throughput: {ratio:.3f} (target >= {TARGET}) {verdict}; "
                  f"bare {len(tasks) / bare_s:.3f} img/s, pipeline {len(tasks) / pipe_s:.3f} img/s; wrote {out}"
                  + ("; smoke run on a tiny model: the ratio is not judged" if args.smoke else ""))
    return exit_status(ratio >= TARGET, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
