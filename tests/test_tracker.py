"""Video trackers (models/sam2_video.py, SAM 3's tracker in models/sam3.py) on tiny random models, offline: the
`TrackSession` contract on a generated moving square, objects starting on later frames, drop, bounded memory (and
that bounding it changes nothing), bad frames and boxes, the registry and the `--tracker` flag.

With random weights the boxes mean nothing, so the contract is tested, not accuracy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.errors import ConfigError, ModelUnavailableError, RequestError
from ml_backend.models import build_tracker
from ml_backend.models.registry import TRACKER, find, tiny_kinds
from ml_backend.models.sam2_video import MAX_COND_FRAMES, Sam2Video, StreamingSession
from ml_backend.models.sam3 import Sam3
from ml_backend.models.tiny import write_tiny_sam2_video, write_tiny_sam3

W, H = 96, 64
CPU = torch.device("cpu")


def square_frame(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame i of a generated video: a bright square moving right and down on a dark background, and its box."""
    frame = np.full((H, W, 3), 30, np.uint8)
    x, y = 5 + 2 * i, 8 + i
    frame[y : y + 16, x : x + 20] = (230, 200, 40)
    return frame, np.array([x, y, x + 20, y + 16], np.float32)


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory) -> Path:
    return write_tiny_sam2_video(tmp_path_factory.mktemp("tiny") / "sam2-video")


@pytest.fixture(scope="module")
def tracker(sam2_dir, tmp_path_factory) -> Sam2Video:
    return build_tracker(str(sam2_dir), tmp_path_factory.mktemp("model-dir"), CPU)


def check_answer(answer: dict, live: set[int]) -> None:
    assert set(answer) == live
    for box, score in answer.values():
        assert 0.0 <= score <= 1.0
        if box is not None:
            x1, y1, x2, y2 = box.tolist()
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, box


def counting(tracker) -> tuple[StreamingSession, list[int]]:
    """A session whose image encoder passes are counted."""
    calls: list[int] = []
    core = tracker.tracker_core()

    def features(frame):
        calls.append(1)
        return core.features(frame)

    return StreamingSession(replace(core, features=features)), calls


def test_a_moving_square_is_followed_one_entry_per_live_object_and_one_encoder_pass_per_frame(tracker):
    session, encoded = counting(tracker)
    live: set[int] = set()
    for i in range(20):
        frame, box = square_frame(i)
        new = {1: box} if i == 0 else ({2: [60, 40, 90, 60]} if i == 7 else None)  # object 2 starts on frame 7
        live |= set(new or ())
        check_answer(session.step(frame, new), live)
    assert len(encoded) == 20 and session.objects == [1, 2]


def test_drop_frees_an_object_and_a_session_following_nothing_costs_nothing(tracker):
    session, encoded = counting(tracker)
    frame, box = square_frame(0)
    check_answer(session.step(frame, {1: box, 2: [60, 40, 90, 60], 3: [10, 40, 30, 60]}), {1, 2, 3})
    session.drop([2, 99])  # an unknown id is ignored
    assert session.objects == [1, 3] and len(session.state.output_dict_per_obj) == 2
    for i in range(1, 4):
        check_answer(session.step(square_frame(i)[0]), {1, 3})
    session.drop([1, 3])
    assert session.step(square_frame(4)[0]) == {} and len(encoded) == 4  # nothing followed: no encoder pass
    check_answer(session.step(square_frame(5)[0], {2: square_frame(5)[1]}), {2})  # an id may start again
    assert session.stored_frames()["outputs"] == 1


def test_memory_stays_bounded_over_60_frames_and_pruning_changes_nothing(tracker):
    bounded, full = tracker.start(), StreamingSession(tracker.tracker_core(), keep_history=True)
    config = tracker.model.config
    sizes = []
    for i in range(60):
        frame, box = square_frame(i % 20)
        new = {1: box, 2: [60, 40, 90, 60]} if i == 0 else None
        a, b = bounded.step(frame, new), full.step(frame, new)
        assert {k: v[1] for k, v in a.items()} == {k: v[1] for k, v in b.items()}, f"frame {i}"
        assert all((x[0] is None) == (y[0] is None) and (x[0] is None or np.array_equal(x[0], y[0]))
                   for x, y in zip(a.values(), b.values()))
        sizes.append(bounded.stored_frames())
    per_object_outputs = max(config.max_object_pointers_in_encoder, config.num_maskmem) + 1  # + its prompted frame
    assert sizes[-1] == sizes[30]  # flat after the window fills
    assert sizes[-1]["frames"] == 1 and sizes[-1]["memories"] == 2 * (config.num_maskmem + 1)
    assert sizes[-1]["outputs"] <= 2 * per_object_outputs and sizes[-1]["tracked"] <= 2 * per_object_outputs
    assert full.stored_frames()["frames"] == 60 and full.stored_frames()["outputs"] == 120


def test_prompting_an_object_again_keeps_its_first_and_latest_prompts_only(tracker):
    session = tracker.start()
    for i in range(10):
        frame, box = square_frame(i)
        check_answer(session.step(frame, {1: box}), {1})  # e.g. a detector confirming the object every frame
    prompted = session.state.output_dict_per_obj[0]["cond_frame_outputs"]
    assert sorted(prompted) == [0, *range(10 - MAX_COND_FRAMES + 1, 10)]


@pytest.mark.parametrize("frame, problem", [
    (np.zeros((H, W + 1, 3), np.uint8), f"frame 1 is {W + 1}x{H} but this video's frames are {W}x{H}"),
    (np.zeros((H, W, 3), np.float32), "frame 1: expected an RGB uint8 HxWx3 array, got float32"),
    (np.zeros((H, W), np.uint8), "frame 1: expected an RGB uint8 HxWx3 array"),
])
def test_a_frame_of_another_size_or_kind_is_refused_by_its_index(tracker, frame, problem):
    session = tracker.start()
    session.step(square_frame(0)[0], {1: square_frame(0)[1]})
    with pytest.raises(RequestError, match=problem.replace("(", r"\(")):
        session.step(frame)
    check_answer(session.step(square_frame(1)[0]), {1})  # the session goes on


@pytest.mark.parametrize("box, problem", [
    ([30, 10, 30, 40], r"object 3: box \[30.0, 10.0, 30.0, 40.0\] has no area"),
    ([50, 40, 20, 60], "object 3: box .* has no area"),
    ([float("nan"), 1, 5, 5], "object 3: box .* has no area"),
    ([200, 10, 220, 40], f"object 3: box .* lies outside the {W}x{H} frame"),
    ([1, 2, 3], r"object 3: box .* is not 4 numbers"),
])
def test_a_box_without_area_or_outside_the_frame_names_its_object(tracker, box, problem):
    session = tracker.start()
    with pytest.raises(RequestError, match=problem):
        session.step(square_frame(0)[0], {1: square_frame(0)[1], 3: box})
    assert session.objects == [] and session.frame_index == -1  # nothing was started


def test_the_registry_finds_the_tracker_families_and_refuses_other_models(sam2_dir, tmp_path, tiny_models):
    family, path = find(str(sam2_dir), tmp_path, TRACKER)
    assert family.name == "sam2_video" and path == sam2_dir and family.build is Sam2Video
    assert "sam2-video" in tiny_kinds() and TRACKER in find(str(sam2_dir), tmp_path, TRACKER)[0].roles
    with pytest.raises(ModelUnavailableError, match="is a 'grounding-dino' model; supported: video trackers.*sam2_video"):
        build_tracker(str(tiny_models["detector"]), tmp_path, CPU)
    with pytest.raises(ModelUnavailableError, match="is a 'sam2_video' model; supported: open-vocabulary detectors"):
        find(str(sam2_dir), tmp_path, "detector")


def test_half_precision_is_for_cuda_only(sam2_dir, tmp_path):
    tracker = build_tracker(str(sam2_dir), tmp_path, CPU, precision="bfloat16")
    assert tracker.dtype == torch.float32 and next(tracker.model.parameters()).dtype == torch.float32


def test_sam3s_tracker_follows_objects_on_sam3s_backbone(tmp_path):
    path = write_tiny_sam3(tmp_path / "sam3", width=128)  # the width SAM 3's video memory needs (see tiny.py)
    tracker = build_tracker(str(path), tmp_path, CPU)
    assert isinstance(tracker, Sam3) and tracker.tracker_core() is tracker.tracker_core()
    bounded, full = tracker.start(), StreamingSession(tracker.tracker_core(), keep_history=True)
    for i in range(12):
        frame, box = square_frame(i)
        new = {5: box} if i == 0 else ({6: [60, 40, 90, 60]} if i == 3 else None)
        a, b = bounded.step(frame, new), full.step(frame, new)
        check_answer(a, {5} | ({6} if i >= 3 else set()))
        assert {k: v[1] for k, v in a.items()} == {k: v[1] for k, v in b.items()}
    bounded.drop([5])
    check_answer(bounded.step(square_frame(12)[0]), {6})
    assert bounded.stored_frames()["frames"] == 1
    # served as detector and tracker (`--detector X --tracker X`), SAM 3 is one model: it finds and follows
    from ml_backend.engine import Engine
    from ml_backend.media import Frame
    from ml_backend.ontology import PromptsFile
    from ml_backend.settings import Settings

    engine = Engine(tracker, None, PromptsFile.model_validate({"box_threshold": 0.0, "labels": {"Car": "car"}}),
                    Settings(detector=str(path), segmenter="", tracker=str(path), model_dir=tmp_path,
                             video_detect_every=3, max_detections=2))
    assert engine.tracker() is tracker
    tracks, times = engine.track(((Frame(i, i / 10), square_frame(i)[0]) for i in range(7)), engine.ontology())
    assert times == [i / 10 for i in range(7)] and tracks
    for t in tracks:
        assert t.label == "Car" and 0 <= t.first and t.last <= 6 and t.boxes.shape == (t.last - t.first + 1, 4)


def test_a_detector_only_sam3_checkpoint_cannot_track(tmp_path):
    from transformers import Sam3Model

    path = write_tiny_sam3(tmp_path / "sam3")
    detector_only = tmp_path / "sam3-image"
    Sam3Model.from_pretrained(path).save_pretrained(detector_only)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "preprocessor_config.json"):
        if (path / name).exists():
            (detector_only / name).write_bytes((path / name).read_bytes())
    tracker = build_tracker(str(detector_only), tmp_path, CPU)
    with pytest.raises(ConfigError, match="detector-only SAM 3 checkpoint .* video tracking needs"):
        tracker.start()


def test_the_tracker_flag_names_the_model_fetched_and_none_fetches_none(sam2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    fetched = CliRunner().invoke(app, ["fetch", "--detector", "none", "--segmenter", "none", "--tracker", str(sam2_dir)])
    assert fetched.exit_code == 0 and f"tracker: {sam2_dir} -> {sam2_dir}" in fetched.output, fetched.output
    none = CliRunner().invoke(app, ["fetch", "--detector", "none", "--segmenter", "none", "--tracker", "none"])
    assert none.exit_code == 0 and "tracker" not in none.output, none.output
    for command in ("serve", "up", "annotate", "fetch"):
        assert "--tracker" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output, command


def test_dev_tiny_models_writes_a_small_sam2_video_tracker(tmp_path):
    written = CliRunner().invoke(app, ["dev", "tiny-models", str(tmp_path), "--kind", "sam2-video"])
    assert written.exit_code == 0 and f"sam2-video: {tmp_path / 'sam2-video'}" in written.output, written.output
    tracker = build_tracker(str(tmp_path / "sam2-video"), tmp_path, CPU)
    assert isinstance(tracker, Sam2Video) and sum(p.numel() for p in tracker.model.parameters()) < 2_000_000
    check_answer(tracker.start().step(square_frame(0)[0], {4: square_frame(0)[1]}), {4})
