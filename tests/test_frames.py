"""`prelabel frames` (issue 18, point 5): the frames worth labeling from generated videos, counted exactly where the
video makes the count exact; the manifest against the decoder; resuming; bad videos; the output as `up` lists it."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.video.decode import VideoLimits, timestamps
from ml_backend.video.frames import (
    MANIFEST,
    VIDEOS,
    EmbeddingSimilarity,
    PHash,
    Sampling,
    extract_frames,
    output_names,
    phash,
)
from ml_backend.video.synthetic import Mover
from ml_backend.video.synthetic import write_video as _write_video

W, H = 320, 240
KEEP_ALL = PHash(-1)  # no distance is <= -1: every sampled frame is kept (the CLI refuses a negative threshold)


def cuts(frames_per_segment: int = 10) -> list[Mover]:
    """Three still segments with hard cuts: a big square on the left, a big circle on the right, then the
    background alone."""
    n = frames_per_segment
    return [Mover("a", (80, 120), (80, 120), size=(140, 200), first=0, last=n - 1),
            Mover("b", (240, 60), (240, 60), size=(150, 100), first=n, last=2 * n - 1, shape="circle",
                  colour=(40, 40, 230))]


def write_video(path, *args, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_video(path, *args, **kwargs)


def manifest(out) -> list[dict]:
    with (out / MANIFEST).open() as f:
        return list(csv.DictReader(f))


def run(source, out, measure=None, sampling=Sampling()):
    return extract_frames(source, out, measure or PHash(), sampling, progress=False)


def test_phash_is_stable_under_noise_and_far_across_a_cut():
    rng = np.random.default_rng(0)
    image = np.zeros((240, 320, 3), np.uint8)
    image[:, :160] = 200
    image[60:180, 200:300] = (30, 90, 200)
    noisy = (image + rng.normal(0, 4, image.shape)).clip(0, 255).astype(np.uint8)
    other = np.zeros_like(image)
    other[:120] = 200
    other[140:220, 20:120] = (200, 60, 30)
    flat = [(rng.normal(20, 8, image.shape)).clip(0, 255).astype(np.uint8) for _ in range(2)]
    assert (phash(image) ^ phash(noisy)).bit_count() <= 2
    assert (phash(flat[0]) ^ phash(flat[1])).bit_count() <= 2  # a dark noisy still scene stays one scene
    assert (phash(image) ^ phash(other)).bit_count() > 10
    assert 0 <= phash(image) < 2**64


def test_three_still_segments_with_hard_cuts_keep_exactly_three_frames_at_the_cuts(tmp_path):
    video = tmp_path / "cuts.mp4"
    write_video(video, cuts(), W, H, frames=30, fps=25)
    report = run(video, tmp_path / "out")
    rows = manifest(tmp_path / "out")
    assert [int(r["frame"]) for r in rows] == [0, 10, 20]
    assert [r["reason"] for r in rows] == ["first", "changed", "changed"]
    assert rows[0]["vs_last_kept"] == "" and all(float(r["vs_last_kept"]) > 10 for r in rows[1:])
    times = timestamps(video)
    assert [float(r["timestamp_s"]) for r in rows] == pytest.approx([times[0], times[10], times[20]], abs=1e-6)
    for r in rows:
        assert r["file"] == f"cuts_f{int(r['frame']):06d}_t{float(r['timestamp_s']):08.3f}.jpg"
        with Image.open(tmp_path / "out" / r["file"]) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (W, H), "RGB")
    (v,) = report.videos
    assert (v.status, v.sampled, v.kept, v.dropped, report.saved) == ("done", 30, 3, 27, 0.9)


@pytest.mark.parametrize("frames", [1, 40])
def test_a_still_video_keeps_exactly_one_frame(tmp_path, frames):
    video = tmp_path / "still.mp4"
    write_video(video, [], W, H, frames=frames)
    report = run(video, tmp_path / "out")
    assert [int(r["frame"]) for r in manifest(tmp_path / "out")] == [0]
    assert (report.total("sampled"), report.total("kept")) == (frames, 1)


def test_slow_drift_keeps_a_frame_each_time_it_has_moved_far_enough_from_the_last_kept(tmp_path):
    video = tmp_path / "drift.mp4"
    write_video(video, [Mover("a", (40, 120), (280, 120), size=(80, 80))], W, H, frames=60)
    run(video, tmp_path / "out", PHash(10))
    rows = manifest(tmp_path / "out")
    assert 3 <= len(rows) < 30  # consecutive frames differ by less than the threshold: they are not all kept
    assert all(float(r["vs_last_kept"]) > 10 for r in rows[1:])
    strict = run(video, tmp_path / "strict", PHash(2))
    assert strict.total("kept") > len(rows)


def test_variable_rate_timestamps_come_from_the_decoder_and_fps_sampling_follows_them(tmp_path):
    video = tmp_path / "vfr.mp4"
    times = np.cumsum([0] + [0.02 if i % 3 else 0.12 for i in range(29)]).tolist()
    write_video(video, cuts(), W, H, frames=30, frame_times=times)
    decoded = timestamps(video)
    run(video, tmp_path / "out")
    rows = manifest(tmp_path / "out")
    assert [int(r["frame"]) for r in rows] == [0, 10, 20]
    assert [float(r["timestamp_s"]) for r in rows] == pytest.approx(decoded[[0, 10, 20]], abs=1e-6)
    report = run(video, tmp_path / "by-time", KEEP_ALL, Sampling(fps=4))
    kept = [int(r["frame"]) for r in manifest(tmp_path / "by-time")]
    expected, due = [], 0.0  # each the first frame at least 1/4 s after the one before
    for index, t in enumerate(decoded):
        if t >= due - 1e-6:
            expected.append(index)
            due = t + 0.25
    assert kept == expected and report.total("sampled") == len(kept) == 6


def test_every_nth_frame_is_sampled_and_odd_frame_sizes_are_kept(tmp_path):
    video = tmp_path / "odd.mkv"
    write_video(video, cuts(), 161, 121, frames=30, codec="ffv1")
    report = run(video, tmp_path / "out", KEEP_ALL, Sampling(every=7))
    rows = manifest(tmp_path / "out")
    assert [int(r["frame"]) for r in rows] == [0, 7, 14, 21, 28] and report.total("sampled") == 5
    with Image.open(tmp_path / "out" / rows[-1]["file"]) as image:
        assert image.size == (161, 121)


def test_a_rerun_skips_finished_videos_and_redoes_changed_or_incomplete_ones(tmp_path):
    for name in ("a", "b"):
        write_video(tmp_path / "in" / f"{name}.mp4", cuts(), W, H, frames=30)
    out = tmp_path / "out"
    first = run(tmp_path / "in", out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jpg")}
    again = run(tmp_path / "in", out)
    assert [v.status for v in again.videos] == ["skipped", "skipped"]
    assert (again.total("kept"), again.total("sampled")) == (first.total("kept"), first.total("sampled")) == (6, 60)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jpg")} == stamps
    (out / manifest(out)[0]["file"]).unlink()  # a.mp4 lost a frame: done again
    assert [v.status for v in run(tmp_path / "in", out).videos] == ["done", "skipped"]
    changed = run(tmp_path / "in", out, PHash(64))  # other settings: every video again, old frames replaced
    assert [v.status for v in changed.videos] == ["done", "done"]
    assert len(manifest(out)) == len(list(out.glob("*.jpg"))) == 2


def test_a_bad_video_in_a_folder_is_named_the_others_done_and_the_output_is_what_up_imports(tmp_path):
    from ml_backend.labelstudio.annotate import image_files
    from ml_backend.labelstudio.stack import IMAGE_SUFFIXES

    folder = tmp_path / "videos"
    write_video(folder / "cam1" / "clip.mp4", cuts(), W, H, frames=30)
    write_video(folder / "still.webm", [], W, H, frames=10, codec="libvpx-vp9")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["frames", str(folder), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "broken.mp4" in result.output and "corrupt" in result.output
    assert "4 of 40 sampled frames kept, 36 dropped (90.0 % fewer to label)" in result.output
    assert "2 done" in result.output and "1 failed" in result.output
    rows = manifest(out)
    assert {r["video"] for r in rows} == {"cam1/clip.mp4", "still.webm"}
    # Label Studio's local-files storage (as `up` connects it) lists the folder itself, not subfolders, by that regex
    listed = sorted(p.name for p in out.glob("*") if p.is_file() and re.match(IMAGE_SUFFIXES, p.name))
    assert listed == sorted(r["file"] for r in rows) and listed[0].startswith("cam1__clip_f000000_t")
    assert [p.name for p in image_files(out)] == listed  # and folder-mode annotate
    with (out / VIDEOS).open() as f:
        assert sorted(r["video"] for r in csv.DictReader(f)) == ["cam1/clip.mp4", "still.webm"]
    rerun = CliRunner().invoke(app, ["frames", str(folder), "--out", str(out)], terminal_width=200)
    assert rerun.exit_code == 1 and "2 done before (skipped)" in rerun.output


@pytest.mark.parametrize("args, message", [
    (["--every", "0"], "--every 0"),
    (["--fps", "-2"], "--fps -2"),
    (["--every", "2", "--fps", "2"], "both given"),
    (["--threshold", "-1"], "--threshold -1"),
    (["--threshold", "65"], "0..64"),
    (["--method", "embedding", "--threshold", "1.5"], "(0, 1]"),
    (["--method", "ssim"], "--method 'ssim'"),
])
def test_bad_options_fail_with_a_message_naming_them(tmp_path, args, message):
    write_video(tmp_path / "v.mp4", [], W, H, frames=2)
    result = CliRunner().invoke(app, ["frames", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "out"), *args],
                                terminal_width=200)
    assert result.exit_code == 2 and message in result.output, result.output


def test_missing_and_empty_inputs_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "nope.mp4", "neither a video nor a folder"), (tmp_path / "empty", "holds no videos")):
        result = CliRunner().invoke(app, ["frames", str(path), "--out", str(tmp_path / "out")], terminal_width=200)
        assert result.exit_code == 2 and str(path) in result.output and message in result.output


def test_a_video_over_the_limits_is_reported_by_name(tmp_path):
    write_video(tmp_path / "in" / "long.mp4", [], W, H, frames=50, fps=25)
    report = extract_frames(tmp_path / "in", tmp_path / "out", PHash(), Sampling(), VideoLimits(seconds=1.0),
                            progress=False)
    (v,) = report.videos
    assert v.status == "failed" and "long.mp4" in v.error and "limit" in v.error and not report.ok
    report = extract_frames(tmp_path / "in", tmp_path / "out2", PHash(), Sampling(), max_bytes=100, progress=False)
    assert "over the limit of 100" in report.videos[0].error


def test_videos_sharing_a_name_get_distinct_file_prefixes(tmp_path):
    paths = [tmp_path / p for p in ("a/clip.mp4", "b/clip.mp4", "clip.mp4", "clip.mov", "odd name!.mkv")]
    names = output_names(paths, tmp_path)
    assert list(names.values()) == ["a__clip", "b__clip", "clip_mp4", "clip_mov", "odd_name_"]


def test_the_embedding_method_on_a_tiny_sam(tmp_path, tiny_models):
    from ml_backend.models import build_embedder, pick_device

    encoder = build_embedder(str(tiny_models["segmenter"]), tmp_path, pick_device("cpu"))
    write_video(tmp_path / "still.mp4", [], W, H, frames=6)
    write_video(tmp_path / "cuts.mp4", cuts(3), W, H, frames=9)
    run(tmp_path / "still.mp4", tmp_path / "still", EmbeddingSimilarity(encoder, 0.95))
    assert [(r["frame"], r["method"]) for r in manifest(tmp_path / "still")] == [("0", "embedding")]
    run(tmp_path / "cuts.mp4", tmp_path / "all", EmbeddingSimilarity(encoder, 1.0))  # only identical ones dropped
    rows = manifest(tmp_path / "all")
    assert {0, 3, 6} <= {int(r["frame"]) for r in rows}
    assert all(-1 <= float(r["vs_last_kept"]) < 1.0 for r in rows[1:])
    result = CliRunner().invoke(app, ["frames", str(tmp_path / "still.mp4"), "--out", str(tmp_path / "cli"), "--method",
                                      "embedding", "--embedder", str(tiny_models["segmenter"]), "--device", "cpu"],
                                terminal_width=200)
    assert result.exit_code == 0 and "1 of 6 sampled frames kept" in result.output, result.output
