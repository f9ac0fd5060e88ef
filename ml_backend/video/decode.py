"""Video decoding with limits, through PyAV (`av` on PyPI: its wheels bundle FFmpeg, so nothing has to be on the
machine; torchcodec needs FFmpeg's libraries from the system, which a slim container or Windows laptop lacks).

`open_video(path, source, limits)` probes a file and checks it against the limits before a single frame is decoded;
`VideoReader.frames()` then yields each frame with its index and presentation time. Every failure is a
`VideoDecodeError` or `VideoTooLargeError` naming the video (`source`) and the cause; nothing is shelled out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from ..errors import VideoDecodeError, VideoTooLargeError
from ..media import Frame

log = logging.getLogger(__name__)

VFR_TOLERANCE = 0.02  # frame intervals off the median by more than this (fraction) make a video variable-rate


@dataclass(frozen=True)
class VideoLimits:
    seconds: float = 600.0
    pixels: int = 3840 * 2160  # per frame

    @classmethod
    def from_settings(cls, settings) -> VideoLimits:
        return cls(settings.max_video_seconds, settings.max_video_pixels)


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, from its container (before decoding): frame size, average frame rate, duration in seconds,
    frame count (declared, else estimated from duration x rate) and codec."""

    source: str
    width: int
    height: int
    fps: float
    duration: float
    frames: int
    codec: str

    def describe(self) -> str:
        return f"{self.width}x{self.height} {self.codec}, {self.frames} frames, {self.duration:.2f} s at {self.fps:.3f} fps"


def _stream(container: av.container.InputContainer, source: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        held = f"it holds {', '.join(kinds)}" if kinds else "it holds no streams: a video of zero frames?"
        raise VideoDecodeError(f"video {source} has no video stream ({held})")
    return container.streams.video[0]


def _info(container: av.container.InputContainer, stream, source: str) -> VideoInfo:
    ctx = stream.codec_context
    if ctx is None:  # FFmpeg knows no decoder for the stream's codec id
        tag = getattr(stream, "codec_tag", "") or "unknown"
        raise VideoDecodeError(f"video {source} uses a codec ({tag!r}) which this FFmpeg build cannot decode")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = int(stream.frames or 0) or (round(duration * fps) if fps else 0)
    return VideoInfo(source, int(ctx.width or 0), int(ctx.height or 0), fps, duration, frames, ctx.name or "unknown")


class VideoReader:
    """An open video; use as a context manager. `info` is known (and checked against the limits) on opening."""

    def __init__(self, path: Path | str, source: str | None = None, limits: VideoLimits = VideoLimits()):
        self.path = Path(path)
        self.source = source or str(path)
        self.limits = limits
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise VideoDecodeError(f"video {self.source} cannot be read: {exc.strerror or exc}") from None
        if size == 0:
            raise VideoDecodeError(f"video {self.source} is empty (0 bytes)")
        try:
            self.container = av.open(str(self.path), mode="r", metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"video {self.source} is not a video of a known format, or is corrupt or "
                                   f"truncated ({size} bytes): {_why(exc)}") from None
        try:
            self.stream = _stream(self.container, self.source)
            self.info = _info(self.container, self.stream, self.source)
            self._check()
            self.stream.thread_type = "AUTO"
        except BaseException:
            self.container.close()
            raise

    def _check(self) -> None:
        info, limits = self.info, self.limits
        try:
            av.codec.Codec(self.stream.codec_context.name, "r")
        except (av.error.FFmpegError, ValueError):
            raise VideoDecodeError(f"video {self.source} uses a codec ({info.codec!r}) which this FFmpeg build "
                                   f"cannot decode") from None
        if info.width <= 0 or info.height <= 0:
            raise VideoDecodeError(f"video {self.source} declares no frame size ({info.width}x{info.height})")
        if info.width * info.height > limits.pixels:
            raise VideoTooLargeError(
                f"video {self.source} has {info.width}x{info.height} = {info.width * info.height} pixels per frame, "
                f"over the limit of {limits.pixels} (PRELABEL_MAX_VIDEO_PIXELS)")
        if info.duration > limits.seconds:
            raise VideoTooLargeError(f"video {self.source} lasts {info.duration:.1f} s, over the limit of "
                                     f"{limits.seconds:g} s (PRELABEL_MAX_VIDEO_SECONDS)")

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def frames(self, every: int = 1, rgb: bool = True) -> Iterator[tuple[Frame, np.ndarray | None]]:
        """Every `every`-th frame in presentation order: (Frame(index, seconds from the start), RGB uint8 HxWx3,
        or None when `rgb` is False: the frame is decoded but not converted). Raises VideoDecodeError on corrupt
        data (naming the frame), on a stream that ends well before its declared length (truncated), on a frame
        whose size changes, on a video with no frames, and VideoTooLargeError past the duration limit."""
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        start = self.stream.start_time or 0
        base = self.stream.time_base or Fraction(1, 1)
        index, last = 0, None
        try:
            for frame in self.container.decode(self.stream):
                t = float(((frame.pts if frame.pts is not None else start) - start) * base)
                if last is not None and t <= last:  # B-frame reordering without pts, or broken timestamps
                    t = last + (1 / self.info.fps if self.info.fps else 0.0)
                last = t
                if t > self.limits.seconds:
                    raise VideoTooLargeError(f"video {self.source} runs past {self.limits.seconds:g} s (frame "
                                             f"{index}), over the limit (PRELABEL_MAX_VIDEO_SECONDS)")
                if (frame.width, frame.height) != (self.info.width, self.info.height):
                    raise VideoDecodeError(f"video {self.source} changes frame size at frame {index} "
                                           f"({self.info.width}x{self.info.height} -> {frame.width}x{frame.height})")
                if index % every == 0:
                    yield Frame(index, t), (frame.to_ndarray(format="rgb24") if rgb else None)
                index += 1
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"video {self.source} is corrupt at frame {index}: {_why(exc)}") from None
        if index == 0:
            raise VideoDecodeError(f"video {self.source} has no frames that decode: it is corrupt or truncated "
                                   f"(it declares {self.info.describe()})")
        declared, interval = int(self.stream.frames or 0), 1 / self.info.fps if self.info.fps else 0.0
        if declared and index < declared - max(2, declared // 100):
            raise VideoDecodeError(f"video {self.source} is truncated: {index} of its {declared} frames decode")
        if not declared and last is not None and last < self.info.duration - max(3 * interval, 0.01 * self.info.duration):
            raise VideoDecodeError(f"video {self.source} is truncated: its frames end at {last:.2f} s of the "
                                   f"{self.info.duration:.2f} s it declares")


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def timestamps(path: Path | str, source: str | None = None, limits: VideoLimits = VideoLimits()) -> np.ndarray:
    """Every frame's presentation time in seconds (decodes without converting pixels)."""
    with VideoReader(path, source, limits) as reader:
        return np.array([f.timestamp for f, _ in reader.frames(rgb=False)])


def is_variable_rate(times: np.ndarray) -> bool:
    """Do the frame intervals vary (beyond rounding of timestamps)?"""
    gaps = np.diff(times)
    if len(gaps) < 2:
        return False
    median = float(np.median(gaps))
    return median > 0 and bool(np.abs(gaps - median).max() > VFR_TOLERANCE * median + 1e-3)
