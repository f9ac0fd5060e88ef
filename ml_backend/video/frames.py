"""Keep the frames worth labeling: sample a video's frames, drop near-duplicates and static stretches, and write the
kept frames as JPEGs with a manifest, ready for an image project (`prelabel up DIR`).

Each sampled frame is compared with the last frame KEPT (not the previous one): a static stretch keeps its first
frame only, and slow drift keeps a frame each time the picture has moved far enough from the last one kept.

- `phash` (default): a 64-bit DCT perceptual hash of the whole picture (grey 32x32, the 8x8 lowest frequencies
  against their median, as `imagehash.phash`, with a small margin so flat regions do not flip); a frame is a near-duplicate when its Hamming distance to the last kept
  one is <= the threshold (default 10 of 64 bits: re-encoding and sensor noise flip 0-3 bits between frames of a
  still scene, at most 9 with heavy noise; a cut or a large movement 17-30). It sees the layout of the whole picture: a small object moving over
  a still background changes few bits (lower the threshold, or use `embedding`).
- `embedding`: the image embedding of the pipeline's encoder (SAM, SAM 3, CLIP ...); a near-duplicate has cosine
  similarity >= the threshold (default 0.95) to the last kept frame.

Output, flat in DIR (Label Studio's local-files storage, which `prelabel up` connects, lists one folder without its
subfolders): `<video>_f<frame index>_t<seconds>.jpg` (they sort by video, then time), `frames.csv` (one row per kept
frame) and `videos.csv` (one row per finished video: what a rerun skips).
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image
from scipy.fft import dctn

from ..errors import ConfigError, PrelabelError, VideoTooLargeError
from .decode import VideoLimits, VideoReader

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
METHODS = ("phash", "embedding")
DEFAULT_THRESHOLDS = {"phash": 10.0, "embedding": 0.95}
MANIFEST, VIDEOS = "frames.csv", "videos.csv"
JPEG_QUALITY = 92
PHASH_MARGIN = 2.0  # grey levels of the 32x32 thumbnail's orthonormal DCT (noise of sigma 8 per pixel is ~0.5 there)


# -- near-duplicate measures -------------------------------------------------------------------------------------


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB uint8 image: a bit per low frequency, set where it is above the median
    by more than PHASH_MARGIN (without a margin, the many near-zero coefficients of a flat or dark picture flip
    with noise: two noisy frames of one still scene differed by 20-40 bits; with it, by 0-9 at noise sigma 16)."""
    grey = Image.fromarray(image).resize((32, 32), Image.Resampling.BOX).convert("L")  # averaging first: faster
    low = dctn(np.asarray(grey, np.float64), type=2, norm="ortho")[:8, :8]
    return int(np.packbits((low > np.median(low) + PHASH_MARGIN).ravel()).view(">u8")[0])


class Measure(Protocol):
    method: str
    threshold: float

    def signature(self, image: np.ndarray): ...

    def compare(self, a, b) -> float:
        """How `b` differs from or resembles `a` (what the manifest records)."""
        ...

    def duplicate(self, value: float) -> bool: ...


@dataclass
class PHash:
    threshold: float = DEFAULT_THRESHOLDS["phash"]
    method: str = "phash"

    def signature(self, image: np.ndarray) -> int:
        return phash(image)

    def compare(self, a: int, b: int) -> float:
        return float((a ^ b).bit_count())  # Hamming distance, bits of 64

    def duplicate(self, value: float) -> bool:
        return value <= self.threshold


@dataclass
class EmbeddingSimilarity:
    encoder: object  # an ImageEncoder (models/base.py)
    threshold: float = DEFAULT_THRESHOLDS["embedding"]
    method: str = "embedding"

    def signature(self, image: np.ndarray) -> np.ndarray:
        vector, _ = self.encoder.embed(image, np.zeros((0, 4), np.float32))
        vector = np.asarray(vector, np.float64).ravel()
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def compare(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b)  # cosine similarity

    def duplicate(self, value: float) -> bool:
        return value >= self.threshold


def check_threshold(method: str, threshold: float | None) -> float:
    """The threshold for `method` (its default when None), or a ConfigError saying the valid range."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if threshold is None:
        return DEFAULT_THRESHOLDS[method]
    if method == "phash" and not 0 <= threshold <= 64:
        raise ConfigError(f"--threshold {threshold:g}: a pHash threshold is a Hamming distance in bits, 0..64 "
                          f"(default {DEFAULT_THRESHOLDS['phash']:g})")
    if method == "embedding" and not 0 < threshold <= 1:
        raise ConfigError(f"--threshold {threshold:g}: an embedding threshold is a cosine similarity in (0, 1] "
                          f"(default {DEFAULT_THRESHOLDS['embedding']:g})")
    return float(threshold)


# -- sampling ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Every `every`-th decoded frame, or at most `fps` frames per second of video time: the first frame at least
    1/fps seconds after the last one sampled (by the decoder's timestamps, so variable-rate videos are sampled evenly
    in time)."""

    every: int = 1
    fps: float | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"--every {self.every}: sample every N-th frame with N >= 1")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"--fps {self.fps:g}: a sampling rate must be > 0 frames per second")

    def describe(self) -> str:
        return f"fps {self.fps:g}" if self.fps else f"every {self.every}"

    def picker(self) -> Callable[[int, float], bool]:
        """For the frames the reader yields (every `every`-th already): whether to take this one."""
        if not self.fps:
            return lambda index, t: True
        interval, due = 1 / self.fps, [0.0]

        def take(index: int, t: float) -> bool:
            if t + 1e-6 < due[0]:
                return False
            due[0] = t + interval
            return True

        return take


# -- files -------------------------------------------------------------------------------------------------------


def video_files(path: Path) -> list[Path]:
    """The video itself, or every video below a folder (suffixes VIDEO_SUFFIXES), sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path} is neither a video nor a folder")
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not found:
        raise ConfigError(f"{path} holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
    return found


def output_names(videos: list[Path], root: Path) -> dict[Path, str]:
    """The file-name prefix of each video's frames: its path below `root` (folders joined by `__`), with the suffix
    too where two videos would otherwise share one (clip.mp4 and clip.mov)."""
    def stem(p: Path, suffix: bool) -> str:
        rel = p.relative_to(root) if p != root and p.is_relative_to(root) else Path(p.name)
        name = "__".join((*rel.parent.parts, rel.stem + (f"_{rel.suffix[1:]}" if suffix else "")))
        return re.sub(r"[^\w.-]+", "_", name)

    plain = [stem(p, False) for p in videos]
    return {p: stem(p, plain.count(s) > 1) for p, s in zip(videos, plain)}


def frame_file(prefix: str, index: int, seconds: float) -> str:
    return f"{prefix}_f{index:06d}_t{seconds:08.3f}.jpg"


def _frame_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}_f\d{{6,}}_t\d+\.\d{{3}}\.jpg")


@dataclass
class Row:
    """A kept frame, as `frames.csv` lists it: `vs_last_kept` is the Hamming distance in bits (phash) or cosine
    similarity (embedding) to the frame kept before it (empty for a video's first)."""

    file: str
    video: str
    frame: int
    timestamp_s: float
    reason: str  # first | changed
    method: str
    vs_last_kept: float | None


@dataclass
class VideoResult:
    """One video's outcome (a row of `videos.csv` when done): `sampled` frames compared, `kept` written."""

    video: str
    prefix: str
    status: str  # done | skipped (done before) | failed
    sampled: int = 0
    kept: int = 0
    frames: int = 0  # decoded
    seconds: float = 0.0
    settings: str = ""
    error: str = ""

    @property
    def dropped(self) -> int:
        return self.sampled - self.kept


@dataclass
class FramesReport:
    videos: list[VideoResult] = field(default_factory=list)
    seconds: float = 0.0
    out: Path | None = None

    @property
    def ok(self) -> bool:
        return not any(v.status == "failed" for v in self.videos)

    def total(self, key: str) -> int:
        return sum(getattr(v, key) for v in self.videos if v.status != "failed")

    @property
    def saved(self) -> float | None:
        """The fraction of sampled frames dropped."""
        sampled = self.total("sampled")
        return self.total("dropped") / sampled if sampled else None

    def summary(self) -> str:
        sampled, kept, dropped = self.total("sampled"), self.total("kept"), self.total("dropped")
        counts = {status: sum(v.status == status for v in self.videos) for status in ("done", "skipped", "failed")}
        saved = "" if self.saved is None else f" ({100 * self.saved:.1f} % fewer to label)"
        return (f"{kept} of {sampled} sampled frames kept, {dropped} dropped{saved}; {len(self.videos)} videos: "
                f"{counts['done']} done, {counts['skipped']} done before (skipped), {counts['failed']} failed; "
                f"{self.seconds:.1f} s")


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, names: list[str], rows: list[dict]) -> None:
    """Write whole, then rename: a crash leaves the previous file."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


ROW_FIELDS = [f.name for f in fields(Row)]
VIDEO_FIELDS = ["video", "prefix", "status", "sampled", "kept", "frames", "seconds", "settings"]


class Output:
    """DIR's manifest and video list, read once and rewritten as each video finishes."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.rows = _read_csv(out / MANIFEST)
        self.done = {r["video"]: r for r in _read_csv(out / VIDEOS)}

    def finished(self, video: str, prefix: str, settings: str) -> VideoResult | None:
        """The earlier result of `video` when it was done with the same settings and its frames are all there."""
        row = self.done.get(video)
        if row is None or row["settings"] != settings or row["prefix"] != prefix:
            return None
        files = [r["file"] for r in self.rows if r["video"] == video]
        if len(files) != int(row["kept"]) or not all((self.out / f).is_file() for f in files):
            return None
        return VideoResult(video, prefix, "skipped", int(row["sampled"]), int(row["kept"]), int(row["frames"]),
                           0.0, settings)

    def clear(self, prefix: str) -> None:
        """Remove frames of `prefix` left by an earlier or interrupted run."""
        pattern = _frame_pattern(prefix)
        for path in self.out.glob(f"{glob_escape(prefix)}_f*.jpg"):
            if pattern.fullmatch(path.name):
                path.unlink()

    def record(self, result: VideoResult, rows: list[Row]) -> None:
        self.rows = [r for r in self.rows if r["video"] != result.video] + [asdict(r) for r in rows]
        self.rows.sort(key=lambda r: r["file"])
        _write_csv(self.out / MANIFEST, ROW_FIELDS, self.rows)
        self.done[result.video] = {k: v for k, v in asdict(result).items() if k in VIDEO_FIELDS}
        _write_csv(self.out / VIDEOS, VIDEO_FIELDS, sorted(self.done.values(), key=lambda r: r["video"]))


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# -- the run -----------------------------------------------------------------------------------------------------


def keep_frames(path: Path, name: str, prefix: str, out: Path, measure: Measure, sampling: Sampling,
                limits: VideoLimits, on_open: Callable[[int], None] = lambda n: None,
                advance: Callable[[int], None] = lambda n: None) -> tuple[VideoResult, list[Row]]:
    """Decode one video, keep the sampled frames unlike the last kept one and write them below `out` as JPEG.
    `on_open(frames)`: the frame count the video declares; `advance(n)`: n more frames decoded."""
    started = time.perf_counter()
    take = sampling.picker()
    rows: list[Row] = []
    result = VideoResult(name, prefix, "done", settings=settings_key(measure, sampling))
    last, seen = None, 0
    with VideoReader(path, name, limits) as reader:
        on_open(reader.info.frames)
        for frame, image in reader.frames(every=1 if sampling.fps else sampling.every):
            advance(frame.index + 1 - seen)
            seen = frame.index + 1
            t = float(frame.timestamp or 0.0)
            if not take(frame.index, t):
                continue
            result.sampled += 1
            signature = measure.signature(image)
            value = None if last is None else measure.compare(last, signature)
            if value is not None and measure.duplicate(value):
                continue
            last = signature
            file = frame_file(prefix, frame.index, t)
            Image.fromarray(image).save(out / file, quality=JPEG_QUALITY)
            rows.append(Row(file, name, frame.index, round(t, 6), "first" if value is None else "changed",
                            measure.method, None if value is None else round(value, 6)))
        result.frames = max(seen, reader.info.frames)
    result.kept = len(rows)
    result.seconds = time.perf_counter() - started
    return result, rows


def settings_key(measure: Measure, sampling: Sampling) -> str:
    """What a rerun must match to skip a finished video."""
    model = getattr(getattr(measure, "encoder", None), "model_id", "")
    return f"{measure.method} {measure.threshold:g} {sampling.describe()}" + (f" {model}" if model else "")


def progress_bar():
    """Frames decoded (of those the videos declare), elapsed time and frames per second."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            rate = task.completed / task.elapsed if task.elapsed and task.completed else 0.0
            return Text(f"{rate:.1f} frames/s" if rate else "-- frames/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), Rate(),
                    transient=False)


def extract_frames(source: Path, out: Path, measure: Measure, sampling: Sampling, limits: VideoLimits = VideoLimits(),
                   max_bytes: int | None = None, progress: bool = True) -> FramesReport:
    """`prelabel frames`: the kept frames of the video `source` (or of every video below the folder) into `out`.
    A video that fails (corrupt, truncated, over a limit) is reported by name and its frames removed; the others
    are done. A video finished before with the same settings is skipped (its result is reported as before)."""
    from contextlib import nullcontext

    started = time.perf_counter()
    source = source.expanduser()
    videos = video_files(source)
    root = source if source.is_dir() else source.parent
    prefixes = output_names(videos, root)
    output = Output(out)
    report = FramesReport(out=out)
    bar = progress_bar() if progress else None
    with bar or nullcontext():
        task = bar.add_task("frames", total=0) if bar else None
        for path in videos:
            name = path.relative_to(root).as_posix() if source.is_dir() else path.name
            prefix = prefixes[path]
            if (earlier := output.finished(name, prefix, settings_key(measure, sampling))) is not None:
                report.videos.append(earlier)
                continue
            output.clear(prefix)
            if bar:
                bar.update(task, description=name)
            try:
                if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
                    raise VideoTooLargeError(f"video {name} is {size} bytes, over the limit of {max_bytes} "
                                             f"(PRELABEL_MAX_VIDEO_BYTES)")
                result, rows = keep_frames(
                    path, name, prefix, out, measure, sampling, limits,
                    on_open=lambda n: bar and bar.update(task, total=bar.tasks[0].total + n),
                    advance=lambda n: bar and bar.advance(task, n))
            except (PrelabelError, OSError) as exc:
                output.clear(prefix)
                message = str(exc) if name in str(exc) else f"video {name}: {exc}"
                report.videos.append(VideoResult(name, prefix, "failed", error=message))
                continue
            output.record(result, rows)
            report.videos.append(result)
        if bar:
            bar.update(task, description="frames", total=bar.tasks[0].completed)
    report.seconds = time.perf_counter() - started
    return report


def print_report(report: FramesReport, console=None) -> None:
    """Kept and dropped frames per video and in total, and the share of sampled frames saved from labeling."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"frames kept in {report.out}")
    for column in ("video", "sampled", "kept", "dropped", "saved", "status"):
        table.add_column(column, justify="left" if column in ("video", "status") else "right")
    for v in report.videos:
        if v.status == "failed":
            table.add_row(v.video, "-", "-", "-", "-", "[red]failed[/]")
            continue
        saved = f"{100 * v.dropped / v.sampled:.1f} %" if v.sampled else "-"
        status = "done before (skipped)" if v.status == "skipped" else f"done in {v.seconds:.1f} s"
        table.add_row(v.video, str(v.sampled), str(v.kept), str(v.dropped), saved, status)
    console.print(table)
    for v in report.videos:
        if v.status == "failed":
            console.print(f"[red]failed:[/] {v.error}", highlight=False)
