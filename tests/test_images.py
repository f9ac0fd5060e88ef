"""Image sources Label Studio uses, tokens going only where they belong, and decoding limits."""

from __future__ import annotations

import pytest

from ml_backend.errors import ImageAuthError, ImageFetchError, ImageTooLargeError
from ml_backend.labelstudio.images import LabelStudioImageSource
from ml_backend.settings import Settings

from .conftest import ACCESS, LEGACY_TOKEN, PAT


def loader(**values) -> LabelStudioImageSource:
    return LabelStudioImageSource(Settings(**values))


@pytest.mark.parametrize("key, header", [(LEGACY_TOKEN, f"Token {LEGACY_TOKEN}"), (PAT, f"Bearer {ACCESS}")])
def test_uploads_load_with_a_legacy_token_or_a_personal_access_token(ls_host, key, header):
    ls_host.seen.clear()
    image = loader(label_studio_url=ls_host.url, label_studio_api_key=key).load("/data/upload/img0.png", 1)
    assert (image.width, image.height) == (160, 90)
    assert ls_host.auth_sent_to("/data/upload/") == [header]


def test_personal_access_token_is_exchanged_once_and_reused(ls_host):
    ls_host.seen.clear()
    source = loader(label_studio_url=ls_host.url, label_studio_api_key=PAT)
    for _ in range(3):
        source.load("/data/upload/img0.png", 1)
    assert len([p for p, _ in ls_host.seen if p.startswith("/api/token/refresh")]) == 1


def test_a_wrong_legacy_token_names_the_url_and_the_auth_problem(ls_host):
    with pytest.raises(ImageAuthError) as err:
        loader(label_studio_url=ls_host.url, label_studio_api_key="f" * 40).load("/data/upload/img0.png", 1)
    message = str(err.value)
    assert "/data/upload/img0.png" in message and "401 Invalid token." in message
    assert "LABEL_STUDIO_API_KEY" in message and "f" * 40 not in message


def test_a_missing_token_says_so(ls_host):
    with pytest.raises(ImageAuthError, match="without an API key: 401 Authentication credentials were not provided"):
        loader(label_studio_url=ls_host.url).load("/data/upload/img0.png", 1)


def test_a_wrong_personal_access_token_is_reported_without_leaking_it(ls_host):
    bad = PAT[:-4] + "XXXX"
    with pytest.raises(ImageAuthError) as err:
        loader(label_studio_url=ls_host.url, label_studio_api_key=bad).load("/data/upload/img0.png", 1)
    assert "refused the personal access token" in str(err.value) and bad not in str(err.value)


def test_the_token_is_never_sent_to_other_hosts(ls_host):
    ls_host.seen.clear()
    source = loader(label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    other_origin = ls_host.url.replace("127.0.0.1", "localhost")
    source.load(f"{other_origin}/public/img1.png", 1)
    source.load(f"{ls_host.url}/public/img1.png", 1)
    assert ls_host.auth_sent_to("/public/") == [None, f"Token {LEGACY_TOKEN}"]


def test_cloud_uris_resolve_through_label_studio_presign_without_forwarding_the_token(ls_host):
    ls_host.seen.clear()
    image = loader(label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN).load("s3://bucket/img2.png", 17)
    assert (image.width, image.height) == (300, 240)
    presign = [p for p, _ in ls_host.seen if p.startswith("/tasks/17/presign/?fileuri=")]
    assert len(presign) == 1
    assert ls_host.auth_sent_to("/tasks/17/") == [f"Token {LEGACY_TOKEN}"]
    assert ls_host.auth_sent_to("/bucket/") == [None]


def test_cloud_uris_without_label_studio_are_a_clear_error():
    with pytest.raises(ImageFetchError, match="gs://b/x.png needs Label Studio's presign endpoint"):
        loader().load("gs://b/x.png", 1)


def test_local_files_are_read_from_the_document_root(image_dir, ls_host):
    ls_host.seen.clear()
    image = loader(local_files_document_root=image_dir).load("/data/local-files/?d=sub/local.png", 1)
    assert (image.width, image.height) == (64, 48)
    assert ls_host.seen == []


def test_local_files_cannot_escape_the_document_root(image_dir):
    with pytest.raises(ImageFetchError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        loader(local_files_document_root=image_dir / "sub").load("/data/local-files/?d=../img0.png", 1)


def test_local_files_fall_back_to_label_studio_when_not_on_this_machine(ls_host, tmp_path):
    source = loader(local_files_document_root=tmp_path, label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        source.load("/data/local-files/?d=elsewhere/a.png", 1)
    assert ls_host.auth_sent_to("/data/local-files/")[-1] == f"Token {LEGACY_TOKEN}"


def test_download_size_limit_is_enforced_and_named(ls_host):
    with pytest.raises(ImageTooLargeError, match="over the download limit of 100 bytes"):
        loader(max_download_bytes=100, allowed_hosts=["127.0.0.1"]).load(f"{ls_host.url}/public/img0.png", 1)


def test_download_timeout_is_enforced_and_named(ls_host):
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s"):
        loader(download_timeout=0.5, allowed_hosts=["127.0.0.1"]).load(f"{ls_host.url}/slow", 1)


def test_load_many_returns_each_failure_in_place(ls_host):
    source = loader(label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    out = source.load_many([("/data/upload/img0.png", 1), ("/data/upload/nope.png", 2), ("/data/upload/img1.png", 3)])
    assert out[0].width == 160 and isinstance(out[1], ImageFetchError) and out[2].width == 120
