"""`python -m benchmarks.ray_scaling [--out PATH] [--smoke]`: throughput of the Ray engine with 2 actors ÷ 1 actor, each actor
pinned to one CPU (one torch thread), on the same images, measured in one run on a local Ray: 1, 2, 1, 2 actors,
the best throughput of each (what other processes on the machine took away shows as a lower one).

The engine is called directly (no Label Studio): images are files read from disk as local-files refs, the sink
discards. The model is a mid-size random-weight Grounding DINO (written offline, once) on which compute dominates the
per-image overhead. Actor start-up and model loading are left out: throughput is taken between sinks once every
actor has returned its first batch (see `steady_throughput`). `--smoke`: the same runs on the tiny detector, 12 small
images in batches of 2, one repeat (seconds once Ray is up)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

from .run import machine  # sets HF_HUB_OFFLINE before transformers is imported

import ray  # noqa: E402

from ml_backend.engines.ray_engine import ray_engine  # noqa: E402
from ml_backend.labelstudio.annotate import TaskPredictor, local_files_ref  # noqa: E402
from ml_backend.labelstudio.backend import LabelStudioBackend  # noqa: E402
from ml_backend.labelstudio.config import parse_config  # noqa: E402
from ml_backend.engine import Engine  # noqa: E402
from ml_backend.runner import Report  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402

from .harness import SMOKE_HELP, exit_status, make_image, result_path  # noqa: E402
from .models import write_detector  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "results" / ".cache"
TARGET = 1.7
IMAGES, BATCH, IMAGE_WH, REPEATS = 48, 4, (640, 480), 2
SMOKE = {"images": 12, "batch": 2, "image_wh": (160, 120), "repeats": 1}
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
</View>"""
PROMPTS = "box_threshold: 0.0\ntext_threshold: 0.0\nmax_detections: 8\n"  # same number of boxes on random weights


def write_mid_detector(out: Path, embed_dim: int = 64, d_model: int = 128, short_edge: int = 384,
                       long_edge: int = 512, seed: int = 0) -> Path:
    """A scaled-down Grounding DINO (Swin with `embed_dim`, 2-layer BERT, 3+3 transformer layers of `d_model`), random
    weights, images resized to `short_edge`/`long_edge`: ~13 M parameters, ~0.75 s per 640x480 image on one thread."""
    from transformers import GroundingDinoConfig, SwinConfig

    def config(tokenizer):
        backbone = SwinConfig(window_size=7, embed_dim=embed_dim, depths=[2, 2, 2, 2],
                              num_heads=[embed_dim // 32 * k for k in (1, 2, 4, 8)],
                              out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])
        text = dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=512, max_position_embeddings=256)
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text, d_model=d_model, encoder_layers=3, decoder_layers=3,
            encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=4 * d_model,
            decoder_ffn_dim=4 * d_model, num_queries=100, num_feature_levels=4,
        )

    return write_detector(out, seed, config, {"shortest_edge": short_edge, "longest_edge": long_edge})


def steady_throughput(sinks: list[tuple[float, int]], actors: int) -> tuple[float, int, float]:
    """(images/s, images, seconds) between the `actors`-th sink (every actor warm, in steady state) and the last sink
    a whole number of rounds (`actors` batches) later."""
    start = actors - 1
    end = start + (len(sinks) - 1 - start) // actors * actors
    if end <= start:
        raise SystemExit(f"too few batches ({len(sinks)}) to measure {actors} actors: raise IMAGES")
    images = sum(n for _, n in sinks[start + 1 : end + 1])
    seconds = sinks[end][0] - sinks[start][0]
    return images / seconds, images, seconds


def run_engine(settings: Settings, tasks: list[dict], version: str, actors: int, batch: int = BATCH) -> dict:
    sinks: list[tuple[float, int]] = []  # (time, images) per sunk batch
    engine = ray_engine(partial(TaskPredictor, settings), actors=actors, cpus_per_actor=1, batch_size=batch)
    started = time.perf_counter()
    report = engine(tasks, CONFIG, lambda batch, _: sinks.append((time.perf_counter(), len(batch))),
                    Report(total=len(tasks), model_version=version))
    if report.failed or report.done != len(tasks):
        raise SystemExit(f"{actors} actor(s): {report.done} of {len(tasks)} done, failures: {report.failed[:3]}")
    rate, images, seconds = steady_throughput(sinks, actors)
    return {"actors": actors, "images_per_s": round(rate, 4), "measured_images": images,
            "measured_s": round(seconds, 3), "wall_s_with_startup": round(report.seconds, 3),
            "first_batch_s": round(sinks[0][0] - started, 3),
            "batch_done_s": [round(t - started, 3) for t, _ in sinks]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="default: results/ray_scaling.json (results/smoke/ with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    out = args.out or result_path("ray_scaling.json", args.smoke)
    images, batch, image_wh, repeats = (SMOKE[k] for k in ("images", "batch", "image_wh", "repeats")) if args.smoke \
        else (IMAGES, BATCH, IMAGE_WH, REPEATS)

    cache = CACHE / "smoke" if args.smoke else CACHE
    if args.smoke:
        from ml_backend.models.tiny import write_tiny_detector

        detector = write_tiny_detector(cache / "models" / "ray-detector")
    else:
        detector = write_mid_detector(CACHE / "models" / "grounding-dino-mid")
    root = cache / "ray-images"
    paths = [make_image(root / "set" / f"{i}.jpg", seed=i, size=image_wh) for i in range(images)]
    (cache / "ray-prompts.yaml").write_text(PROMPTS)
    settings = Settings(detector=str(detector), segmenter="", prompts=cache / "ray-prompts.yaml",
                        model_dir=cache / "model-dir", local_files_document_root=root, device="cpu")
    tasks = [{"id": i, "data": {"image": local_files_ref(p, root)}} for i, p in enumerate(paths)]
    backend = LabelStudioBackend.for_batch(Engine.from_settings(settings))
    config = parse_config(CONFIG)
    version = backend.version_for(config, backend.ontology_for(config))
    del backend  # the driver only needs the version

    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = [run_engine(settings, tasks, version, actors, batch) for _ in range(repeats) for actors in (1, 2)]
    finally:
        ray.shutdown()
    one, two = (max((r for r in runs if r["actors"] == n), key=lambda r: r["images_per_s"]) for n in (1, 2))
    ratio = two["images_per_s"] / one["images_per_s"]
    result = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ratio_2_vs_1_actor": round(ratio, 4), "target": TARGET, "pass": ratio >= TARGET,
        "best_images_per_s": {"1_actor": one["images_per_s"], "2_actors": two["images_per_s"]},
        "runs": runs,
        "setup": {"smoke": args.smoke, "images": images, "image_wh": image_wh, "batch_size": batch, "cpus_per_actor": 1,
                  "torch_threads_per_actor": 1, "ray_num_cpus": 2,
                  "detector": "tiny random Grounding DINO (ml_backend.models.tiny)" if args.smoke
                              else "write_mid_detector() defaults",
                  "image_source": "JPEG files read as /data/local-files/ refs below LOCAL_FILES_DOCUMENT_ROOT"},
        "method": "images/s between sinks, from the sink by which every actor has returned one batch (start-up, "
                  "model loading and the first inference left out) to the last sink a whole number of rounds later; "
                  "runs of 1, 2, 1, 2 actors on one local Ray, same images; ratio of the best run of each",
        "machine": machine() | {"loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "note": "Ray runs its workers at nice 15, so any other busy process takes CPU from the actors first, and "
                "from a 2-actor run more than from a 1-actor run: with a load average above ~0.3 before or during "
                "the run, rerun on a quiet machine",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"1 actor {one['images_per_s']:.3f} img/s, 2 actors {two['images_per_s']:.3f} img/s: "
          f"ratio {ratio:.2f} (target >= {TARGET}) -> {'pass' if result['pass'] else 'MISS'}; {out}"
          + ("; smoke run on a tiny model: the ratio is not judged" if args.smoke else ""))
    return exit_status(result["pass"], args.smoke)


if __name__ == "__main__":
    sys.exit(main())
