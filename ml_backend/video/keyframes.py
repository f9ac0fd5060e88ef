"""Keyframes a person can edit: from a per-frame track, only the frames Label Studio needs so that its linear
interpolation between keyframes stays within a tolerance of the track, instead of one keyframe per frame.

A track is a run of consecutive frames with one xyxy pixel box each. Greedy: from a keyframe, extend to the farthest
frame such that interpolating between the two reproduces every frame between within `tolerance` pixels (each box
coordinate), then start again from there. The first and last frames of a run are always keyframes; the last one of a
run that ends before the video does is `enabled: false` (Label Studio stops the box there).
"""

from __future__ import annotations

import numpy as np

DEFAULT_TOLERANCE = 2.0  # pixels


def _fits(boxes: np.ndarray, start: int, end: int, tolerance: float) -> bool:
    """Does interpolating between frames `start` and `end` of the run stay within `tolerance` of every frame between?"""
    if end - start < 2:
        return True
    t = (np.arange(start + 1, end) - start)[:, None] / (end - start)
    between = boxes[start] + t * (boxes[end] - boxes[start])
    return bool(np.abs(between - boxes[start + 1 : end]).max() <= tolerance)


def keyframes(boxes: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> list[int]:
    """Indices (into the run) of the keyframes of a run of per-frame boxes (N, 4)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if tolerance < 0:
        raise ValueError(f"keyframe tolerance {tolerance} must be >= 0 pixels")
    if len(boxes) == 0:
        return []
    kept, start = [0], 0
    while start < len(boxes) - 1:
        end = start + 1
        while end + 1 < len(boxes) and _fits(boxes, start, end + 1, tolerance):
            end += 1
        kept.append(end)
        start = end
    return kept


def interpolate(frames: list[int], boxes: np.ndarray, frame: int) -> np.ndarray:
    """The box Label Studio shows at `frame` between keyframes (`frames` ascending, `boxes` theirs)."""
    boxes = np.asarray(boxes, np.float64)
    at = int(np.searchsorted(frames, frame, side="right")) - 1
    if at < 0 or frame > frames[-1]:
        raise ValueError(f"frame {frame} is outside the keyframes {frames[0]}..{frames[-1]}")
    if frames[at] == frame or at == len(frames) - 1:
        return boxes[at]
    t = (frame - frames[at]) / (frames[at + 1] - frames[at])
    return boxes[at] + t * (boxes[at + 1] - boxes[at])


def sequence(first_frame: int, boxes: np.ndarray, width: int, height: int, fps: float,
             tolerance: float = DEFAULT_TOLERANCE, ends: bool = True) -> list[dict]:
    """A Label Studio `videorectangle` `sequence` for a run of per-frame pixel boxes starting at `first_frame`
    (1-based, as Label Studio counts): keyframes in percent of the frame, `time` (frame - 1) / fps; `ends`: the object
    leaves after the run (its last keyframe is `enabled: false`)."""
    if fps <= 0:
        raise ValueError(f"frame rate {fps} must be positive")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = []
    kept = keyframes(boxes, tolerance)
    for n, k in enumerate(kept):
        x1, y1, x2, y2 = boxes[k]
        frame = first_frame + k
        out.append({"frame": frame, "enabled": not (ends and n == len(kept) - 1), "rotation": 0,
                    "x": 100 * x1 / width, "y": 100 * y1 / height,
                    "width": 100 * (x2 - x1) / width, "height": 100 * (y2 - y1) / height,
                    "time": (frame - 1) / fps})
    return out
