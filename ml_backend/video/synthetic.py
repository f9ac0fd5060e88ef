"""Generated videos with exact per-frame boxes, for tests and benchmarks: shapes moving over a textured background
on straight or curved paths, entering late and leaving early, encoded with PyAV (H.264, VP9, MPEG-4, FFV1 ...),
optionally at a variable frame rate.

A shape's box on a frame is the box of the pixels drawn for it (x2, y2 exclusive, clipped to the frame); a shape
outside the frame has none there, so its track is the run of frames on which it is seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

CONTAINERS = {"libx264": ".mp4", "h264": ".mp4", "mpeg4": ".mp4", "libvpx-vp9": ".webm", "libvpx": ".webm",
              "ffv1": ".mkv", "mjpeg": ".avi"}


@dataclass
class Mover:
    """A shape of `label` moving from `start` to `end` (centre, pixels) over frames `first`..`last` (inclusive);
    `curve` bends the path sideways by that many pixels at its middle (0: a straight line)."""

    label: str
    start: tuple[float, float]
    end: tuple[float, float]
    size: tuple[int, int] = (40, 30)
    first: int = 0
    last: int | None = None
    curve: float = 0.0
    shape: str = "square"  # square | circle
    colour: tuple[int, int, int] = (230, 40, 40)

    def centre(self, frame: int, frames: int) -> tuple[float, float] | None:
        last = frames - 1 if self.last is None else self.last
        if not self.first <= frame <= last:
            return None
        t = (frame - self.first) / max(last - self.first, 1)
        (x0, y0), (x1, y1) = self.start, self.end
        dx, dy = x1 - x0, y1 - y0
        norm = max(np.hypot(dx, dy), 1e-9)
        bend = self.curve * 4 * t * (1 - t)  # a parabola through both ends
        return x0 + t * dx - bend * dy / norm, y0 + t * dy + bend * dx / norm


@dataclass
class Track:
    """A shape's ground truth: its label and its box (xyxy pixels) on each frame of the run starting at `first`."""

    label: str
    first: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    a, b = rng.uniform(-0.5, 0.5, 2)
    image = rng.integers(60, 160, 3) + 50 * (a * xx / max(width, 1) + b * yy / max(height, 1))[..., None]
    return (image + rng.normal(0, 6, (height, width, 3))).clip(0, 255).astype(np.uint8)


def render(movers: list[Mover], width: int, height: int, frames: int, seed: int = 0):
    """Yield (RGB frame, {mover index: xyxy box}) for each frame."""
    background = _background(width, height, np.random.default_rng(seed))
    for n in range(frames):
        canvas = Image.fromarray(background.copy())
        draw = ImageDraw.Draw(canvas)
        boxes = {}
        for k, mover in enumerate(movers):
            centre = mover.centre(n, frames)
            if centre is None:
                continue
            w, h = mover.size
            x0, y0 = int(round(centre[0] - w / 2)), int(round(centre[1] - h / 2))
            box = np.array([max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)], float)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            (draw.ellipse if mover.shape == "circle" else draw.rectangle)([x0, y0, x0 + w - 1, y0 + h - 1],
                                                                          fill=mover.colour)
            boxes[k] = box
        yield np.asarray(canvas), boxes


def write_video(path: Path | str, movers: list[Mover], width: int = 320, height: int = 240, frames: int = 50,
                fps: float = 25, codec: str = "libx264", seed: int = 0,
                frame_times: list[float] | None = None) -> dict[int, Track]:
    """Encode the movers' video at `path`; returns each mover's ground-truth track. `frame_times` (seconds, one per
    frame, increasing) makes a variable-frame-rate video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tracks: dict[int, Track] = {}
    seen: dict[int, list[np.ndarray]] = {}
    with av.open(str(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if codec not in ("ffv1",) else "bgr0"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "18", "preset": "ultrafast"}
        if frame_times is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for n, (image, boxes) in enumerate(render(movers, width, height, frames, seed)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if frame_times is not None:
                frame.pts, frame.time_base = int(round(frame_times[n] * 1000)), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
            for k, box in boxes.items():
                if k not in tracks:
                    tracks[k] = Track(movers[k].label, n)
                    seen[k] = []
                if n != tracks[k].first + len(seen[k]):
                    raise ValueError(f"mover {k} leaves the frame and comes back: give it two movers")
                seen[k].append(box)
        for packet in stream.encode():
            container.mux(packet)
    for k, track in tracks.items():
        track.boxes = np.array(seen[k])
    return tracks


def video_path(directory: Path | str, name: str, codec: str = "libx264") -> Path:
    return Path(directory) / f"{name}{CONTAINERS.get(codec, '.mkv')}"
