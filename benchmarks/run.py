"""`python -m benchmarks.run [--out PATH] [--quick | --smoke]`: server overhead, cached clicks and memory, measured in
one run on full-size Grounding DINO-T + SAM ViT-B (random weights) on this machine (`--smoke`: the same run on tiny
models and small images, in seconds). See benchmarks/README.md."""

from __future__ import annotations

import argparse
import base64
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may be downloaded

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ml_backend.media import decode_image  # noqa: E402
from ml_backend.labelstudio.config import parse_config  # noqa: E402
from ml_backend.labelstudio.convert import detections_to_results  # noqa: E402
from ml_backend.engine import Engine  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402

from .harness import (  # noqa: E402
    SMOKE_HELP, BackendProcess, ImageHost, exit_status, import_rss, make_image, proc_rss, result_path,
)
from .models import weight_bytes, write_models  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "results" / ".cache"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/><Label value="Person"/></KeyPointLabels>
</View>"""
# Random weights score every query alike: thresholds 0 and a cap give the same, realistic number of boxes each time.
BOXES = 8
IMAGE_WH = (1200, 800)
SMOKE_IMAGE_WH = (160, 120)
PROMPTS = f"box_threshold: 0.0\ntext_threshold: 0.0\nmax_detections: {BOXES}\n"
FIRST_CLICK = (50.0, 50.0)
CACHED_CLICKS = ((30.0, 40.0), (70.0, 60.0))
TARGETS = {"predict_vs_bare": 1.05, "cached_vs_first_click": 0.05, "peak_rss_vs_weights": 1.6,
           "cvat_cached_vs_first_click": 0.25}
SERVER_STACK = "ml_backend.labelstudio.server, ml_backend.models.grounding_dino, ml_backend.models.sam, uvicorn"

console = Console()


@dataclass
class Run:
    client: httpx.Client
    server: BackendProcess
    host: ImageHost
    pipeline: Engine
    image_wh: tuple[int, int] = IMAGE_WH


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def task(run: Run, image: Path, context: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "tasks": [{"id": 1, "data": {"image": f"{run.host.url}/{image.name}"}}],
        "label_config": LABEL_CONFIG,
        "project": "1.1700000000",
    }
    if context:
        body["params"] = {"context": context}
    return body


def post_predict(run: Run, body: dict) -> tuple[float, dict]:
    seconds, response = timed(lambda: run.client.post(f"{run.server.url}/predict", json=body))
    response.raise_for_status()
    (entry,) = response.json()["results"]
    if "error" in entry:
        raise RuntimeError(f"/predict failed: {entry['error']}")
    return seconds, entry


def click(run: Run, image: Path, xy: tuple[float, float]) -> float:
    region = {
        "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": run.image_wh[0],
        "original_height": run.image_wh[1], "is_positive": True, "value": {"x": xy[0], "y": xy[1], "keypointlabels": ["Car"]},
    }
    return post_predict(run, task(run, image, {"result": [region]}))[0]


def bench_predict(run: Run, images: list[Path]) -> dict:
    """Per image (the first is a warm-up): /predict over HTTP, and the bare detector + segmenter on the decoded
    image, in alternating order so that drift favours neither."""
    config = parse_config(LABEL_CONFIG)
    ontology = config.ontology(run.pipeline.prompts, run.pipeline.settings.max_detections)
    rows: list[dict] = []
    for i, path in enumerate(images):
        image = decode_image(path.read_bytes(), path.name, run.pipeline.settings.max_image_pixels).array

        def bare() -> dict:
            det_s, det = timed(lambda: run.pipeline.detector.detect([image], ontology)[0])
            seg_s, (masks, _) = timed(lambda: run.pipeline.segmenter.segment(image, boxes=det.xyxy))
            det.mask = masks
            convert_s, _ = timed(lambda: detections_to_results(det, config.controls, image.shape[1], image.shape[0]))
            return {"bare_detect_s": det_s, "bare_segment_s": seg_s, "bare_s": det_s + seg_s,
                    "bare_boxes": len(det), "convert_s": convert_s}

        def served() -> dict:
            seconds, entry = post_predict(run, task(run, path))
            boxes = sum(r["type"] == "rectanglelabels" for r in entry["result"])
            return {"server_s": seconds, "server_boxes": boxes, "response_bytes": len(json.dumps(entry))}

        row = {}
        for part in (served, bare) if i % 2 == 0 else (bare, served):
            row |= part()
        if row["server_boxes"] != row["bare_boxes"]:
            raise RuntimeError(f"server found {row['server_boxes']} boxes, bare models {row['bare_boxes']}: not the same work")
        console.log(f"predict {'warm-up' if i == 0 else i}: server {row['server_s']:.2f} s, bare {row['bare_s']:.2f} s "
                    f"(detect {row['bare_detect_s']:.2f} + segment {row['bare_segment_s']:.2f}), {row['bare_boxes']} boxes")
        rows.append(row)
    measured = [r | {"ratio": r["server_s"] / r["bare_s"]} for r in rows[1:]]
    return {"warmup": rows[0]} | {key: [r[key] for r in measured] for key in measured[0]}


def bench_clicks(run: Run, warm_image: Path, images: list[Path]) -> dict:
    """A warm-up click on an image whose embedding is cached, then per fresh image: one first click (encoder +
    decoder) and further clicks that hit the embedding cache (decoder only)."""
    warmup = click(run, warm_image, CACHED_CLICKS[0])
    first, cached = [], []
    for path in images:
        first.append(click(run, path, FIRST_CLICK))
        cached += [click(run, path, xy) for xy in CACHED_CLICKS]
        console.log(f"click {path.name}: first {first[-1]:.2f} s, cached {', '.join(f'{s:.3f}' for s in cached[-len(CACHED_CLICKS):])} s")
    return {"warmup_s": warmup, "first_s": first, "cached_s": cached}


def bench_cvat_clicks(segmenter: Path, images: list[Path]) -> dict:
    """The CVAT nuclio interactor (cvat_nuclio/sam/main.py through nuclio's platform), CVAT's body as its lambda
    manager sends it: per fresh image, a first click (base64 decode + encoder + decoder + full-size mask JSON) and
    further clicks on the same image, which reuse the cached embedding."""
    from nuclio_sdk import Event
    from nuclio_sdk.test import Platform

    os.environ |= {"PRELABEL_SEGMENTER": str(segmenter), "PRELABEL_EMBEDDING_CACHE_SIZE": "8"}
    spec = importlib.util.spec_from_file_location("cvat_sam_main", HERE.parent / "cvat_nuclio" / "sam" / "main.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # nuclio finds init_context there
    spec.loader.exec_module(module)
    platform_, first, cached = Platform(), [], []

    def call(image: str, xy) -> float:
        event = Event(body={"image": image, "pos_points": [list(xy)], "neg_points": []}, content_type="application/json")
        seconds, response = timed(lambda: platform_.call_handler(module.handler, event))
        if response.status_code != 200:
            raise RuntimeError(f"CVAT interactor answered {response.status_code}: {response.body}")
        return seconds

    body = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
    call(body(images[-1]), FIRST_CLICK)  # warm-up, and init_context loads the model
    for path in images[:-1]:
        image = body(path)
        first.append(call(image, FIRST_CLICK))
        cached += [call(image, xy) for xy in CACHED_CLICKS]
        console.log(f"CVAT click {path.name}: first {first[-1]:.2f} s, cached {', '.join(f'{s:.3f}' for s in cached[-len(CACHED_CLICKS):])} s")
    return {"first_s": first, "cached_s": cached}


def ratio(name: str, value: float, measured: str) -> dict:
    return {"value": value, "target": TARGETS[name], "pass": value <= TARGETS[name], "measured": measured}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {
        "cpu_count": os.cpu_count(), "cpu_model": model or platform.processor(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
    }


def measure(repeats: int, smoke: bool = False) -> dict:
    root, image_wh = (CACHE / "smoke", SMOKE_IMAGE_WH) if smoke else (CACHE, IMAGE_WH)
    if smoke:
        from ml_backend.models.tiny import write_tiny_models

        models = write_tiny_models(root / "models")  # seconds, rewritten every run
    else:
        models = write_models(CACHE / "models")
    prompts = root / "prompts.yaml"
    prompts.write_text(PROMPTS)
    # distinct images: neither side's embedding cache may hit (both processes start empty each run)
    predict_images = [make_image(root / "images" / f"predict-{i}.jpg", seed=i, size=image_wh) for i in range(repeats + 1)]
    click_images = [make_image(root / "images" / f"click-{i}.jpg", seed=100 + i, size=image_wh) for i in range(repeats)]
    baseline = {"torch_transformers": import_rss("torch, transformers"), "server_stack": import_rss(SERVER_STACK)}
    settings = dict(detector=str(models["detector"]), segmenter=str(models["segmenter"]), prompts=prompts,
                    model_dir=root / "model-dir", embedding_cache_size=8)
    # the image host is on loopback, which the server's SSRF guard refuses unless the host is allowed by name
    env = {"HF_HUB_OFFLINE": "1", "MODEL_DIR": str(settings["model_dir"]), "PRELABEL_EMBEDDING_CACHE_SIZE": "8",
           "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", "PRELABEL_ALLOWED_HOSTS": "127.0.0.1"}
    args = ["--detector", settings["detector"], "--segmenter", settings["segmenter"], "--prompts", str(prompts)]
    host = ImageHost(root / "images")
    server = BackendProcess(args, env, root / "server.log")
    rss: dict[str, dict] = {}
    try:
        with httpx.Client(timeout=600) as client:
            pipeline = Engine.from_settings(Settings(**settings))  # bare models, loaded while the server loads its own
            run = Run(client, server, host, pipeline, image_wh)
            server.wait_ready(client)
            rss["loaded"] = proc_rss(server.proc.pid)
            predict = bench_predict(run, predict_images)
            rss["after_predict"] = proc_rss(server.proc.pid)
            clicks = bench_clicks(run, predict_images[0], click_images)
            rss["after_clicks"] = proc_rss(server.proc.pid)
            metrics = client.get(f"{server.url}/metrics").json()
    finally:
        server.stop()
        host.close()
    cvat_clicks = bench_cvat_clicks(models["segmenter"], click_images)
    weights = {"detector": weight_bytes(pipeline.detector.model), "segmenter": weight_bytes(pipeline.segmenter.model)}
    weights["total"] = sum(weights.values())
    cache = metrics.get("embedding_cache", {})
    expected_cache = {"misses": len(predict_images) + len(click_images), "hits": 1 + len(click_images) * len(CACHED_CLICKS)}
    return {
        "predict": predict,
        "click": clicks,
        "cvat_click": cvat_clicks,
        "memory": {"weights_bytes": weights, "baseline_rss": baseline, "server_rss": rss, "server_metrics": metrics["memory"]},
        "embedding_cache": cache | {"expected": expected_cache,
                                    "as_expected": all(cache.get(k) == v for k, v in expected_cache.items())},
    }


def ratios(result: dict) -> dict:
    predict, clicks, memory = result["predict"], result["click"], result["memory"]
    server, bare = statistics.median(predict["server_s"]), statistics.median(predict["bare_s"])
    first, cached = statistics.median(clicks["first_s"]), statistics.median(clicks["cached_s"])
    peak, weights = memory["server_metrics"]["peak_rss_bytes"], memory["weights_bytes"]["total"]
    cvat_first, cvat_cached = statistics.median(result["cvat_click"]["first_s"]), statistics.median(result["cvat_click"]["cached_s"])
    return {
        "predict_vs_bare": ratio("predict_vs_bare", server / bare, f"/predict {server:.2f} s vs bare {bare:.2f} s"),
        "cached_vs_first_click": ratio("cached_vs_first_click", cached / first, f"cached {cached:.3f} s vs first {first:.2f} s"),
        "peak_rss_vs_weights": ratio("peak_rss_vs_weights", peak / weights, f"peak RSS {gib(peak)} vs fp32 weights {gib(weights)}"),
        "cvat_cached_vs_first_click": ratio("cvat_cached_vs_first_click", cvat_cached / cvat_first,
                                            f"CVAT cached {cvat_cached:.3f} s vs first {cvat_first:.2f} s"),
    }


def diagnostics(result: dict) -> dict:
    """Where the time and memory go, to read the ratios by."""
    p, memory = result["predict"], result["memory"]
    median = {key: statistics.median(p[key]) for key in ("server_s", "bare_s", "bare_detect_s", "bare_segment_s", "convert_s")}
    weights, imports = memory["weights_bytes"]["total"], memory["baseline_rss"]["server_stack"]["VmRSS"]
    return {
        "predict_median_s": median,
        "predict_ratio_median_of_pairs": statistics.median(p["ratio"]),
        "predict_server_overhead_s": median["server_s"] - median["bare_s"],
        # the Label Studio JSON (brush RLE) of the same boxes and masks, timed in this process: part of the overhead
        "predict_vs_bare_without_conversion": (median["server_s"] - median["convert_s"]) / median["bare_s"],
        "predict_response_bytes": statistics.median(p["response_bytes"]),
        "server_imports_vs_weights": imports / weights,
        # what the models and their activations add to the bare interpreter with the server's imports
        "peak_rss_minus_imports_vs_weights": (memory["server_metrics"]["peak_rss_bytes"] - imports) / weights,
    }


def report(result: dict) -> None:
    table = Table(title=f"prelabel benchmarks ({result['machine']['cpu_count']} CPUs, torch {result['machine']['torch']})")
    for column in ("ratio", "measured", "value", "target", "result"):
        table.add_column(column)
    for name, r in result["ratios"].items():
        verdict = "[green]pass[/]" if r["pass"] else "[red]FAIL[/]"
        table.add_row(name, r["measured"], f"{r['value']:.3f}", f"<= {r['target']}", verdict)
    console.print(table)
    memory = result["memory"]
    rows = {f"import {k}": v for k, v in memory["baseline_rss"].items()} | {f"server {k}": v for k, v in memory["server_rss"].items()}
    breakdown = Table(title="RSS breakdown (from /proc/<pid>/status)")
    for column in ("process", "VmRSS", "VmHWM (peak)", "RssAnon", "RssFile"):
        breakdown.add_column(column)
    for name, values in rows.items():
        breakdown.add_row(name, *(gib(values.get(k, 0)) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")))
    console.print(breakdown)
    d, median = result["diagnostics"], result["diagnostics"]["predict_median_s"]
    console.print(
        f"bare: detect {median['bare_detect_s']:.2f} s + segment {median['bare_segment_s']:.2f} s ({BOXES} boxes); "
        f"server overhead {d['predict_server_overhead_s']:.2f} s, of which Label Studio JSON conversion "
        f"{median['convert_s']:.2f} s ({d['predict_response_bytes'] / 2**20:.1f} MiB response); ratio without it "
        f"{d['predict_vs_bare_without_conversion']:.3f}, median of per-image ratios {d['predict_ratio_median_of_pairs']:.3f}\n"
        f"weights: detector {gib(memory['weights_bytes']['detector'])} + segmenter {gib(memory['weights_bytes']['segmenter'])}; "
        f"server imports alone = {d['server_imports_vs_weights']:.2f} x weights, peak minus imports = "
        f"{d['peak_rss_minus_imports_vs_weights']:.2f} x weights; "
        f"embedding cache as expected: {result['embedding_cache']['as_expected']}; total {result['total_s']:.0f} s"
    )


def json_dump(value: Any) -> str:
    return json.dumps(value, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--out", type=Path, help="default: results/latest.json (results/smoke/latest.json with --smoke)")
    parser.add_argument("--quick", action="store_true", help="two measured repeats instead of four")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    out = args.out or result_path("latest.json", args.smoke)
    start = time.perf_counter()
    repeats = 2 if args.quick or args.smoke else 4  # even: the alternating server/bare order is balanced
    models = ({"detector": "tiny random Grounding DINO (ml_backend.models.tiny)", "segmenter": "tiny random SAM"}
              if args.smoke else {"detector": "GroundingDinoConfig() (Swin-T + BERT-base), random weights",
                                  "segmenter": "SamConfig() (ViT-B), random weights"})
    result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(),
              "setup": {"smoke": args.smoke, "repeats": repeats, "image_wh": SMOKE_IMAGE_WH if args.smoke else IMAGE_WH,
                        "boxes": BOXES, "label_config": LABEL_CONFIG} | models}
    result |= measure(repeats, args.smoke)
    result["ratios"] = ratios(result)
    result["diagnostics"] = diagnostics(result)
    result["total_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_dump(result))
    report(result)
    if args.smoke:
        console.print("smoke run on tiny models: the ratios are not judged against their targets")
    console.print(f"wrote {out}")
    return exit_status(all(r["pass"] for r in result["ratios"].values()), args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
