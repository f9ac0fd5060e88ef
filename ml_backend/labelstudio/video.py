"""Label Studio video tasks: each `<VideoRectangle>`'s video fetched (as a file, under the video limits), decoded,
tracked by the engine, and every track turned into one `videorectangle` region whose `sequence` holds only the
keyframes Label Studio's linear interpolation needs (`video/keyframes.py`).

Label Studio numbers frames by the `<Video framerate>` it is given (default 24): frame k shows time (k - 1) /
framerate. A decoded frame at time t is Label Studio's frame round(t x framerate) + 1, so boxes land at the right
time even for a variable-frame-rate video or a config whose framerate is not the video's (that mismatch is logged:
Label Studio then steps through the video at the wrong rate).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import InferenceError, PrelabelError, RequestError
from ..ontology import Ontology
from ..video.decode import VideoInfo, VideoLimits, VideoReader
from ..video.keyframes import sequence
from ..video.track import VideoTrack
from .config import ProjectConfig, VideoControl
from .convert import region_id

if TYPE_CHECKING:
    from .backend import LabelStudioBackend

log = logging.getLogger(__name__)

RATE_MISMATCH = 0.01  # relative difference between the config's framerate and the video's that is worth a warning


def label_studio_frames(times: list[float], fps: float) -> np.ndarray:
    """Label Studio's 1-based frame number of each decoded frame."""
    return np.rint(np.asarray(times, float) * fps).astype(int) + 1


def track_region(track: VideoTrack, control: VideoControl, frames: np.ndarray, info: VideoInfo, fps: float,
                 tolerance: float, frames_count: int) -> dict | None:
    """One `videorectangle` region; the track's boxes resampled onto Label Studio's frames (the decoded frame
    nearest in time for each), then compressed to keyframes. None when the track covers no Label Studio frame."""
    mine = frames[track.first : track.last + 1]
    first, last = int(mine[0]), int(mine[-1])
    wanted = np.arange(first, last + 1)
    after = np.clip(np.searchsorted(mine, wanted, side="left"), 0, len(mine) - 1)
    before = np.clip(after - 1, 0, len(mine) - 1)
    nearest = np.where(np.abs(mine[before] - wanted) < np.abs(mine[after] - wanted), before, after)
    boxes = track.boxes[nearest]
    seq = sequence(first, boxes, info.width, info.height, fps, tolerance, ends=track.ended)
    if not seq:
        return None
    return {"id": region_id(), "from_name": control.from_name, "to_name": control.to_name, "type": "videorectangle",
            "origin": "prediction", "score": round(track.score, 4),
            "value": {"sequence": seq, "labels": [track.label], "framesCount": frames_count,
                      "duration": round(frames_count / fps, 6)}}


def predict_video(backend: LabelStudioBackend, task: dict, config: ProjectConfig, ontology: Ontology, version: str,
                  progress: Callable[[int], None] | None = None, on_info: Callable[[VideoInfo], None] | None = None,
                  workdir: Path | None = None) -> dict:
    """A prediction for one task of a video config: a region per tracked object per `<VideoRectangle>`. Errors
    (fetch, decode, limits) raise, naming the video; the caller names the task."""
    engine, settings = backend.engine, backend.settings
    tid, data = backend._task_fields(task)
    entry = {"result": [], "score": 1.0, "model_version": version}
    scores = []
    for control in config.videos:
        if control.data_key not in data:
            raise RequestError(f"task data has no {control.data_key!r} field (the label config reads ${control.data_key})")
        fps = control.fps(data)
        with tempfile.TemporaryDirectory(dir=workdir, prefix="prelabel-video-") as tmp:
            ref = data[control.data_key]
            path = backend.loader.fetch_file(ref, tid, Path(tmp) / "video")
            with VideoReader(path, str(ref), VideoLimits.from_settings(settings)) as reader:
                info = reader.info
                if on_info is not None:
                    on_info(info)
                if info.fps and abs(info.fps - fps) > RATE_MISMATCH * info.fps:
                    log.warning("task %s: <Video name=%r> has framerate %g but the video runs at %.3f fps: Label "
                                "Studio will step through it at the wrong rate (set framerate=\"%.3f\")",
                                tid, control.to_name, fps, info.fps, info.fps)
                try:
                    tracks, times = engine.track(reader.frames(), ontology, progress, info.fps)
                except PrelabelError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a model failure: this video's task fails, the rest go on
                    log.error("the model failed on video %s", ref, exc_info=exc)
                    raise InferenceError(f"the model failed on video {ref}: {type(exc).__name__}: {exc}") from None
        frames = label_studio_frames(times, fps)
        frames_count = int(frames[-1]) if len(frames) else 0
        for track in (t for t in tracks if t.label in control.labels):
            region = track_region(track, control, frames, info, fps, settings.keyframe_tolerance, frames_count)
            if region is not None:
                entry["result"].append(region)
                scores.append(track.score)
    entry["score"] = round(min(scores), 4) if scores else 1.0
    return entry


def video_entries(backend: LabelStudioBackend, tasks: list, config: ProjectConfig, ontology: Ontology, version: str,
                  progress: Callable[[int], None] | None = None) -> list[dict]:
    """One entry per task (a prediction or `{"task", "error"}`): a bad video fails its task only."""
    from .backend import task_error

    entries = []
    for task in tasks:
        try:
            entries.append(predict_video(backend, task, config, ontology, version, progress))
        except PrelabelError as exc:
            entries.append(task_error(task.get("id") if isinstance(task, dict) else None, exc))
            log.warning("%s", entries[-1]["error"]["message"])
            backend.metrics.error(exc.kind)
    backend.metrics.count("tasks_predicted", sum("error" not in e for e in entries))
    return entries


def annotate_videos(backend: LabelStudioBackend, todo: list[dict], config: ProjectConfig, ontology: Ontology,
                    version: str, sink: Callable[[list, list[dict]], None], report) -> None:
    """`prelabel annotate --project` for a video project: one task at a time, each pushed as soon as it is done
    (a stopped run resumes at the next task), with bars for tasks and for the current video's frames (rate in
    frames per second)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from .backend import task_error

    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns) as bars:
            tasks_bar = bars.add_task("videos", total=len(todo), rate="")
            frames_bar = bars.add_task("frames", total=None, rate="")
            started, frames_done = [0.0], [0]

            def on_info(info: VideoInfo) -> None:
                bars.reset(frames_bar, total=info.frames or None, description=f"frames of {info.source}"[:60])
                started[0], frames_done[0] = time.perf_counter(), 0

            def on_frames(n: int) -> None:
                frames_done[0] += n
                rate = frames_done[0] / max(time.perf_counter() - started[0], 1e-9)
                bars.update(frames_bar, advance=n, rate=f"{rate:.1f} frames/s")

            for task in todo:
                try:
                    entry = predict_video(backend, task, config, ontology, version, on_frames, on_info)
                except PrelabelError as exc:
                    entry = task_error(task.get("id"), exc)
                    backend.metrics.error(exc.kind)
                sink([task], [entry])
                report.add([task], [entry])
                bars.advance(tasks_bar)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        report.seconds = time.perf_counter() - start
