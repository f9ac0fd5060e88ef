"""`python -m benchmarks.sam3 [--out PATH] [--repeats N] [--smoke]`: SAM 3 as the teacher, measured on this machine's
CPU with full-size SAM 3 (`Sam3VideoConfig()`, the architecture of `facebook/sam3`) with random weights, loaded by
`ml_backend.models.sam3.Sam3` from a saved directory as real weights are, on one 1200x800 image of 12 drawn shapes:

- `predict_vs_bare`: `/predict` of the real server over HTTP (a `RectangleLabels` + `BrushLabels` project, 2 labels:
  fetch, decode, concept queries, masks, Label Studio JSON) ÷ the bare SAM 3 forward on the same image and prompts
  (preprocessing, vision features once, one concept query per prompt on them, text features computed beforehand as
  the server keeps them; no post-processing); target <= 1.05;
- `sam3_vs_grounding_dino_sam`: `Sam3.detect` with masks per image ÷ Grounding DINO-T detect + SAM ViT-B masks for
  every box (random full-size `GroundingDinoConfig()` and `SamConfig()`, same image and prompts); reported, no target;
- `cached_vs_first_exemplar`: `Sam3.find_like` with a second exemplar box on the image ÷ the first one on it (which
  pays the vision encoder; the second hits the per-image cache); target <= 0.1.

One full-size model family in memory at a time (SAM 3 in the server and here, then Grounding DINO + SAM here).
`--smoke`: the same code on the tiny models and a 160x120 image, in seconds. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may be downloaded

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ml_backend.engine import Engine  # noqa: E402
from ml_backend.labelstudio.config import parse_config  # noqa: E402
from ml_backend.media import decode_image  # noqa: E402
from ml_backend.models.sam import EmbeddingCache  # noqa: E402
from ml_backend.ontology import PromptsFile  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402

from .harness import SMOKE_HELP, BackendProcess, ImageHost, exit_status, make_image, proc_rss, result_path  # noqa: E402
from .models import DONE, weight_bytes, write_models  # noqa: E402
from .run import CACHE, json_dump, machine, timed  # noqa: E402

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Person"/></BrushLabels>
</View>"""
LABELS = {"Car": ["car"], "Person": ["person"]}  # one concept query per prompt
BOXES = 8  # max_detections: the boxes kept per image, for both teachers
CANDIDATES = 16  # per label: SAM 3's threshold is set so that this many queries are candidates (full-size masks)
IMAGE_WH = (1200, 800)
SMOKE_IMAGE_WH = (160, 120)
# exemplar boxes, relative xyxy: the first one pays the encoder, the second (elsewhere) hits the cache
EXEMPLARS = ((0.10, 0.10, 0.30, 0.35), (0.55, 0.50, 0.80, 0.80))
TARGETS = {"predict_vs_bare": 1.05, "sam3_vs_grounding_dino_sam": None, "cached_vs_first_exemplar": 0.1}

console = Console()


def write_sam3(out: Path, seed: int = 0) -> Path:
    """SAM 3 as the hub's `facebook/sam3` is built: `Sam3VideoConfig()` defaults (the concept detector with its
    ~840M-parameter encoder at 1008 px, and the click tracker on the same backbone), random weights, the real image
    processor, and the character-level CLIP tokenizer of the tiny models (`clip_tokenizer`: 32 tokens, as SAM 3's
    text encoder takes; only the token ids in the text config change to the tokenizer's). About 3.4 GB, written once."""
    if (out / DONE).exists():
        return out
    from transformers import Sam3ImageProcessor, Sam3Processor, Sam3VideoConfig, Sam3VideoModel

    from ml_backend.models.tiny import clip_tokenizer

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer(32)
    config = Sam3VideoConfig()
    text = config.detector_config.text_config
    if text.max_position_embeddings != tokenizer.model_max_length:
        raise RuntimeError(f"SAM 3's text encoder takes {text.max_position_embeddings} tokens, the tokenizer "
                           f"{tokenizer.model_max_length}: {out} needs a matching tokenizer")
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    Sam3VideoModel(config).eval().save_pretrained(out)
    Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    (out / DONE).touch()
    return out


def prompts_yaml(thresholds: dict[str, float] | None = None) -> str:
    """The prompts file: per-label thresholds for SAM 3; none (0, every query a candidate, capped at BOXES) for
    Grounding DINO, as `benchmarks.run` does. No NMS (IoU 1): random weights predict near-identical boxes, which NMS
    would merge into one or two; every teacher keeps BOXES boxes, each with its mask, as on an image of 8+ objects."""
    labels = {name: {"prompts": prompts} | ({"threshold": thresholds[name]} if thresholds else {})
              for name, prompts in LABELS.items()}
    return yaml.safe_dump({"box_threshold": 0.0, "text_threshold": 0.0, "nms_iou": 1.0, "max_detections": BOXES,
                           "labels": labels})


class BareSam3:
    """The bare SAM 3 forward the server is measured against: the processor, `get_vision_features` once, then per
    prompt one `Sam3Model` call on those features, on text features computed once beforehand (the server keeps
    them too). No sigmoid, threshold, NMS or mask resizing."""

    def __init__(self, sam3, prompts: list[str]):
        self.sam3, self.prompts = sam3, prompts
        self.text = {}
        with torch.inference_mode():
            for prompt in prompts:
                tokens = sam3.processor(text=[prompt], return_tensors="pt")
                mask = tokens["attention_mask"]
                self.text[prompt] = (sam3.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=mask), mask)

    @torch.inference_mode()
    def vision(self, image: np.ndarray):
        pixels = self.sam3.processor(images=[image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        return self.sam3.model.get_vision_features(pixel_values=pixels)

    @torch.inference_mode()
    def query(self, vision, prompt: str):
        text, mask = self.text[prompt]
        return self.sam3.model(vision_embeds=vision, text_embeds=text, attention_mask=mask)

    def __call__(self, image: np.ndarray) -> dict:
        vision_s, vision = timed(lambda: self.vision(image))
        query_s = [timed(lambda: self.query(vision, p))[0] for p in self.prompts]
        return {"bare_s": vision_s + sum(query_s), "bare_vision_s": vision_s, "bare_query_s": query_s}

    def thresholds(self, image: np.ndarray, ontology) -> dict[str, float]:
        """Per label, a score between the CANDIDATES-th and the next query score of its prompts on `image`: random
        weights score every query alike, so a fixed threshold would make every query a candidate (200 full-size
        masks per prompt) or none; this gives a trained model's few candidates per label, the same each run."""
        vision = self.vision(image)
        scores = {}
        for prompt, label in ontology.prompts:
            out = self.query(vision, prompt)
            score = out.pred_logits.float().sigmoid()[0] * out.presence_logits.float().sigmoid()[0]
            scores.setdefault(ontology.labels[label].name, []).append(score)
        thresholds = {}
        for name, parts in scores.items():
            ranked = torch.cat(parts).sort(descending=True).values
            k = min(CANDIDATES, len(ranked) - 1)
            thresholds[name] = round(float(ranked[k - 1] + ranked[k]) / 2, 7)
        return thresholds


def counts(entry: dict) -> dict:
    return {kind: sum(r["type"] == kind for r in entry["result"]) for kind in ("rectanglelabels", "brushlabels")}


def bench_sam3(model: Path, image_path: Path, root: Path, repeats: int) -> dict:
    """/predict, the bare forward and `Sam3.detect` (alternating order), then exemplars; SAM 3 in the server and here."""
    image = decode_image(image_path.read_bytes(), image_path.name, 10**9).array
    config = parse_config(LABEL_CONFIG)
    engine = Engine.from_settings(Settings(detector=str(model), segmenter="", model_dir=root / "model-dir"))
    sam3 = engine.detector
    ontology = config.ontology(PromptsFile(labels=LABELS), BOXES)
    bare = BareSam3(sam3, [p for p, _ in ontology.prompts])
    thresholds = bare.thresholds(image, ontology)  # also this process's warm-up
    for prompt in bare.prompts:
        sam3._text(prompt)  # Sam3 keeps text features per prompt, as the server's warm-up request makes it do
    prompts = root / "prompts-sam3.yaml"
    prompts.write_text(prompts_yaml(thresholds))
    ontology = config.ontology(PromptsFile.load(prompts), BOXES)

    host = ImageHost(image_path.parent)
    env = {"HF_HUB_OFFLINE": "1", "MODEL_DIR": str(root / "model-dir"), "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "",
           "PRELABEL_ALLOWED_HOSTS": "127.0.0.1"}
    server = BackendProcess(["--detector", str(model), "--segmenter", "none", "--prompts", str(prompts)], env,
                            root / "server-sam3.log", start_timeout=900)
    body = {"tasks": [{"id": 1, "data": {"image": f"{host.url}/{image_path.name}"}}], "label_config": LABEL_CONFIG,
            "project": "1.1700000000"}
    rows, rss = [], {}
    try:
        with httpx.Client(timeout=3600) as client:
            server.wait_ready(client)

            def served() -> dict:
                seconds, response = timed(lambda: client.post(f"{server.url}/predict", json=body))
                response.raise_for_status()
                (entry,) = response.json()["results"]
                if "error" in entry:
                    raise RuntimeError(f"/predict failed: {entry['error']}")
                found = counts(entry)
                return {"server_s": seconds, "server_boxes": found["rectanglelabels"],
                        "server_brushes": found["brushlabels"], "response_bytes": len(response.content)}

            def detect() -> dict:
                seconds, (det,) = timed(lambda: sam3.detect([image], ontology, masks=True))
                return {"sam3_detect_s": seconds, "sam3_boxes": len(det), "sam3_masks": 0 if det.mask is None else len(det.mask)}

            warmup = served()  # the server's first request: its text features, first-touch of the weights
            console.log(f"SAM 3 /predict warm-up {warmup['server_s']:.1f} s, {warmup['server_boxes']} boxes")
            for i in range(repeats):
                row = {}
                for part in (served, lambda: bare(image), detect) if i % 2 == 0 else (detect, lambda: bare(image), served):
                    row |= part()
                if not (row["server_boxes"] == row["server_brushes"] == row["sam3_boxes"] == row["sam3_masks"] > 0):
                    raise RuntimeError(f"/predict gave {row['server_boxes']} boxes and {row['server_brushes']} brush "
                                       f"masks, Sam3.detect {row['sam3_boxes']} boxes and {row['sam3_masks']} masks: "
                                       f"not the same work")
                console.log(f"repeat {i + 1}: /predict {row['server_s']:.1f} s, bare {row['bare_s']:.1f} s (vision "
                            f"{row['bare_vision_s']:.1f} + queries {', '.join(f'{s:.1f}' for s in row['bare_query_s'])}), "
                            f"Sam3.detect {row['sam3_detect_s']:.1f} s; {row['sam3_boxes']} boxes")
                rows.append(row)
            rss["server"] = proc_rss(server.proc.pid)
    finally:
        server.stop()
        host.close()

    w, h = image.shape[1], image.shape[0]
    boxes = [np.array(b, np.float32) * [w, h, w, h] for b in EXEMPLARS]
    first_s, second_s, found = [], [], []
    for i in range(repeats):
        sam3.cache = EmbeddingCache(sam3.cache.size)  # a fresh cache: the first exemplar pays the encoder again
        for box, times in zip(boxes, (first_s, second_s)):
            seconds, det = timed(lambda: sam3.find_like(image, box[None], np.ones(1), threshold=0.0, max_detections=BOXES,
                                                         nms_iou=1.0))
            times.append(seconds)
            found.append(len(det))
        console.log(f"exemplars {i + 1}: first {first_s[-1]:.1f} s, second {second_s[-1]:.2f} s")
    if not all(found):
        raise RuntimeError(f"find_like found {found} instances: none for some exemplar")
    rss["here"] = proc_rss(os.getpid())
    result = {
        "thresholds": thresholds,
        "predict_warmup": warmup,
        "predict": {key: [r[key] for r in rows] for key in rows[0]},
        "exemplar": {"first_s": first_s, "second_s": second_s, "found": found,
                     "boxes_xyxy": [[round(float(v), 1) for v in b] for b in boxes],
                     "cache": sam3.cache_info()},
        "weights_bytes": weight_bytes(sam3._video or sam3.model),
        "rss": rss,
    }
    return result  # and SAM 3 goes: main collects it before the next model loads


def bench_two_models(models: dict[str, Path], image_path: Path, root: Path, repeats: int) -> dict:
    """Grounding DINO-T detect + SAM-B masks for every box, on the same image and prompts (a warm-up first)."""
    image = decode_image(image_path.read_bytes(), image_path.name, 10**9).array
    prompts = root / "prompts-grounding-dino.yaml"
    prompts.write_text(prompts_yaml())
    engine = Engine.from_settings(Settings(detector=str(models["detector"]), segmenter=str(models["segmenter"]),
                                           prompts=prompts, model_dir=root / "model-dir", embedding_cache_size=0))
    ontology = parse_config(LABEL_CONFIG).ontology(engine.prompts, BOXES)

    def once() -> dict:
        detect_s, det = timed(lambda: engine.detector.detect([image], ontology)[0])
        segment_s, (masks, _) = timed(lambda: engine.segmenter.segment(image, boxes=det.xyxy))
        return {"detect_s": detect_s, "segment_s": segment_s, "s": detect_s + segment_s, "boxes": len(det), "masks": len(masks)}

    once()
    rows = []
    for i in range(repeats):
        rows.append(once())
        console.log(f"Grounding DINO + SAM {i + 1}: {rows[-1]['s']:.1f} s (detect {rows[-1]['detect_s']:.1f} + "
                    f"segment {rows[-1]['segment_s']:.1f}), {rows[-1]['boxes']} boxes")
    result = {key: [r[key] for r in rows] for key in rows[0]}
    result["weights_bytes"] = weight_bytes(engine.detector.model, engine.segmenter.model)
    result["rss_here"] = proc_rss(os.getpid())
    return result


def ratio(name: str, value: float, measured: str) -> dict:
    target = TARGETS[name]
    return {"value": value, "target": target, "pass": None if target is None else value <= target, "measured": measured}


def ratios(result: dict) -> dict:
    p, e, g = result["sam3"]["predict"], result["sam3"]["exemplar"], result["grounding_dino_sam"]
    server, bare, detect = (statistics.median(p[k]) for k in ("server_s", "bare_s", "sam3_detect_s"))
    two, first, second = statistics.median(g["s"]), statistics.median(e["first_s"]), statistics.median(e["second_s"])
    return {
        "predict_vs_bare": ratio("predict_vs_bare", server / bare, f"/predict {server:.2f} s vs bare {bare:.2f} s"),
        "sam3_vs_grounding_dino_sam": ratio("sam3_vs_grounding_dino_sam", detect / two,
                                            f"SAM 3 {detect:.2f} s vs Grounding DINO-T + SAM-B {two:.2f} s"),
        "cached_vs_first_exemplar": ratio("cached_vs_first_exemplar", second / first,
                                          f"second exemplar {second:.2f} s vs first {first:.2f} s"),
    }


def diagnostics(result: dict) -> dict:
    """Where SAM 3's time goes: the vision encoder once per image, and per prompt or exemplar query the DETR
    encoder-decoder and mask decoder on the image's features (fused with that prompt, so not cacheable per image)."""
    p = result["sam3"]["predict"]
    vision = statistics.median(p["bare_vision_s"])
    query = statistics.median(s for row in p["bare_query_s"] for s in row)
    return {
        "bare_vision_s": vision,
        "bare_query_s_per_prompt": query,
        # what a cached second exemplar can at best be: one query ÷ (the encoder + one query)
        "exemplar_floor_query_vs_vision_plus_query": query / (vision + query),
        "predict_ratio_median_of_pairs": statistics.median(s / b for s, b in zip(p["server_s"], p["bare_s"])),
        "predict_response_bytes": statistics.median(p["response_bytes"]),
        "weights_gib": {"sam3": result["sam3"]["weights_bytes"] / 2**30,
                        "grounding_dino_sam": result["grounding_dino_sam"]["weights_bytes"] / 2**30},
    }


def complete(result: dict) -> list[str]:
    """The keys a result must have, that it lacks (a smoke run checks this)."""
    wanted = {"sam3": ("thresholds", "predict", "exemplar", "weights_bytes", "rss"),
              "grounding_dino_sam": ("s", "detect_s", "segment_s", "boxes", "weights_bytes"),
              "ratios": tuple(TARGETS), "diagnostics": ("bare_vision_s", "bare_query_s_per_prompt")}
    return [f"{part}.{key}" for part, keys in wanted.items() for key in keys if key not in result.get(part, {})]


def report(result: dict) -> None:
    table = Table(title=f"SAM 3 benchmark ({result['machine']['cpu_count']} CPUs, {result['setup']['models']['sam3']})")
    for column in ("ratio", "measured", "value", "target", "result"):
        table.add_column(column)
    for name, r in result["ratios"].items():
        verdict = "reported" if r["pass"] is None else "[green]pass[/]" if r["pass"] else "[red]FAIL[/]"
        table.add_row(name, r["measured"], f"{r['value']:.3f}", "-" if r["target"] is None else f"<= {r['target']}", verdict)
    console.print(table)
    d = result["diagnostics"]
    console.print(f"SAM 3 bare: vision {d['bare_vision_s']:.2f} s + {d['bare_query_s_per_prompt']:.2f} s per prompt; a "
                  f"cached exemplar is at best {d['exemplar_floor_query_vs_vision_plus_query']:.3f} of the first; weights "
                  f"SAM 3 {d['weights_gib']['sam3']:.2f} GiB, Grounding DINO + SAM {d['weights_gib']['grounding_dino_sam']:.2f} GiB; "
                  f"total {result['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sam3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="default: results/sam3.json (results/smoke/sam3.json with --smoke)")
    parser.add_argument("--repeats", type=int, default=2, help="measured repeats of each part (after a warm-up)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    out = args.out or result_path("sam3.json", args.smoke)
    start = time.perf_counter()
    root, image_wh = (CACHE / "smoke", SMOKE_IMAGE_WH) if args.smoke else (CACHE, IMAGE_WH)
    if args.smoke:
        from ml_backend.models.tiny import write_tiny_models, write_tiny_sam3

        models = write_tiny_models(root / "models") | {"sam3": write_tiny_sam3(root / "models" / "sam3")}
        names = {"sam3": "tiny random SAM 3 (ml_backend.models.tiny)", "detector": "tiny random Grounding DINO",
                 "segmenter": "tiny random SAM"}
    else:
        models = write_models(CACHE / "models") | {"sam3": write_sam3(CACHE / "models" / "sam3")}
        names = {"sam3": "Sam3VideoConfig() (facebook/sam3), random weights",
                 "detector": "GroundingDinoConfig() (Swin-T + BERT-base), random weights",
                 "segmenter": "SamConfig() (ViT-B), random weights"}
    image = make_image(root / "images-sam3" / "sam3.jpg", seed=17, size=image_wh)
    result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "load_average_start": os.getloadavg(),
              "setup": {"smoke": args.smoke, "repeats": args.repeats, "image_wh": image_wh, "labels": LABELS,
                        "boxes": BOXES, "candidates_per_label": CANDIDATES, "label_config": LABEL_CONFIG, "models": names}}
    result["sam3"] = bench_sam3(models["sam3"], image, root, args.repeats)
    gc.collect()  # SAM 3 is freed before Grounding DINO and SAM load
    result["grounding_dino_sam"] = bench_two_models(models, image, root, args.repeats)
    result["ratios"] = ratios(result)
    result["diagnostics"] = diagnostics(result)
    result["load_average_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_dump(result))
    report(result)
    if missing := complete(result):
        raise RuntimeError(f"the result lacks {missing}")
    if args.smoke:
        console.print("smoke run on tiny models: the ratios are not judged against their targets")
    console.print(f"wrote {out}")
    return exit_status(all(r["pass"] is not False for r in result["ratios"].values()), args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
