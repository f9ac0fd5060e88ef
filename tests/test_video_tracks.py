"""From frames to tracks to Label Studio regions (ml_backend/video/track.py, labelstudio/video.py), checked exactly
on generated videos. The detector here is the video's own ground truth (a function of the frame, as the pipeline
takes any detector): what is under test is association, track starts and ends, gap bridging, duplicates, the
mapping onto Label Studio's frames and the keyframes; the models' side is tested in test_tracker.py and the
Label Studio round trip in test_video_labelstudio.py."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.labelstudio.config import VideoControl
from ml_backend.labelstudio.video import label_studio_frames, track_region
from ml_backend.types import make_detections
from ml_backend.video.decode import VideoInfo, VideoReader
from ml_backend.video.keyframes import interpolate
from ml_backend.video.synthetic import Mover, write_video
from ml_backend.video.track import TrackOptions, track_frames

W, H, N = 320, 240, 40
MOVERS = [Mover("car", (30, 40), (290, 200)),  # whole video, straight
          Mover("person", (290, 30), (40, 210), first=8, last=30, curve=40, shape="circle", colour=(20, 200, 40)),
          Mover("car", (60, 200), (260, 60), first=15, size=(30, 24), colour=(40, 40, 230))]  # a second car, late


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "street.mp4"
    return path, write_video(path, MOVERS, W, H, N, fps=25)


def truth_detector(truth, drop=(), duplicate=False):
    """Detections from the ground truth of frame n (n counts calls); `drop`: (mover, frame) pairs left out."""
    calls = iter(range(10**6))

    def detect(image):
        n = next(calls)
        boxes, names = [], []
        for k, track in truth.items():
            if track.first <= n < track.first + len(track.boxes) and (k, n) not in drop:
                boxes.append(track.boxes[n - track.first])
                names.append(track.label)
                if duplicate and k == 0:
                    boxes.append(track.boxes[n - track.first] + [1, 0, 1, 0])
                    names.append(track.label)
        return make_detections(np.array(boxes).reshape(-1, 4), np.linspace(0.9, 0.6, len(boxes)),
                               np.zeros(len(boxes), int), names)

    return detect


def _tracks(path, detect, **options):
    with VideoReader(path) as reader:
        return track_frames(reader.frames(), detect, None, TrackOptions(**options))


def test_tracks_follow_the_truth_exactly(video):
    path, truth = video
    tracks, times = _tracks(path, truth_detector(truth))
    assert len(times) == N and np.allclose(times, np.arange(N) / 25)
    assert [(t.label, t.first, len(t.boxes), t.ended) for t in tracks] == [
        ("car", 0, 40, False), ("person", 8, 23, True), ("car", 15, 25, False)]
    for track, k in zip(tracks, [0, 1, 2]):
        assert np.array_equal(track.boxes, truth[k].boxes)


def test_short_gaps_are_bridged_and_long_ones_end_the_track(video):
    path, truth = video
    short = {(1, n) for n in range(12, 15)}  # the person missed on 3 frames
    tracks, _ = _tracks(path, truth_detector(truth, drop=short), max_gap=5)
    person = next(t for t in tracks if t.label == "person")
    assert (person.first, len(person.boxes)) == (8, 23)
    assert np.abs(person.boxes - truth[1].boxes).max() < 12  # the bridge is linear; the path curves a little
    long = {(1, n) for n in range(12, 20)}
    tracks, _ = _tracks(path, truth_detector(truth, drop=long), max_gap=5)
    people = [t for t in tracks if t.label == "person"]
    assert [(t.first, t.last, t.ended) for t in people] == [(8, 11, True), (20, 30, True)]


def test_a_doubled_detection_makes_one_track(video):
    path, truth = video
    tracks, _ = _tracks(path, truth_detector(truth, duplicate=True))
    assert [(t.label, t.first) for t in tracks] == [("car", 0), ("person", 8), ("car", 15)]


def test_regions_reproduce_the_track_at_every_label_studio_frame(video):
    path, truth = video
    tracks, times = _tracks(path, truth_detector(truth))
    info = VideoInfo(str(path), W, H, 25.0, N / 25, N, "h264")
    control = VideoControl("box", "video", "video", ("car", "person"), "25")
    frames = label_studio_frames(times, 25.0)
    assert list(frames) == list(range(1, N + 1))
    for track, k in zip(tracks, [0, 1, 2]):
        region = track_region(track, control, frames, info, 25.0, 2.0, N)
        value = region["value"]
        assert region["type"] == "videorectangle" and value["labels"] == [truth[k].label]
        assert (value["framesCount"], value["duration"]) == (N, N / 25)
        seq = value["sequence"]
        assert seq[0]["frame"] == truth[k].first + 1 and seq[0]["time"] == truth[k].first / 25
        assert seq[-1]["enabled"] is (not track.ended) and all(s["enabled"] for s in seq[:-1])
        assert len(seq) < len(truth[k].boxes) / 3  # straight and gently curved paths: few keyframes
        kf = [s["frame"] for s in seq]
        pct = np.array([[s["x"], s["y"], s["x"] + s["width"], s["y"] + s["height"]] for s in seq])
        for n, box in enumerate(truth[k].boxes):
            shown = interpolate(kf, pct, truth[k].first + n + 1) * [W / 100, H / 100, W / 100, H / 100]
            assert np.abs(shown - box).max() <= 2.0 + 1e-6


def test_frames_map_by_time_onto_label_studio_frames():
    """Label Studio frame k shows time (k-1)/framerate: a 30 fps config on frames at 0, 1/15, 2/15 s (a variable
    or halved rate) puts them on frames 1, 3, 5, and the track is resampled on every frame between."""
    times = [0.0, 1 / 15, 2 / 15, 0.2]
    frames = label_studio_frames(times, 30.0)
    assert list(frames) == [1, 3, 5, 7]
    from ml_backend.video.track import VideoTrack

    track = VideoTrack("car", 0, np.array([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10]], float),
                       [0.8], ended=False)
    info = VideoInfo("v", 100, 100, 15.0, 0.27, 4, "h264")
    region = track_region(track, VideoControl("box", "video", "video", ("car",), "30"), frames, info, 30.0, 0.0, 7)
    seq = region["value"]["sequence"]
    assert seq[0]["frame"] == 1 and seq[-1]["frame"] == 7
    assert np.allclose([s["time"] for s in seq], [(s["frame"] - 1) / 30 for s in seq])


def test_config_framerate_from_task_data():
    control = VideoControl("box", "video", "video", ("car",), "$fps")
    assert control.fps({"fps": "29.97"}) == 29.97
    with pytest.raises(Exception, match=r"framerate='\$fps'>: '' is not a number"):
        control.fps({})
    with pytest.raises(Exception, match="must be positive"):
        VideoControl("box", "video", "video", ("car",), "0").fps({})


def test_video_configs_parse_and_bad_ones_are_named():
    from ml_backend.errors import ConfigError
    from ml_backend.labelstudio.config import parse_config

    config = parse_config('<View><Video name="v" value="$clip" framerate="$fps"/><VideoRectangle name="box" toName="v"/>'
                          '<Labels name="l" toName="v"><Label value="Car" predicted_values="car,truck"/>'
                          '<Label value="Exclude"/></Labels><TextArea name="note" toName="v"/></View>')
    assert config.videos == [VideoControl("box", "v", "clip", ("Car",), "$fps")]
    assert config.labels == ["Car"] and config.predicted_values == {"Car": ["car", "truck"]}
    assert config.others == ("note",) and not config.controls
    with pytest.raises(ConfigError, match=r"<VideoRectangle name='box'> on <Video name='v'> has no <Labels>"):
        parse_config('<View><Video name="v" value="$clip"/><VideoRectangle name="box" toName="v"/></View>')
    with pytest.raises(ConfigError, match=r"<Video name='v'> must take its URL from task data"):
        parse_config('<View><Video name="v" value="http://x/a.mp4"/><VideoRectangle name="box" toName="v"/>'
                     '<Labels name="l" toName="v"><Label value="Car"/></Labels></View>')
    assert parse_config('<View><Video name="v" value="$clip"/><VideoRectangle name="box" toName="v"/><Labels name="l" '
                        'toName="v"><Label value="Car"/></Labels></View>').videos[0].fps({}) == 24.0  # Label Studio's default


class TruthTracker:
    """A tracker that knows the video (its ground truth): an object given by a box follows the mover whose box that
    is. It stands for a tracker that never errs, so that what is checked is how the pipeline uses one: which frames
    it steps on, how the boxes between are filled, when tracks end. `clock()` says which frame is being fed."""

    model_id = "truth"

    def __init__(self, truth, clock):
        self.truth, self.clock, self.stepped = truth, clock, []

    def start(self):
        tracker, objects = self, {}

        class Session:
            def step(self, frame, new=None):
                n = tracker.clock()
                tracker.stepped.append(n)
                for obj, box in (new or {}).items():
                    objects[obj] = next(k for k, t in tracker.truth.items()
                                        if t.first <= n < t.first + len(t.boxes) and np.allclose(t.boxes[n - t.first], box))
                out = {}
                for obj, k in objects.items():
                    t = tracker.truth[k]
                    seen = t.first <= n < t.first + len(t.boxes)
                    out[obj] = (t.boxes[n - t.first] if seen else None, float(seen))
                return out

            def drop(self, ids):
                for obj in ids:
                    objects.pop(obj, None)

        return Session()


def test_the_tracker_steps_on_every_kth_frame_and_detection_frames_and_the_rest_is_interpolated(video):
    from ml_backend.video.track import VideoTracking

    path, truth = video
    fed: list[int] = []
    tracker = TruthTracker(truth, lambda: fed[-1])
    tracking = VideoTracking(lambda image: truth_boxes(truth, fed[-1]), tracker, TrackOptions(every=8, track_every=3))
    with VideoReader(path) as reader:
        for n, (_, image) in enumerate(reader.frames()):
            fed.append(n)
            tracking.feed(image)
    tracks = tracking.finish()
    assert tracker.stepped == [n for n in range(N) if n % 3 == 0 or n % 8 == 0]
    assert [(t.label, t.first, t.last, t.ended) for t in tracks] == [
        ("car", 0, 39, False), ("person", 8, 30, True), ("car", 16, 39, False)]
    for track, k in zip(tracks, [0, 1, 2]):
        start = track.first - truth[k].first
        off = np.abs(track.boxes - truth[k].boxes[start:start + len(track.boxes)]).max()
        assert off < 8, off  # exact where it stepped, linear between (the person's path bends a little)
        stepped = [n - track.first for n in tracker.stepped if track.first <= n <= track.last]
        assert np.array_equal(track.boxes[stepped], truth[k].boxes[start:][stepped])


def truth_boxes(truth, n):
    boxes, names = [], []
    for track in truth.values():
        if track.first <= n < track.first + len(track.boxes):
            boxes.append(track.boxes[n - track.first])
            names.append(track.label)
    return make_detections(np.array(boxes).reshape(-1, 4), np.full(len(boxes), 0.8), np.zeros(len(boxes), int), names)
