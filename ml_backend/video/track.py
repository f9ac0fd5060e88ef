"""Tracks from a video: the text-prompted detector on every `every`-th frame, a video tracker (SAM 2 video, SAM 3's
tracker) following each object between them.

Per detection frame, detections are matched to the live tracks of their label by box overlap (Hungarian, IoU >=
`match_iou` against each track's box on the frame before, moved on as it moved between its last two frames); a detection that matches none starts a new track, given
to the tracker as a box on that frame. A track ends (the object left) when the tracker has not seen it for more than
`max_gap` frames (a shorter gap is bridged linearly, as Label Studio would), or when `stale_rounds` detection frames
in a row have not confirmed it (the tracker drifted onto something the detector does not call that label); of two
tracks that settle on the same object (IoU >= `duplicate_iou`) the less confirmed one ends. A track's score is the
mean confidence of the detections that confirmed it.

The tracker need not see every frame: with `track_every` k > 1 (from PRELABEL_VIDEO_TRACK_FPS: SAM 2 learnt from
videos annotated at 6 frames per second) it steps on every k-th frame and on detection frames, and the boxes between
are interpolated linearly, as Label Studio and CVAT interpolate between keyframes anyway. Gaps are counted in the
frames the tracker looked at.

Without a tracker the detector runs on every frame and detections are linked by overlap alone (slower, but nothing
more to download).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import supervision as sv
from scipy.optimize import linear_sum_assignment

from ..errors import VideoDecodeError
from ..media import Frame
from ..models.base import Tracker
from ..types import CLASS_NAME


@dataclass
class TrackOptions:
    every: int = 10  # detector every N frames (1 without a tracker)
    track_every: int = 1  # tracker every N frames (and on detection frames); boxes between are interpolated
    match_iou: float = 0.3
    max_gap: int = 5  # frames a tracked object may vanish for (occlusion) before its track ends
    stale_rounds: int = 3
    duplicate_iou: float = 0.85


@dataclass
class VideoTrack:
    """One object over a run of consecutive frames: `boxes[k]` (xyxy pixels) is its box on frame `first + k`;
    `ended`: it left before the video did (Label Studio: the last keyframe is `enabled: false`)."""

    label: str
    first: int
    boxes: np.ndarray
    scores: list[float]
    ended: bool

    @property
    def last(self) -> int:
        return self.first + len(self.boxes) - 1

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0


SKIP = "skip"  # a frame the tracker did not look at (between its steps): interpolated


@dataclass
class _Open:
    label: str
    first: int
    boxes: list = field(default_factory=list)  # per frame: a box, None (looked, not seen) or SKIP
    scores: list[float] = field(default_factory=list)
    stale: int = 0

    def known(self) -> list[int]:
        return [k for k, b in enumerate(self.boxes) if isinstance(b, np.ndarray)]

    def lost(self) -> int:
        """Frames looked at since it was last seen."""
        return sum(b is None for b in self.boxes[self.seen() + 1:])

    def predicted(self) -> np.ndarray | None:
        """Where it should be on the next frame: its last box moved on at the speed between its last two boxes."""
        known = self.known()[-2:]
        if not known:
            return None
        last = self.boxes[known[-1]]
        if len(known) < 2:
            return last
        speed = (last - self.boxes[known[0]]) / (known[1] - known[0])
        return last + speed * (len(self.boxes) - known[-1])

    def seen(self) -> int:
        """Index (into boxes) of the last frame it was seen on."""
        return self.known()[-1]

    def close(self, ended: bool) -> VideoTrack:
        """Up to the last frame seen (or, still there at the end of the video, to its last frame), gaps
        interpolated."""
        stop = self.seen() + 1 if ended or self.lost() else len(self.boxes)
        known = self.known()
        filled = np.array([np.interp(np.arange(stop), known, [self.boxes[k][c] for k in known]) for c in range(4)]).T
        return VideoTrack(self.label, self.first, filled.reshape(-1, 4), self.scores, ended)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return sv.box_iou_batch(np.asarray(a, float), np.asarray(b, float))


class VideoTracking:
    """Follows objects through frames fed one at a time (`feed`), then `finish` gives the tracks."""

    def __init__(self, detect: Callable[[np.ndarray], sv.Detections], tracker: Tracker | None,
                 options: TrackOptions = TrackOptions()):
        self.detect = detect
        self.session = tracker.start() if tracker is not None else None
        self.every = options.every if tracker is not None else 1
        self.track_every = options.track_every if tracker is not None else 1
        self.options = options
        self.open: dict[int, _Open] = {}
        self.done: list[VideoTrack] = []
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self._next_id = 0

    def feed(self, image: np.ndarray) -> None:
        n = self.frames
        if self.size is None:
            self.size = image.shape[:2]
        elif image.shape[:2] != self.size:
            raise VideoDecodeError(f"frame {n} is {image.shape[1]}x{image.shape[0]}, the video's first was "
                                   f"{self.size[1]}x{self.size[0]}")
        new: dict[int, np.ndarray] = {}
        matched: dict[int, np.ndarray] = {}
        if n % self.every and n % self.track_every:  # neither detector nor tracker looks at this frame
            for track in self.open.values():
                track.boxes.append(SKIP)
            self.frames += 1
            return
        if n % self.every == 0:
            matched, new = self._detect(image, n)
        seen = self.session.step(image, new) if self.session is not None else {}
        for tid, track in list(self.open.items()):
            if tid in new:  # the detection is the truth on the frame an object is first seen
                box = new[tid]
            elif self.session is not None:
                box = seen.get(tid, (None, 0.0))[0]
            else:
                box = matched.get(tid)
            track.boxes.append(None if box is None else np.asarray(box, float))
        self.frames += 1
        self._end_lost()

    def _detect(self, image: np.ndarray, n: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        found = self.detect(image)
        names = [str(x) for x in found.data.get(CLASS_NAME, [])]
        ids = list(self.open)
        last = [self.open[t].predicted() for t in ids]
        cost = np.ones((len(ids), len(found)))
        if ids and len(found):
            have = [k for k, b in enumerate(last) if b is not None]
            overlap = np.zeros_like(cost)
            if have:
                overlap[have] = iou_matrix(np.array([last[k] for k in have]), found.xyxy)
            same = np.array([[self.open[t].label == name for name in names] for t in ids])
            cost = np.where(same & (overlap >= self.options.match_iou), 1 - overlap, 1.0 + 1e-6)
        rows, cols = linear_sum_assignment(cost) if cost.size else ([], [])
        matched, used = {}, set()
        for r, c in zip(rows, cols):
            if cost[r, c] <= 1.0:
                track = self.open[ids[r]]
                track.scores.append(float(found.confidence[c]))
                track.stale = 0
                matched[ids[r]] = found.xyxy[c]
                used.add(c)
        for tid in ids:
            if tid not in matched:
                self.open[tid].stale += 1
        new = {}
        taken = [(self.open[t].label, matched.get(t, b)) for t, b in zip(ids, last) if t in matched or b is not None]
        for c in range(len(found)):
            twin = any(label == names[c] and iou_matrix(b[None], found.xyxy[c][None])[0, 0] >= self.options.duplicate_iou
                       for label, b in taken)
            if c not in used and not twin:  # (a second box on a followed object starts nothing)
                tid, self._next_id = self._next_id, self._next_id + 1
                self.open[tid] = _Open(names[c], n, [], [float(found.confidence[c])])
                new[tid] = np.asarray(found.xyxy[c], float)
                taken.append((names[c], new[tid]))
        return matched, new

    def _end_lost(self) -> None:
        gone = []
        for tid, track in self.open.items():
            if not track.known():
                gone.append((tid, None))
            elif track.lost() > self.options.max_gap:
                gone.append((tid, True))
            elif self.session is not None and track.stale >= self.options.stale_rounds:
                gone.append((tid, True))
        live = [(t, tr) for t, tr in self.open.items() if isinstance(tr.boxes[-1], np.ndarray)]
        for i, (a, ta) in enumerate(live):
            for b, tb in live[i + 1:]:
                if ta.label == tb.label and iou_matrix(ta.boxes[-1][None], tb.boxes[-1][None])[0, 0] >= self.options.duplicate_iou:
                    weaker = b if (len(tb.scores), -tb.first) < (len(ta.scores), -ta.first) else a
                    gone.append((weaker, True))
        for tid, ended in dict(gone).items():
            track = self.open.pop(tid)
            if ended is not None:
                self.done.append(track.close(ended))
        if gone and self.session is not None:
            self.session.drop([tid for tid, _ in gone])

    def finish(self) -> list[VideoTrack]:
        """The tracks, by first frame; those still open run to the end of the video."""
        for track in self.open.values():
            if track.known():
                self.done.append(track.close(ended=track.lost() > 0))
        self.open.clear()
        return sorted(self.done, key=lambda t: (t.first, t.label))


def track_frames(frames: Iterable[tuple[Frame, np.ndarray]], detect: Callable[[np.ndarray], sv.Detections],
                 tracker: Tracker | None, options: TrackOptions = TrackOptions(),
                 progress: Callable[[int], None] | None = None) -> tuple[list[VideoTrack], list[float]]:
    """(tracks, each frame's time in seconds) over decoded frames."""
    tracking, times = VideoTracking(detect, tracker, options), []
    for frame, image in frames:
        tracking.feed(image)
        times.append(frame.timestamp if frame.timestamp is not None else float(frame.index))
        if progress is not None:
            progress(1)
    return tracking.finish(), times
