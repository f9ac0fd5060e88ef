"""`python -m benchmarks.video [--out PATH] [--smoke]`: video (issue 18), measured on this machine's CPU:

- `keyframes_per_frame`: Label Studio keyframes emitted (`ml_backend.video.keyframes`, the default tolerance) ÷ frames,
  over the ground-truth per-frame boxes of generated videos (`ml_backend.video.synthetic.write_video`) of straight
  and curved motion, objects entering and leaving; target <= 0.2;
- `frames_per_second`: `prelabel frames` (`extract_frames`, pHash, every frame) on a generated 1080p H.264 video:
  decode + hash + JPEG of the kept frames, in frames per second; reported, no target;
- `tracking_vs_detection`: the tracker's cost per video frame as the pipeline runs it at the defaults (a
  `session.step` of SAM 2.1 hiera-tiny, `Sam2VideoConfig()` defaults, random weights, on every
  int(25 fps // PRELABEL_VIDEO_TRACK_FPS)-th frame of a 25 fps 1280x720 video, 2 objects) ÷ `Engine.detect` per frame
  (Grounding DINO-T, `GroundingDinoConfig()`, random weights); target <= 0.3. The per-step ratio is reported too.

`--smoke`: the same code on small videos and tiny models, in seconds. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may be downloaded

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ml_backend.settings import Settings  # noqa: E402
from ml_backend.video.decode import VideoLimits, VideoReader  # noqa: E402
from ml_backend.video.frames import PHash, Sampling, extract_frames  # noqa: E402
from ml_backend.video.keyframes import keyframes  # noqa: E402
from ml_backend.video.synthetic import Mover, write_video  # noqa: E402

from .harness import SMOKE_HELP, exit_status, result_path  # noqa: E402
from .models import DONE, write_detector  # noqa: E402
from .run import CACHE, json_dump, machine  # noqa: E402

TARGETS = {"keyframes_per_frame": 0.2, "frames_per_second": None, "tracking_vs_detection": 0.3}
VIDEO_WH, SMOKE_VIDEO_WH = (1920, 1080), (320, 240)
console = Console()


# -- keyframes -----------------------------------------------------------------------------------------------------


def motion_cases(width: int = 640, height: int = 360) -> dict[str, list[Mover]]:
    """Generated motion, one video each: straight lines, gentle and strong curves, and objects entering and leaving
    across the frame edge (their clipped boxes bend where they cross it)."""
    w, h = width, height
    return {
        "linear": [Mover("car", (60, 60), (580, 300)), Mover("person", (600, 80), (40, 200), size=(30, 60)),
                   Mover("ball", (320, 20), (330, 340), size=(24, 24), shape="circle", first=20, last=80)],
        "curved_gentle": [Mover("car", (60, 180), (580, 180), curve=40), Mover("person", (100, 40), (540, 320),
                                                                               size=(30, 60), curve=-60)],
        "curved_strong": [Mover("car", (60, 300), (580, 300), curve=-220), Mover("ball", (320, 30), (320, 330),
                                                                                size=(24, 24), curve=200, shape="circle")],
        "entering_leaving": [Mover("car", (-30, 120), (w + 30, 160)), Mover("person", (w / 2, -40), (w / 2 + 40, h + 40),
                                                                           size=(30, 60))],
    }


def keyframe_counts(root: Path, frames: int, tolerance: float) -> dict:
    """Per case: frames with an object (summed over tracks) and keyframes emitted for them."""
    cases = {}
    for name, movers in motion_cases().items():
        tracks = write_video(root / f"{name}.mp4", movers, 640, 360, frames=frames)
        per_track = [(len(t.boxes), len(keyframes(t.boxes, tolerance))) for t in tracks.values()]
        n, k = sum(f for f, _ in per_track), sum(k for _, k in per_track)
        cases[name] = {"tracks": len(per_track), "frames": n, "keyframes": k, "ratio": k / n}
        console.log(f"keyframes {name}: {k} for {n} frames ({k / n:.3f})")
    return {"tolerance_px": tolerance, "frames_per_video": frames, "cases": cases,
            "linear": _ratio(cases, ("linear",)), "curved": _ratio(cases, ("curved_gentle", "curved_strong")),
            "all": _ratio(cases, tuple(cases))}


def _ratio(cases: dict, names: tuple[str, ...]) -> float:
    return sum(cases[n]["keyframes"] for n in names) / sum(cases[n]["frames"] for n in names)


# -- prelabel frames throughput ------------------------------------------------------------------------------------


def frames_throughput(root: Path, size: tuple[int, int], frames: int, repeats: int) -> dict:
    """`extract_frames` on a generated video of moving shapes (written once), each repeat into a fresh folder."""
    w, h = size
    video = root / f"moving-{w}x{h}-{frames}.mp4"
    if not (root / f"{video.name}{DONE}").exists():
        movers = [Mover("car", (0.1 * w, 0.2 * h), (0.9 * w, 0.7 * h), size=(w // 6, h // 6)),
                  Mover("person", (0.8 * w, 0.1 * h), (0.3 * w, 0.9 * h), size=(w // 12, h // 5), curve=0.2 * w),
                  Mover("ball", (0.5 * w, 0.5 * h), (0.5 * w, 0.5 * h), size=(w // 3, h // 3), first=frames // 2,
                        shape="circle", colour=(40, 40, 230))]  # a cut-like change halfway
        write_video(video, movers, w, h, frames=frames, fps=30)
        (root / f"{video.name}{DONE}").touch()
    with VideoReader(video) as reader:
        info = reader.info
    rows = []
    for i in range(repeats):
        out = root / f"frames-out-{w}x{h}"
        for old in out.glob("*"):
            old.unlink()
        report = extract_frames(video, out, PHash(), Sampling(), VideoLimits(), progress=False)
        (v,) = report.videos
        if v.status != "done" or v.kept < 1:
            raise RuntimeError(f"prelabel frames on {video}: {v}")
        rows.append({"s": v.seconds, "frames": v.frames, "kept": v.kept, "frames_per_s": v.frames / v.seconds})
        console.log(f"frames {i + 1}: {v.frames} frames of {w}x{h} in {v.seconds:.1f} s "
                    f"({rows[-1]['frames_per_s']:.1f}/s), {v.kept} kept")
    return {"video": info.describe(), "runs": rows, "frames_per_s": statistics.median(r["frames_per_s"] for r in rows)}


# -- tracking vs detection -----------------------------------------------------------------------------------------


def write_tracker(out: Path, seed: int = 0) -> Path:
    """SAM 2.1 hiera-tiny as `facebook/sam2.1-hiera-tiny` is built (`Sam2VideoConfig()` defaults: Hiera with embed dim
    96, blocks [1, 2, 7, 2], global attention at 5, 7, 9, windows [8, 4, 14, 7]; 1024 px), random weights."""
    if (out / DONE).exists():
        return out
    import torch
    from transformers import Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor, Sam2VideoVideoProcessor

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    Sam2VideoModel(Sam2VideoConfig()).eval().save_pretrained(out)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(), video_processor=Sam2VideoVideoProcessor()).save_pretrained(out)
    (out / DONE).touch()
    return out


def tracking_ratio(smoke: bool, root: Path | None = None, frames: int = 10, size: tuple[int, int] = (1280, 720),
                   fps: float = 25.0) -> dict:
    """Tracking cost per video frame ÷ detection cost per frame, on one generated 25 fps video: `Engine.detect`
    (Grounding DINO-T, 2 prompts) on every frame vs a tracker session following 2 objects given on the first frame,
    stepping as the pipeline does at the default settings (every `track_every`-th frame: PRELABEL_VIDEO_TRACK_FPS;
    the frames between cost nothing, their boxes are interpolated). Per-step times are reported too; the first step,
    which adds the objects, is timed apart. Medians of the per-frame times."""
    from ml_backend.models import build_tracker, pick_device
    from ml_backend.engine import Engine
    from ml_backend.models.tiny import write_tiny_detector, write_tiny_sam2_video
    from ml_backend.ontology import PromptsFile

    root = root or (CACHE / "smoke" if smoke else CACHE)
    if smoke:
        frames, size = 7, SMOKE_VIDEO_WH
        detector, tracker_dir = write_tiny_detector(root / "models" / "tiny-detector"), write_tiny_sam2_video(root / "models" / "sam2-video")
    else:
        detector, tracker_dir = write_detector(root / "models" / "grounding-dino-t"), write_tracker(root / "models" / "sam2.1-hiera-tiny")
    w, h = size
    movers = [Mover("car", (0.2 * w, 0.3 * h), (0.7 * w, 0.6 * h), size=(w // 8, h // 8)),
              Mover("person", (0.8 * w, 0.2 * h), (0.4 * w, 0.8 * h), size=(w // 16, h // 5), curve=0.1 * w)]
    tracks = write_video(root / f"track-{w}x{h}.mp4", movers, w, h, frames=frames, fps=fps)
    with VideoReader(root / f"track-{w}x{h}.mp4") as reader:
        images = [image for _, image in reader.frames()]
    prompts = root / "prompts-video.yaml"
    prompts.write_text(yaml.safe_dump({"box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 8,
                                       "labels": {"Car": {"prompts": ["car"]}, "Person": {"prompts": ["person"]}}}))
    settings = Settings(detector=str(detector), segmenter="", prompts=prompts, model_dir=root / "model-dir",
                        embedding_cache_size=0)
    track_every = max(1, int(fps // settings.video_track_fps))
    engine = Engine.from_settings(settings)
    ontology = PromptsFile.load(prompts).ontology()
    engine.detect(images[:1], ontology)  # warm-up
    detect_s = []
    for image in images[: 4 if not smoke else None]:
        start = time.perf_counter()
        engine.detect([image], ontology)
        detect_s.append(time.perf_counter() - start)
    del engine

    tracker = build_tracker(str(tracker_dir), settings.model_dir, pick_device(settings.device))
    session = tracker.start()
    start = time.perf_counter()
    session.step(images[0], new={k: t.boxes[0] for k, t in tracks.items() if t.first == 0})
    first_step_s, step_s = time.perf_counter() - start, []
    for image in images[track_every::track_every]:
        start = time.perf_counter()
        session.step(image)
        step_s.append(time.perf_counter() - start)
    detect, step = statistics.median(detect_s), statistics.median(step_s)
    per_frame = step / track_every
    console.log(f"tracking {step:.2f} s per step, every {track_every} frames of {fps:g} fps: {per_frame:.2f} s per "
                f"frame vs detection {detect:.2f} s per frame ({per_frame / detect:.3f}; per step {step / detect:.3f})")
    return {"frames": frames, "size": size, "fps": fps, "objects": len(tracks),
            "track_every": track_every, "detect_s": detect_s, "first_step_s": first_step_s, "step_s": step_s,
            "per_frame_s": per_frame, "ratio": per_frame / detect, "ratio_per_step": step / detect}


# -- the run -------------------------------------------------------------------------------------------------------


def ratio(name: str, value: float | None, measured: str, higher_is_better: bool = False) -> dict:
    target = TARGETS[name]
    judged = None if target is None or value is None else (value >= target if higher_is_better else value <= target)
    return {"value": value, "target": target, "pass": judged, "measured": measured}


def ratios(result: dict) -> dict:
    k, f, t = result["keyframes"], result["frames"], result["tracking"]
    return {
        "keyframes_per_frame": ratio("keyframes_per_frame", k["all"],
                                     f"linear {k['linear']:.3f}, curved {k['curved']:.3f} at {k['tolerance_px']:g} px"),
        "frames_per_second": ratio("frames_per_second", f["frames_per_s"], f"prelabel frames on {f['video']}"),
        "tracking_vs_detection": ratio(
            "tracking_vs_detection", t.get("ratio"),
            f"{t['per_frame_s']:.2f} s per frame (a step every {t['track_every']} frames at {t['fps']:g} fps: "
            f"{statistics.median(t['step_s']):.2f} s, {t['ratio_per_step']:.2f} of a detection) vs detect "
            f"{statistics.median(t['detect_s']):.2f} s per frame"),
    }


def report(result: dict) -> None:
    table = Table(title=f"Video benchmark ({result['machine']['cpu_count']} CPUs)")
    for column in ("measure", "measured", "value", "target", "result"):
        table.add_column(column)
    for name, r in result["ratios"].items():
        verdict = ("not available" if r["value"] is None else "reported" if r["pass"] is None
                   else "[green]pass[/]" if r["pass"] else "[red]FAIL[/]")
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        table.add_row(name, r["measured"], value, "-" if r["target"] is None else f"<= {r['target']}", verdict)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="default: results/video.json (results/smoke/video.json with --smoke)")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs of prelabel frames")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    out = args.out or result_path("video.json", args.smoke)
    start = time.perf_counter()
    root = CACHE / "smoke" / "video" if args.smoke else CACHE / "video"
    root.mkdir(parents=True, exist_ok=True)
    size, frames = (SMOKE_VIDEO_WH, 30) if args.smoke else (VIDEO_WH, 300)
    tolerance = Settings().keyframe_tolerance
    result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "load_average_start": os.getloadavg(),
              "setup": {"smoke": args.smoke, "repeats": args.repeats, "frames_video_wh": size, "frames_video_frames": frames}}
    result["keyframes"] = keyframe_counts(root, 40 if args.smoke else 120, tolerance)
    result["frames"] = frames_throughput(root, size, frames, 1 if args.smoke else args.repeats)
    result["tracking"] = tracking_ratio(args.smoke, root.parent)
    result["ratios"] = ratios(result)
    result["load_average_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_dump(result))
    report(result)
    if args.smoke:
        console.print("smoke run on small videos and tiny models: the targets are not judged")
    console.print(f"wrote {out}")
    return exit_status(all(r["pass"] is not False for r in result["ratios"].values()), args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
