"""Keyframe compression for video tracks (issue 18, point 2): checked exactly against the per-frame track."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.video.keyframes import interpolate, keyframes, sequence


def track(points: list[tuple[int, tuple[float, float]]], size=(40.0, 30.0)) -> np.ndarray:
    """Per-frame boxes moving piecewise linearly through (frame, (x, y)) waypoints, plus a little jitter."""
    frames = np.arange(points[-1][0] + 1)
    xs = np.interp(frames, [f for f, _ in points], [p[0] for _, p in points])
    ys = np.interp(frames, [f for f, _ in points], [p[1] for _, p in points])
    return np.stack([xs, ys, xs + size[0], ys + size[1]], 1)


def assert_within(boxes: np.ndarray, kept: list[int], tolerance: float) -> None:
    for frame in range(len(boxes)):
        shown = interpolate(kept, boxes[kept], frame)
        assert np.abs(shown - boxes[frame]).max() <= tolerance + 1e-9, frame


@pytest.mark.parametrize("tolerance", [0.0, 0.5, 2.0, 10.0])
def test_interpolating_the_keyframes_reproduces_every_frame_within_the_tolerance(tolerance):
    rng = np.random.default_rng(0)
    boxes = track([(0, (0, 0)), (30, (300, 20)), (45, (310, 200)), (90, (20, 180))])
    boxes += rng.normal(0, 0.6, boxes.shape)  # a tracker's wobble
    kept = keyframes(boxes, tolerance)
    assert kept[0] == 0 and kept[-1] == len(boxes) - 1 and kept == sorted(set(kept))
    assert_within(boxes, kept, tolerance)
    if tolerance >= 2.0:
        assert len(kept) <= 15  # three straight stretches with wobble: a few keyframes each, not 91


def test_straight_motion_needs_two_keyframes_and_each_turn_one_more():
    assert keyframes(track([(0, (0, 0)), (50, (100, 50))]), 0.01) == [0, 50]
    assert keyframes(track([(0, (0, 0)), (20, (100, 0)), (40, (100, 80))]), 0.01) == [0, 20, 40]
    assert keyframes(np.zeros((1, 4))) == [0] and keyframes(np.zeros((0, 4))) == []


def test_a_label_studio_sequence_in_percent_with_time_and_the_end():
    boxes = track([(0, (0, 0)), (10, (100, 0))], size=(50, 40))
    seq = sequence(5, boxes, width=200, height=100, fps=25.0)
    assert [k["frame"] for k in seq] == [5, 15] and [k["enabled"] for k in seq] == [True, False]
    assert seq[0] | {} == {"frame": 5, "enabled": True, "rotation": 0, "x": 0.0, "y": 0.0, "width": 25.0,
                           "height": 40.0, "time": 4 / 25}
    assert seq[1]["x"] == pytest.approx(50.0) and seq[1]["time"] == pytest.approx(14 / 25)
    assert sequence(1, boxes, 200, 100, 25.0, ends=False)[-1]["enabled"] is True
    with pytest.raises(ValueError, match="frame rate 0"):
        sequence(1, boxes, 200, 100, 0)
    with pytest.raises(ValueError, match="tolerance -1"):
        keyframes(boxes, -1)
