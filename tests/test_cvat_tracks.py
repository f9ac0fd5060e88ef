"""`prelabel cvat track`: CVAT video and frame-sequence tasks pre-annotated as tracks. The conversion (tracks ->
cvat-sdk track requests) is checked exactly; the whole flow runs cvat-sdk against a loopback server that answers
the REST calls it makes as CVAT's serializers shape them (CVAT itself needs Docker), on tiny random models."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from urllib.parse import parse_qs

import numpy as np
import pytest
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.cvat.tracks import TaskFrames, boxes_on_cvat_frames, frame_step, match_labels, track_request
from ml_backend.engine import Engine
from ml_backend.errors import ConfigError
from ml_backend.media import Frame
from ml_backend.settings import Settings
from ml_backend.video.keyframes import interpolate
from ml_backend.video.synthetic import Mover, render
from ml_backend.video.track import VideoTrack

from .conftest import free_port
from .cvat_server import H, PASSWORD, TOKEN, USER, W, CvatLikeServer, png

PROMPTS = "box_threshold: 0.0\ntext_threshold: 0.0\nlabels:\n  car: [car]\n  Person: person\n  Bicycle: bicycle\n"


# -- the conversion, exactly ---------------------------------------------------------------------------------------
def curved_track(first=0, n=30, ended=True, label="Car") -> VideoTrack:
    t = np.arange(n, dtype=float)
    x, y = 10 + 4 * t, 20 + 0.15 * t**2
    return VideoTrack(label, first, np.stack([x, y, x + 30, y + 20 + 0.1 * t], 1), [0.5] * n, ended)


def shown_by_cvat(request) -> dict[int, np.ndarray]:
    """The box CVAT shows on each frame of a track: linear between keyframes, none from an `outside` shape on."""
    shapes = [s for s in request.shapes if not s.outside]
    frames, boxes = [s.frame for s in shapes], np.array([s.points for s in shapes])
    return {f: interpolate(frames, boxes, f) for f in range(frames[0], frames[-1] + 1)}


@pytest.mark.parametrize("tolerance", [0.0, 0.5, 2.0, 8.0])
def test_keyframes_reproduce_the_track_within_tolerance_and_the_object_leaves_after_its_last_frame(tolerance):
    track = curved_track(first=5)
    request = track_request(track, list(range(60)), label_id=7, tolerance=tolerance)
    assert request.label_id == 7 and request.frame == 5 and request.source == "auto" and request.group == 0
    frames = [s.frame for s in request.shapes]
    assert frames == sorted(set(frames)) and frames[0] == 5
    assert all(s.type.value == "rectangle" and not s.occluded for s in request.shapes)
    shown = shown_by_cvat(request)
    assert sorted(shown) == list(range(5, 35))
    assert max(np.abs(shown[5 + k] - track.boxes[k]).max() for k in range(30)) <= tolerance + 1e-9
    *kept, outside = request.shapes
    assert outside.outside and outside.frame == 35 and not any(s.outside for s in kept)
    assert kept[-1].frame == 34 and kept[-1].points == pytest.approx(track.boxes[-1].tolist())
    if tolerance == 0:
        assert len(kept) == 30  # a curve: every frame is a keyframe
    if tolerance == 8.0:
        assert len(kept) < 8


def test_a_straight_track_needs_two_keyframes_and_one_that_runs_to_the_end_no_outside_shape():
    boxes = np.array([[10 + 3 * k, 5, 40 + 3 * k, 25] for k in range(20)], float)
    request = track_request(VideoTrack("Car", 0, boxes, [0.9] * 20, ended=False), list(range(20)), 3, 2.0)
    assert [(s.frame, s.outside) for s in request.shapes] == [(0, False), (19, False)]
    assert request.shapes[1].points == [67.0, 5.0, 97.0, 25.0]


def test_deleted_frames_are_crossed_with_the_box_interpolated_and_frames_are_cvat_numbers():
    # CVAT frames 0..19 with 7, 8 and 15 deleted: the tracker saw the others; the track starts at the 3rd frame fed
    kept = [n for n in range(20) if n not in (7, 8, 15)]
    seen = kept[2:14]  # CVAT frames 2..16 without the deleted ones: 12 boxes
    boxes = np.array([[2 * n, n, 2 * n + 10, n + 10] for n in seen], float)
    track = VideoTrack("Person", 2, boxes, [0.7] * len(seen), ended=True)
    first, every = boxes_on_cvat_frames(track, kept)
    assert first == 2 and len(every) == 16 - 2 + 1
    assert every[7 - 2].tolist() == [14, 7, 24, 17]  # a deleted frame: on the line through its neighbours
    request = track_request(track, kept, label_id=1, tolerance=0.5)
    assert [(s.frame, s.outside) for s in request.shapes] == [(2, False), (16, False), (17, True)]
    shown = shown_by_cvat(request)
    assert all(np.allclose(shown[n], [2 * n, n, 2 * n + 10, n + 10]) for n in seen)


def test_a_track_past_the_frames_fed_is_refused():
    with pytest.raises(ValueError, match="past the 3 frames"):
        boxes_on_cvat_frames(curved_track(first=1, n=5), [0, 1, 2])


def test_frame_filters_and_task_frames_follow_cvat_numbering():
    assert frame_step("") == 1 and frame_step(None) == 1 and frame_step("step=3") == 3
    for bad in ("step=0", "every=2", "step=x"):
        with pytest.raises(ConfigError, match="frame filter"):
            frame_step(bad)
    meta = SimpleNamespace(size=6, deleted_frames=[1, 4], start_frame=10, frame_filter="step=5")
    frames = TaskFrames.from_meta(meta)
    assert frames.kept == [0, 2, 3, 5] and frames.source_frame(3) == 25


def label(id, name, type="any", parent_id=None):
    return SimpleNamespace(id=id, name=name, type=type, parent_id=parent_id)


def test_labels_match_by_name_case_insensitively_and_a_missing_one_is_an_error_listing_both_sides():
    task = [label(4, "Car", "rectangle"), label(5, "person"), label(6, "wheel", "points", parent_id=4),
            label(7, "Weather", "tag")]
    assert match_labels(["car", "Person"], task, 12) == {"car": 4, "Person": 5}
    with pytest.raises(ConfigError) as error:
        match_labels(["car", "Bicycle"], task, 12)
    assert "['Bicycle']" in str(error.value) and "['Car', 'Weather', 'person']" in str(error.value)
    assert "task 12" in str(error.value) and "--allow-unmatched-labels" in str(error.value)
    warnings = []
    assert match_labels(["car", "Bicycle"], task, 12, allow_unmatched=True, warn=warnings.append) == {"car": 4}
    assert len(warnings) == 1 and "Bicycle" in warnings[0]
    with pytest.raises(ConfigError, match="not labels of CVAT task 12"):
        match_labels(["Bicycle"], task, 12, allow_unmatched=True)  # nothing left to track
    with pytest.raises(ConfigError, match="'Weather' of CVAT task 12 is a tag label"):
        match_labels(["weather"], task, 12)


# -- a CVAT-like server --------------------------------------------------------------------------------------------
MOVERS = [Mover("car", (20, 30), (140, 90), size=(30, 20)),
          Mover("person", (140, 20), (30, 100), size=(14, 26), first=6, last=20, shape="circle", colour=(20, 200, 40))]
SOURCE_FRAMES = [image for image, _ in render(MOVERS, W, H, 40)]


@pytest.fixture
def cvat():
    server = CvatLikeServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    """Tiny detector settings (boxes on every frame at threshold 0, two at most) and the prompts file."""
    root = tmp_path_factory.mktemp("cvat-track")
    prompts = root / "prompts.yaml"
    prompts.write_text(PROMPTS)
    env = {"PRELABEL_MAX_DETECTIONS": "2", "MODEL_DIR": str(root / "model-dir"), "HF_HUB_OFFLINE": "1"}
    settings = Settings(detector=str(tiny_models["detector"]), segmenter="", tracker="none", max_detections=2,
                        prompts=prompts, model_dir=root / "model-dir")
    return SimpleNamespace(prompts=prompts, env=env, detector=str(tiny_models["detector"]), settings=settings)


def run_track(cvat, setup, task_id, *args, **env):
    args = ["cvat", "track", str(task_id), "--url", cvat.url, "--prompts", str(setup.prompts),
            "--detector", setup.detector, "--tracker", "none", *args]
    return CliRunner().invoke(app, args, env=setup.env | env, catch_exceptions=False)


def video_task(cvat, task_id=21, deleted=(5, 6)):
    # a video task starting at source frame 4, every 2nd frame: CVAT frame n is source frame 4 + 2n
    frames = [png(SOURCE_FRAMES[4 + 2 * n]) for n in range(16)]
    cvat.add_task(task_id, [(11, "Car", "rectangle"), (12, "person", "any"), (13, "Weather", "tag")], frames,
                  start_frame=4, step=2, deleted=deleted)
    return [n for n in range(16) if n not in deleted]


def direct_tracks(setup, numbers: list[int]):
    """What the engine tracks on those CVAT frames when asked directly (the same pixels, the same models)."""
    engine = Engine.from_settings(setup.settings)
    frames = ((Frame(n), SOURCE_FRAMES[4 + 2 * n]) for n in numbers)
    return engine.track(frames, engine.ontology(["car", "Person"]))[0]


# -- the whole flow ------------------------------------------------------------------------------------------------
def test_a_video_task_gets_one_track_per_object_in_one_request_on_cvat_frames(cvat, setup):
    kept = video_task(cvat)
    result = run_track(cvat, setup, 21, "--allow-unmatched-labels", CVAT_ACCESS_TOKEN=TOKEN)
    assert result.exit_code == 0, result.output
    assert "Bicycle" in result.output  # the prompts label the task lacks: skipped, with a warning
    assert cvat.frames_read(21) == [(n, "original") for n in kept]  # in order, deleted frames not read
    [(method, query, body)] = cvat.written
    assert method == "PATCH" and parse_qs(query) == {"action": ["create"]}
    expected = direct_tracks(setup, kept)
    tracks = body["tracks"]
    assert len(tracks) == len(expected) > 0
    tolerance = setup.settings.keyframe_tolerance
    for track, want in zip(tracks, expected):
        assert track["label_id"] == {"car": 11, "Person": 12}[want.label] and track["source"] == "auto"
        shapes = track["shapes"]
        assert track["frame"] == shapes[0]["frame"] == kept[want.first]
        assert all(s["type"] == "rectangle" and 0 <= s["frame"] < 16 for s in shapes)
        request = SimpleNamespace(shapes=[SimpleNamespace(**s) for s in shapes])
        shown = shown_by_cvat(request)
        for k, box in enumerate(want.boxes):  # CVAT's interpolation reproduces the track on every frame it was seen
            assert np.abs(shown[kept[want.first + k]] - box).max() <= tolerance + 1e-6
        last_seen = kept[want.last]
        assert [s["frame"] for s in shapes if s["outside"]] == ([last_seen + 1] if want.ended else [])
        assert max(s["frame"] for s in shapes if not s["outside"]) == last_seen
    per_label = sorted(Counter(want.label for want in expected).items())
    keyframes = sum(not s["outside"] for t in tracks for s in t["shapes"])
    assert f"added {len(tracks)} tracks over 16 frames (2 deleted, not read)" in result.output
    assert "tracks per label: " + ", ".join(f"{name} {n}" for name, n in per_label) in result.output
    assert f"keyframes: {keyframes} for" in result.output


def test_replace_puts_the_tracks_as_the_tasks_only_annotations_after_a_password_login(cvat, setup):
    frames = [png(image) for image in SOURCE_FRAMES[:6]]
    cvat.add_task(3, [(1, "CAR", "any"), (2, "Person", "any"), (3, "bicycle", "rectangle")], frames, mode="annotation")
    result = run_track(cvat, setup, 3, "--replace", CVAT_USER=USER, CVAT_PASSWORD=PASSWORD)
    assert result.exit_code == 0, result.output
    [(method, query, body)] = cvat.written
    assert method == "PUT" and query == "" and body["shapes"] == [] and body["tags"] == []
    assert body["tracks"] and {t["label_id"] for t in body["tracks"]} <= {1, 2, 3}
    assert ("POST", "/api/auth/login") in cvat.seen
    assert "task 3: replaced the task's annotations with" in result.output


@pytest.mark.parametrize("case, env, message", [
    ("token", {"CVAT_ACCESS_TOKEN": "wrong"}, "refused the credentials (401: {\"detail\": \"Invalid token.\"})"),
    ("password", {"CVAT_USER": USER, "CVAT_PASSWORD": "wrong"}, "refused the login"),
    ("none", {}, "CVAT needs credentials"),
    ("task", {"CVAT_ACCESS_TOKEN": TOKEN}, "has no task 99"),
    ("labels", {"CVAT_ACCESS_TOKEN": TOKEN}, "labels ['Bicycle'] of the prompts file are not labels of CVAT task 21"),
])
def test_errors_are_one_line_and_exit_2_before_any_model_loads(cvat, setup, case, env, message):
    video_task(cvat)
    result = run_track(cvat, setup, 99 if case == "task" else 21, **env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert cvat.written == []


@pytest.mark.slow  # waits out cvat-sdk's retries (the full suite runs it)
def test_an_unreachable_server_and_a_frame_that_does_not_decode_are_named(cvat, setup):
    result = CliRunner().invoke(app, ["cvat", "track", "5", "--url", f"http://127.0.0.1:{free_port()}",
                                      "--token", TOKEN, "--prompts", str(setup.prompts)], env=setup.env)
    assert result.exit_code == 2 and "cannot reach CVAT at http://127.0.0.1:" in result.output, result.output
    frames = [png(image) for image in SOURCE_FRAMES[:5]]
    frames[3] = b"\x89PNG not really"
    cvat.add_task(8, [(1, "car", "any"), (2, "person", "any"), (3, "bicycle", "any")], frames)
    result = run_track(cvat, setup, 8, CVAT_ACCESS_TOKEN=TOKEN)
    assert result.exit_code == 2 and "frame 3 of CVAT task 8 does not decode" in result.output, result.output
    assert cvat.written == []


def test_a_tiny_sam2_video_tracker_follows_objects_between_detection_frames(cvat, setup, tmp_path):
    from ml_backend.models.registry import tiny_kinds, write_tiny

    if "sam2-video" not in tiny_kinds():
        pytest.skip("no tiny sam2-video tracker in this checkout")
    tracker = write_tiny(tmp_path / "tiny", ["sam2-video"])["sam2-video"]
    kept = video_task(cvat, deleted=(9,))
    args = ["cvat", "track", "21", "--url", cvat.url, "--prompts", str(setup.prompts), "--detector", setup.detector,
            "--tracker", tracker, "--allow-unmatched-labels"]
    env = setup.env | {"CVAT_ACCESS_TOKEN": TOKEN, "PRELABEL_VIDEO_DETECT_EVERY": "5"}
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert cvat.frames_read(21) == [(n, "original") for n in kept]
    [(method, _, body)] = cvat.written
    tracks = body["tracks"]
    assert method == "PATCH" and tracks and {t["label_id"] for t in tracks} <= {11, 12}
    for track in tracks:
        frames = [s["frame"] for s in track["shapes"]]
        assert frames == sorted(set(frames)) and track["frame"] == frames[0] and 0 <= frames[0] and frames[-1] < 16
        assert all(s["outside"] == (k == len(frames) - 1) for k, s in enumerate(track["shapes"]) if s["outside"])
    # the tracker carries objects across frames the detector did not run on: some track spans several frames
    assert max(t["shapes"][-1]["frame"] - t["frame"] for t in tracks) >= 2
