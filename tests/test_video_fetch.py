"""Videos fetched for Label Studio tasks (LabelStudioImageSource.fetch_file): uploads, cloud presign redirects and
local files, streamed into a file under the video size limit, over real HTTP (the Label-Studio-like host of
conftest.py)."""

from __future__ import annotations

import base64

import pytest

from ml_backend.errors import ImageAuthError, ImageFetchError, VideoTooLargeError
from ml_backend.labelstudio.images import LabelStudioImageSource
from ml_backend.settings import Settings
from ml_backend.video.synthetic import Mover, write_video

from .conftest import LEGACY_TOKEN


@pytest.fixture(scope="module")
def clip(image_dir):
    path = image_dir / "videos-fetch" / "clip.mp4"
    write_video(path, [Mover("car", (20, 20), (100, 60), size=(16, 12))], 128, 96, 8)
    return path


def source(ls_host, **settings) -> LabelStudioImageSource:
    return LabelStudioImageSource(Settings(label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN, **settings))


@pytest.mark.parametrize("ref", ["/data/upload/videos-fetch/clip.mp4", "s3://bucket/videos-fetch/clip.mp4"])
def test_upload_and_cloud_videos_stream_into_a_file(ls_host, clip, tmp_path, ref):
    loader = source(ls_host)
    try:
        got = loader.fetch_file(ref, 7, tmp_path / "v")
    finally:
        loader.close()
    assert got == tmp_path / "v" and got.read_bytes() == clip.read_bytes()


def test_local_files_are_read_where_they_lie(ls_host, clip, image_dir, tmp_path):
    loader = LabelStudioImageSource(Settings(local_files_document_root=image_dir))
    try:
        assert loader.fetch_file("/data/local-files/?d=videos-fetch/clip.mp4", 1, tmp_path / "v") == clip.resolve()
        with pytest.raises(VideoTooLargeError, match="over the download limit of 100 bytes \\(PRELABEL_MAX_VIDEO_BYTES\\)"):
            LabelStudioImageSource(Settings(local_files_document_root=image_dir, max_video_bytes=100)).fetch_file(
                "/data/local-files/?d=videos-fetch/clip.mp4", 1, tmp_path / "v")
    finally:
        loader.close()


def test_limits_auth_and_forms_are_named(ls_host, clip, tmp_path):
    small = source(ls_host, max_video_bytes=1000)
    with pytest.raises(VideoTooLargeError, match=r"video /data/upload/videos-fetch/clip.mp4 is \d+ bytes, over the "
                                                 r"download limit of 1000 bytes \(PRELABEL_MAX_VIDEO_BYTES\)"):
        small.fetch_file("/data/upload/videos-fetch/clip.mp4", 1, tmp_path / "v")
    wrong = LabelStudioImageSource(Settings(label_studio_url=ls_host.url, label_studio_api_key="0" * 40))
    with pytest.raises(ImageAuthError, match="refused video /data/upload/videos-fetch/clip.mp4"):
        wrong.fetch_file("/data/upload/videos-fetch/clip.mp4", 1, tmp_path / "v")
    with pytest.raises(ImageFetchError, match="video URL 'ftp://x/clip.mp4' has an unsupported form"):
        small.fetch_file("ftp://x/clip.mp4", 1, tmp_path / "v")
    with pytest.raises(ImageFetchError, match="answered HTTP 404"):
        small.fetch_file("/data/upload/videos-fetch/none.mp4", 1, tmp_path / "v")
    data = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    assert source(ls_host).fetch_file(data, 1, tmp_path / "d").read_bytes() == clip.read_bytes()
    for loader in (small, wrong):
        loader.close()
