"""CVAT tracker function (nuclio, `metadata.annotations.type: tracker`) over SAM 2 video or SAM 3's tracker. The
`cvat_nuclio/sam2_tracker/main.py` shell only calls this.

CVAT sends `{"image": base64, "shapes": [[x1, y1, x2, y2], ...], "states": [...]}` for one frame and wants
`{"shapes": [...], "states": [...]}`, one each per input shape, in order; it keeps each state and sends it back with
the shape on the next frame. A SAM 2 memory is far too large for that round trip, so it stays here: a state is
`{"key": session key, "step": frames tracked, "width", "height"}`, the sessions are kept in an LRU of bounded count
(PRELABEL_TRACKER_SESSIONS), and a shape whose state is null, missing, unknown here (evicted, or the function
restarted), of another frame size or of an earlier step (CVAT went back and tracks again from there) starts a new
session from that shape on this frame. The image is encoded once per request and shared by every shape's session.
Bad bodies get status 400 naming the problem (`serverless.respond`).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, RequestError
from ..models import build_tracker, pick_device
from ..models.sam2_video import MemoryTracking, StreamingSession, check_box
from ..settings import Settings
from .serverless import _parse, decode_base64_image

SESSIONS_ENV = "PRELABEL_TRACKER_SESSIONS"  # tracks kept server-side at once (least recently used go first)
DEFAULT_SESSIONS = 32
OBJECT = 0  # one object per session: one CVAT track

Box = tuple[float, float, float, float]


class TrackBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str
    shapes: list[Box]
    states: list[dict[str, Any] | None] = Field(default_factory=list)


@dataclass
class Track:
    session: StreamingSession
    step: int  # frames answered, as the state sent with the last answer says


class TrackerFunction:
    """One SAM 2-style session per CVAT track, kept server-side under the key its state carries."""

    def __init__(self, tracker: MemoryTracking, max_sessions: int = DEFAULT_SESSIONS, max_pixels: int = 80_000_000):
        if not isinstance(tracker, MemoryTracking):
            raise ConfigError(f"the tracker function needs a SAM 2-style video tracker, not {type(tracker).__name__}")
        if max_sessions < 1:
            raise ConfigError(f"{SESSIONS_ENV}={max_sessions} must be at least 1")
        self.tracker, self.max_sessions, self.max_pixels = tracker, max_sessions, max_pixels
        base = tracker.tracker_core()
        self._core = replace(base, features=self._frame_features)
        self._encode = base.features
        self._features: tuple | None = None  # this request's frame, encoded once for every session
        self._frame: np.ndarray | None = None
        self._tracks: OrderedDict[str, Track] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, function_dir: Path | None = None) -> TrackerFunction:
        """PRELABEL_TRACKER (SAM 2 video, or SAM 3), PRELABEL_DEVICE, PRELABEL_PRECISION, PRELABEL_TRACKER_SESSIONS."""
        settings = Settings()
        if not settings.tracker:
            raise ConfigError("the tracker function needs a tracker: set PRELABEL_TRACKER (e.g. facebook/sam2.1-hiera-tiny)")
        raw = os.environ.get(SESSIONS_ENV, str(DEFAULT_SESSIONS))
        try:
            sessions = int(raw)
        except ValueError:
            raise ConfigError(f"{SESSIONS_ENV}={raw!r} is not a whole number") from None
        tracker = build_tracker(settings.tracker, settings.model_dir, pick_device(settings.device),
                                precision=settings.precision)
        return cls(tracker, sessions, settings.max_image_pixels)

    def _frame_features(self, frame: np.ndarray):
        if self._features is None or frame is not self._frame:
            self._frame, self._features = frame, self._encode(frame)
        return self._features

    @property
    def sessions(self) -> int:
        return len(self._tracks)

    def __call__(self, body: Any) -> dict:
        req = _parse(TrackBody, body)
        if len(req.states) > len(req.shapes):
            raise RequestError(f"{len(req.states)} states for {len(req.shapes)} shapes: give one state (or null) per shape")
        frame = decode_base64_image(req.image, self.max_pixels).array
        h, w = frame.shape[:2]
        boxes = [check_box(shape, w, h, f"shapes[{i}]") for i, shape in enumerate(req.shapes)]
        shapes, states = [], []
        with self._lock:
            try:
                for box, shape, state in zip(boxes, req.shapes, [*req.states, *[None] * len(req.shapes)]):
                    key, track = self._find(state, w, h)
                    if track is None:  # a new track: this frame's box is the user's; the tracker starts from it
                        key, track = uuid.uuid4().hex, Track(StreamingSession(self._core), 0)
                        track.session.step(frame, {OBJECT: box})
                        out = list(shape)
                    else:
                        found, _ = track.session.step(frame)[OBJECT]
                        # lost (no mask, or SAM 2 says absent): the shape stays where it was last seen, as CVAT needs
                        # one shape per input; the state stays too, so the track may pick the object up again later
                        out = list(shape) if found is None else [round(float(v), 2) for v in found]
                    track.step += 1
                    self._keep(key, track)
                    shapes.append(out)
                    states.append({"key": key, "step": track.step, "width": w, "height": h})
            finally:
                self._frame = self._features = None
        return {"shapes": shapes, "states": states}

    def _find(self, state: dict | None, width: int, height: int) -> tuple[str | None, Track | None]:
        """The live track a state names, or (None, None) where it must start again."""
        if not state:
            return None, None
        key = state.get("key")
        track = self._tracks.get(key) if isinstance(key, str) else None
        if track is None or (state.get("width"), state.get("height")) != (width, height) or state.get("step") != track.step:
            return None, None
        return key, track

    def _keep(self, key: str, track: Track) -> None:
        self._tracks[key] = track
        self._tracks.move_to_end(key)
        while len(self._tracks) > self.max_sessions:
            self._tracks.popitem(last=False)  # its memory goes with it; its state will start a new track
