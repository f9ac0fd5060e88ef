"""CVAT video and frame-sequence tasks pre-annotated as tracks: `prelabel cvat track TASK_ID` reads the task's
frames from the server in order (cvat-sdk), tracks the prompts file's labels over them (`Engine.track`: the
detector every PRELABEL_VIDEO_DETECT_EVERY frames, the tracker between) and uploads each object as one CVAT
rectangle track, in one request.

CVAT numbers a task's frames 0..size-1 (its `start_frame` and frame step are applied before: frame n is frame
`start_frame + n * step` of the video); annotations, `get_frame` and `deleted_frames` all use that numbering.
Deleted frames are not read: a track runs across them, its box there interpolated. A track keeps only the keyframes
CVAT needs so that its linear interpolation stays within PRELABEL_KEYFRAME_TOLERANCE pixels of what was tracked;
an object that left before the task's end gets an `outside` shape on the frame after the last one it was seen on.
CVAT keeps no score on a track: `source` is "auto".
"""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import PIL.Image
from cvat_sdk import models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction

from ..errors import ConfigError, ImageDecodeError, PrelabelError
from ..media import Frame
from ..video.keyframes import keyframes
from ..video.track import VideoTrack

TRACK_LABEL_TYPES = ("any", "rectangle")  # CVAT label types a rectangle track may carry
SOURCE = "auto"


class CvatError(PrelabelError):
    """CVAT refused a request, or cannot be reached."""

    kind = "cvat"
    status = 502


# -- the task's frames ---------------------------------------------------------------------------------------------
def frame_step(frame_filter: str | None) -> int:
    """CVAT's `frame_filter` ("" or "step=N") as a step."""
    if not frame_filter:
        return 1
    match = re.fullmatch(r"\s*step\s*=\s*(\d+)\s*", frame_filter)
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"frame filter {frame_filter!r} is not CVAT's 'step=N'")
    return int(match.group(1))


@dataclass(frozen=True)
class TaskFrames:
    """A task's frames as CVAT numbers them: 0..size-1, `deleted` among them; frame n is frame
    `start_frame + n * step` of the uploaded video or image list."""

    size: int
    deleted: frozenset[int] = frozenset()
    start_frame: int = 0
    step: int = 1

    @classmethod
    def from_meta(cls, meta) -> TaskFrames:
        return cls(int(meta.size), frozenset(int(n) for n in meta.deleted_frames or ()),
                   int(getattr(meta, "start_frame", 0) or 0), frame_step(getattr(meta, "frame_filter", "")))

    @property
    def kept(self) -> list[int]:
        """The frames to read and track, in order (deleted frames left out)."""
        return [n for n in range(self.size) if n not in self.deleted]

    def source_frame(self, n: int) -> int:
        return self.start_frame + n * self.step


# -- labels --------------------------------------------------------------------------------------------------------
def match_labels(names: list[str], task_labels: Iterable, task_id: int | str = "?",
                 allow_unmatched: bool = False, warn: Callable[[str], None] | None = None) -> dict[str, int]:
    """The CVAT label id of each prompts label, matched by name (case-insensitive) among the task's top-level
    labels a rectangle track can carry (type `any` or `rectangle`). A prompts label the task lacks is an error that
    lists both sides, or, with `allow_unmatched`, skipped with a warning; none matching at all is always an error."""
    usable, other = {}, {}
    for label in task_labels:
        if getattr(label, "parent_id", None) is not None:
            continue  # a skeleton's point
        kind = getattr(label, "type", None) or "any"
        (usable if kind in TRACK_LABEL_TYPES else other)[label.name.casefold()] = (label.id, label.name, kind)
    ids, missing = {}, []
    for name in names:
        key = name.casefold()
        if key in usable:
            ids[name] = usable[key][0]
        elif key in other:
            _, cvat_name, kind = other[key]
            raise ConfigError(f"label {cvat_name!r} of CVAT task {task_id} is a {kind} label: tracks are rectangles, "
                              f"so it needs the type 'any' or 'rectangle'")
        else:
            missing.append(name)
    task_names = sorted(v[1] for v in (*usable.values(), *other.values()))
    if missing and (not allow_unmatched or not ids):
        hint = "" if allow_unmatched else " (--allow-unmatched-labels skips them)"
        raise ConfigError(f"labels {missing} of the prompts file are not labels of CVAT task {task_id}, which has "
                          f"{task_names}; rename them in the prompts file or in CVAT{hint}")
    if missing and warn is not None:
        warn(f"skipped: labels {missing} of the prompts file are not labels of CVAT task {task_id} ({task_names})")
    return ids


# -- tracks -> CVAT ------------------------------------------------------------------------------------------------
def boxes_on_cvat_frames(track: VideoTrack, frames: list[int]) -> tuple[int, np.ndarray]:
    """(first CVAT frame, one box per CVAT frame from there to the last): `track.boxes[k]` is on the k-th frame
    fed to tracking, `frames[track.first + k]` in CVAT's numbering; frames skipped between (deleted ones) get the
    box interpolated linearly, as CVAT would show it."""
    boxes = np.asarray(track.boxes, np.float64).reshape(-1, 4)
    numbers = np.asarray(frames[track.first: track.first + len(boxes)], np.float64)
    if len(numbers) != len(boxes):
        raise ValueError(f"track of {track.label!r} runs to position {track.last}, past the {len(frames)} frames fed")
    every = np.arange(numbers[0], numbers[-1] + 1)
    return int(numbers[0]), np.stack([np.interp(every, numbers, boxes[:, c]) for c in range(4)], axis=1)


def track_request(track: VideoTrack, frames: list[int], label_id: int,
                  tolerance: float) -> models.LabeledTrackRequest:
    """One CVAT rectangle track: a shape on each keyframe (linear interpolation between them stays within
    `tolerance` pixels of the tracked boxes), and when the object left before the task's end, an `outside` shape on
    the frame after the last it was seen on."""
    first, boxes = boxes_on_cvat_frames(track, frames)

    def shape(frame: int, box, outside: bool = False) -> models.TrackedShapeRequest:
        return models.TrackedShapeRequest(type="rectangle", frame=frame, points=[float(v) for v in box],
                                          outside=outside, occluded=False, z_order=0, rotation=0.0, attributes=[])

    shapes = [shape(first + k, boxes[k]) for k in keyframes(boxes, tolerance)]
    if track.ended:
        shapes.append(shape(first + len(boxes), boxes[-1], outside=True))
    return models.LabeledTrackRequest(label_id=label_id, frame=first, shapes=shapes, group=0, source=SOURCE,
                                      attributes=[])


def track_requests(tracks: list[VideoTrack], frames: list[int], label_ids: dict[str, int],
                   tolerance: float) -> list[models.LabeledTrackRequest]:
    """Every track of a label in `label_ids` as a CVAT track (in the order given)."""
    return [track_request(t, frames, label_ids[t.label], tolerance) for t in tracks if t.label in label_ids]


# -- the server ----------------------------------------------------------------------------------------------------
@contextmanager
def cvat_errors(url: str, task_id: int | str):
    """cvat-sdk's and urllib3's exceptions as one clear line (a CvatError)."""
    import urllib3
    from cvat_sdk.api_client.exceptions import ApiException, OpenApiException

    try:
        yield
    except ApiException as exc:
        raise CvatError(refusal(exc.status, exc.body, url, task_id)) from None
    except OpenApiException as exc:
        raise CvatError(f"CVAT at {url} answered something cvat-sdk cannot read: {exc}") from None
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CvatError(f"cannot reach CVAT at {url} ({type(reason).__name__}: {reason}): is it running there? "
                        f"Check --url / CVAT_URL") from None


def refusal(status: int | None, body, url: str, task_id: int | str) -> str:
    """CVAT's answer to a refused request, with what to check."""
    detail = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    detail = " ".join(detail.split())[:300]
    if status in (401, 403):
        return (f"CVAT at {url} refused the credentials ({status}: {detail}): check --token / CVAT_ACCESS_TOKEN "
                f"or --user/--password (CVAT_USER/CVAT_PASSWORD), and access to task {task_id}")
    if status == 400 and ("credentials" in detail.lower() or "log in" in detail.lower()):
        return f"CVAT at {url} refused the login ({detail}): check --user/--password (CVAT_USER/CVAT_PASSWORD)"
    if status == 404:
        return f"CVAT at {url} has no task {task_id} (404: {detail}), or this user cannot see it"
    return f"CVAT at {url} answered {status}: {detail}"


def connect(url: str, token: str | None = None, user: str | None = None, password: str | None = None):
    """A logged-in cvat-sdk client: a personal access token, else user and password."""
    from cvat_sdk import make_client

    if token:
        return make_client(url, access_token=token)
    if user and password:
        return make_client(url, credentials=(user, password))
    raise ConfigError("CVAT needs credentials: --token (CVAT_ACCESS_TOKEN), or --user and --password "
                      "(CVAT_USER, CVAT_PASSWORD)")


def read_frames(task, numbers: list[int]) -> Iterator[tuple[Frame, np.ndarray]]:
    """Frames `numbers` of a cvat-sdk task, in order, at original quality, as (Frame, RGB uint8)."""
    from cvat_sdk.api_client.exceptions import ApiException

    for n in numbers:
        try:
            data = task.get_frame(n, quality="original").read()
        except ApiException as exc:
            raise ImageDecodeError(f"frame {n} of CVAT task {task.id}: the server answered {exc.status} "
                                   f"({exc.reason})") from None
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                pixels = np.array(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"frame {n} of CVAT task {task.id} does not decode as an image "
                                   f"({len(data)} bytes): {exc}") from None
        yield Frame(n), pixels


@dataclass
class TrackSummary:
    task_id: int
    frames: TaskFrames
    per_label: Counter = field(default_factory=Counter)
    keyframes: int = 0  # shapes uploaded that are not `outside`
    tracked_frames: int = 0  # frames covered by tracks, summed over tracks
    replaced: bool = False
    seconds: float = 0.0

    @property
    def tracks(self) -> int:
        return sum(self.per_label.values())

    def lines(self) -> list[str]:
        f = self.frames
        frames = f"{f.size} frames" + (f" ({len(f.deleted)} deleted, not read)" if f.deleted else "")
        labels = ", ".join(f"{name} {n}" for name, n in sorted(self.per_label.items())) or "none"
        verb = "replaced the task's annotations with" if self.replaced else "added"
        return [f"task {self.task_id}: {verb} {self.tracks} tracks over {frames} in {self.seconds:.1f} s",
                f"tracks per label: {labels}",
                f"keyframes: {self.keyframes} for {self.tracked_frames} tracked frames"]


def summarize(summary: TrackSummary, requests: list[models.LabeledTrackRequest], names: dict[int, str]) -> None:
    for request in requests:
        summary.per_label[names[request.label_id]] += 1
        shapes = [s for s in request.shapes if not s.outside]
        summary.keyframes += len(shapes)
        summary.tracked_frames += shapes[-1].frame - shapes[0].frame + 1


@dataclass
class CvatTask:
    """A cvat-sdk task with the CVAT label id of each prompts label to track, and its frames."""

    task: object
    label_ids: dict[str, int]
    frames: TaskFrames

    @property
    def id(self) -> int:
        return self.task.id


def open_task(client, task_id: int, names: list[str], allow_unmatched: bool = False,
              warn: Callable[[str], None] | None = None) -> CvatTask:
    """CVAT task `task_id`, its labels matched to the prompts labels `names` (see `match_labels`), and its frames."""
    if not names:
        raise ConfigError("no labels to track: pass a prompts file with --prompts (see prompts/example.yaml)")
    task = client.tasks.retrieve(task_id)
    if getattr(task, "dimension", "2d") == "3d":
        raise ConfigError(f"CVAT task {task_id} is a 3D task: its tracks would be cuboids, not rectangles")
    label_ids = match_labels(names, task.get_labels(), task_id, allow_unmatched, warn)
    frames = TaskFrames.from_meta(task.get_meta())
    if not frames.kept:
        raise ConfigError(f"CVAT task {task_id} has no frames to track ({frames.size} frames, all deleted)")
    return CvatTask(task, label_ids, frames)


def track_task(opened: CvatTask, engine, tolerance: float, replace: bool = False,
               progress: Callable[[int, int], Callable[[int], None]] | None = None) -> TrackSummary:
    """Track the matched labels over the task's frames and upload them as tracks in one request (added to its
    annotations, or replacing them with `replace`). `progress(total_frames, frames_done)` returns the per-frame
    callback."""
    start = time.perf_counter()
    numbers = opened.frames.kept
    tick = progress(len(numbers), 0) if progress else None
    tracks, _ = engine.track(read_frames(opened.task, numbers), engine.ontology(list(opened.label_ids)), tick)
    requests = track_requests(tracks, numbers, opened.label_ids, tolerance)
    if replace:
        opened.task.set_annotations(models.LabeledDataRequest(version=0, tags=[], shapes=[], tracks=requests))
    else:
        opened.task.update_annotations(models.PatchedLabeledDataRequest(tracks=requests),
                                       action=AnnotationUpdateAction.CREATE)
    summary = TrackSummary(opened.id, opened.frames, replaced=replace)
    summarize(summary, requests, {i: name for name, i in opened.label_ids.items()})
    summary.seconds = time.perf_counter() - start
    return summary


@contextmanager
def frames_bar(task_id: int):
    """A rich bar over the frames read and tracked (rate in frames per second): yields `progress` for
    `track_task`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bars:
        def progress(total: int, done: int) -> Callable[[int], None]:
            bar, started, count = bars.add_task(f"frames of task {task_id}", total=total, completed=done, rate=""), time.perf_counter(), [0]

            def tick(n: int) -> None:
                count[0] += n
                bars.update(bar, advance=n, rate=f"{count[0] / max(time.perf_counter() - started, 1e-9):.1f} frames/s")

            return tick

        yield progress
