"""Video decoding (ml_backend/video/decode.py) on generated videos: frames and times as encoded, and every kind of
bad video named with its cause."""

from __future__ import annotations

import av
import numpy as np
import pytest

from ml_backend.errors import VideoDecodeError, VideoTooLargeError
from ml_backend.video.decode import VideoLimits, VideoReader, is_variable_rate, timestamps
from ml_backend.video.synthetic import Mover, video_path, write_video

MOVERS = [Mover("car", (20, 40), (300, 200)),
          Mover("person", (300, 30), (10, 200), first=10, last=40, curve=30, shape="circle", colour=(20, 200, 40))]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for codec in ("libx264", "libvpx-vp9", "ffv1"):
        path = video_path(root, f"v-{codec}", codec)
        out[codec] = (path, write_video(path, MOVERS, frames=50, fps=25, codec=codec))
    return out


def _frames(path, **kw):
    with VideoReader(path, limits=VideoLimits(**kw)) as reader:
        return reader.info, list(reader.frames())


@pytest.mark.parametrize("codec", ["libx264", "libvpx-vp9", "ffv1"])
def test_frames_and_times_are_as_encoded(videos, codec):
    path, tracks = videos[codec]
    info, frames = _frames(path)
    assert (info.width, info.height, info.frames, info.fps) == (320, 240, 50, 25.0)
    assert [f.index for f, _ in frames] == list(range(50))
    assert np.allclose([f.timestamp for f, _ in frames], np.arange(50) / 25)
    assert frames[0][1].shape == (240, 320, 3) and frames[0][1].dtype == np.uint8
    # the red square is where its ground-truth box says (lossy codecs blur its edge by a pixel or two)
    x1, y1, x2, y2 = tracks[0].boxes[20].astype(int)
    inside = frames[20][1][y1 + 3:y2 - 3, x1 + 3:x2 - 3].reshape(-1, 3).mean(0)
    assert inside[0] > 180 and inside[1] < 90, inside


def test_every_samples_without_shifting_indices(videos):
    with VideoReader(videos["libx264"][0]) as reader:
        sampled = [(f.index, f.timestamp) for f, _ in reader.frames(every=7)]
    assert sampled == [(i, pytest.approx(i / 25)) for i in range(0, 50, 7)]
    with VideoReader(videos["libx264"][0]) as reader, pytest.raises(ValueError, match="every=0"):
        next(reader.frames(every=0))


def test_variable_frame_rate_keeps_real_times(tmp_path):
    times = np.cumsum(np.r_[0, np.random.default_rng(0).choice([0.033, 0.066], 29)])
    path = tmp_path / "vfr.mp4"
    write_video(path, MOVERS[:1], frames=30, frame_times=list(times))
    decoded = timestamps(path)
    assert np.allclose(decoded, times, atol=1e-3)
    assert is_variable_rate(decoded) and not is_variable_rate(np.arange(30) / 30)


def test_limits_are_checked_before_decoding(videos):
    path = videos["libx264"][0]
    with pytest.raises(VideoTooLargeError, match=r"lasts 2.0 s, over the limit of 1 s \(PRELABEL_MAX_VIDEO_SECONDS\)"):
        VideoReader(path, limits=VideoLimits(seconds=1))
    with pytest.raises(VideoTooLargeError, match=r"320x240 = 76800 pixels per frame, over the limit of 1000"):
        VideoReader(path, limits=VideoLimits(pixels=1000))


@pytest.mark.parametrize("codec", ["libx264", "ffv1"])
def test_truncated_video_is_named(videos, tmp_path, codec):
    data = videos[codec][0].read_bytes()
    cut = tmp_path / f"cut{videos[codec][0].suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoDecodeError, match=rf"video {cut}.*(truncated|corrupt)"):
        _frames(cut)


def test_bad_files_are_named(tmp_path):
    empty, junk, missing = tmp_path / "empty.mp4", tmp_path / "junk.mp4", tmp_path / "missing.mp4"
    empty.write_bytes(b"")
    junk.write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(VideoDecodeError, match="empty.mp4 is empty"):
        VideoReader(empty)
    with pytest.raises(VideoDecodeError, match="junk.mp4 is not a video of a known format"):
        VideoReader(junk)
    with pytest.raises(VideoDecodeError, match="missing.mp4 cannot be read"):
        VideoReader(missing)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="audio.m4a has no video stream \\(it holds audio\\)"):
        VideoReader(path)


def test_unknown_codec_is_named(tmp_path):
    """A Matroska file whose video codec id FFmpeg does not know (the id patched in place)."""
    path = tmp_path / "raw.mkv"
    write_video(path, MOVERS[:1], width=32, height=24, frames=3, codec="ffv1")
    data = path.read_bytes()
    assert data.count(b"V_FFV1") == 1
    path.write_bytes(data.replace(b"V_FFV1", b"V_QQQQ"))
    with pytest.raises(VideoDecodeError, match=r"raw.mkv uses a codec \(.*\) which this FFmpeg build cannot decode"):
        _frames(path)


@pytest.mark.parametrize("suffix, why", [(".mp4", "has no video stream .*zero frames"),
                                         (".mkv", "is not a video of a known format, or is corrupt or truncated")])
def test_zero_frame_video_is_named(tmp_path, suffix, why):
    path = tmp_path / f"none{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoDecodeError, match=f"none{suffix} {why}"):
        _frames(path)
