"""Label Studio's image references, resolved into media items (`LabelStudioImageSource`, an `ImageSource`).

Label Studio task data may hold: uploads (`/data/upload/...`), local-files storage (`/data/local-files/?d=...`,
read from `LOCAL_FILES_DOCUMENT_ROOT` when it is set), http(s) URLs, cloud URIs (`s3://`, `gs://`,
`azure-blob://`) resolved through Label Studio's presign endpoint, and `data:` URIs. The Label Studio API key
is sent only to the Label Studio host (as `Token` for a legacy key, as `Bearer` with an access token obtained
from a personal access token). Every URL goes through the core's SSRF guard (`net.UrlGuard`), with Label Studio as
the tool whose host and presign redirects are trusted."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import httpx

from ..errors import (
    ImageAuthError, ImageDecodeError, ImageError, ImageFetchError, ImageTooLargeError, VideoTooLargeError,
)
from ..media import MediaItem, decode_image
from ..net import PinnedBackend, UrlGuard, origin, redact
from ..settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def _jwt_expiry(token: str) -> float:
    try:
        payload = token.split(".")[1]
        return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    except (ValueError, KeyError, IndexError):
        return time.time() + 60


class LabelStudioAuth:
    """Authorization header for one Label Studio: legacy token as-is, personal access token exchanged for a
    short-lived access token (refreshed before it expires)."""

    def __init__(self, url: str, api_key: str, client: httpx.Client):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.client = client
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def header(self) -> dict[str, str]:
        if not _looks_like_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or self._access[1] - 30 < time.time():
                self._access = self._refresh()
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self) -> tuple[str, float]:
        url = f"{self.url}/api/token/refresh"
        try:
            response = self.client.post(url, json={"refresh": self.api_key})
        except httpx.HTTPError as exc:
            raise ImageAuthError(f"cannot reach {url} to exchange the personal access token: {exc}") from None
        if response.status_code != 200:
            raise ImageAuthError(
                f"Label Studio at {self.url} refused the personal access token (LABEL_STUDIO_API_KEY) with "
                f"{response.status_code}: {_detail(response)}; create a new one in Account & Settings"
            )
        access = response.json()["access"]
        return access, _jwt_expiry(access)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    return response.reason_phrase or "no detail"


class LabelStudioImageSource:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.guard = UrlGuard(settings.allowed_hosts)
        transport = httpx.HTTPTransport()
        transport._pool._network_backend = PinnedBackend(self.guard)  # httpx has no public hook for it
        self.client = httpx.Client(timeout=settings.download_timeout, follow_redirects=False, transport=transport)  # hops checked by us
        self.pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="fetch")
        self._auth: LabelStudioAuth | None = None
        self._ls_url: str | None = None
        key = settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else None
        if settings.label_studio_url:
            self.configure_label_studio(settings.label_studio_url, key)

    def configure_label_studio(self, url: str | None, api_key: str | None) -> None:
        """Where relative URLs point, and the key for that host only."""
        if not url:
            return
        self._ls_url = url.rstrip("/")
        self.guard.set_tool(self._ls_url)
        self._auth = LabelStudioAuth(self._ls_url, api_key, self.client) if api_key else None

    @property
    def label_studio_url(self) -> str | None:
        return self._ls_url

    @property
    def label_studio_key(self) -> str | None:
        return self._auth.api_key if self._auth else None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- resolution ---------------------------------------------------------------------------------------------
    def load(self, ref: str, task_id: int | None = None) -> MediaItem:
        if not isinstance(ref, str) or not ref.strip():
            raise ImageFetchError(f"image reference {ref!r} is empty or not a string")
        ref = ref.strip()
        scheme = urlsplit(ref).scheme.lower()
        if scheme == "data":
            return self._from_data_uri(ref)
        if scheme in CLOUD_SCHEMES:
            return self._fetch(self._presign_url(ref, task_id), ref)
        if scheme in ("http", "https"):
            local = self._local_file(ref)
            return local if local is not None else self._fetch(ref, ref)
        if ref.startswith("/"):
            local = self._local_file(ref)
            if local is not None:
                return local
            if not self._ls_url:
                raise ImageFetchError(
                    f"image URL {ref} is relative to Label Studio, but LABEL_STUDIO_URL is not set "
                    f"(and no /setup from Label Studio has told us its address)"
                )
            return self._fetch(urljoin(self._ls_url + "/", ref.lstrip("/")), ref)
        raise ImageFetchError(f"image URL {ref!r} has an unsupported form (scheme {scheme or 'none'!r})")

    def load_many(self, refs: list[tuple[str, int | None]]) -> list[MediaItem | ImageError]:
        """Fetch concurrently; each failure is returned in place, never raised."""

        def one(item):
            try:
                return self.load(*item)
            except ImageError as exc:
                return exc

        return list(self.pool.map(one, refs))

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        if not self._ls_url:
            raise ImageFetchError(f"cloud URI {uri} needs Label Studio's presign endpoint, but LABEL_STUDIO_URL is not set")
        if task_id is None:
            raise ImageFetchError(f"cloud URI {uri} can only be resolved for a task with an id")
        encoded = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"{self._ls_url}/tasks/{int(task_id)}/presign/?fileuri={quote(encoded)}"

    def _local_path(self, ref: str, what: str = "image") -> Path | None:
        """`/data/local-files/?d=rel/path` as a file under LOCAL_FILES_DOCUMENT_ROOT when it is set here (None:
        not such a reference, or a file Label Studio may serve from its own root)."""
        root = self.settings.local_files_document_root
        parts = urlsplit(ref)
        if root is None or not parts.path.endswith("/data/local-files/"):
            return None
        if parts.scheme and self._ls_url and origin(ref) != origin(self._ls_url):
            return None
        rel = parse_qs(parts.query).get("d", [""])[0]
        root = Path(root).resolve()
        path = (root / unquote(rel).lstrip("/")).resolve()
        if not path.is_relative_to(root):
            raise ImageFetchError(f"local file {rel!r} lies outside LOCAL_FILES_DOCUMENT_ROOT")
        if not path.is_file():
            if self._ls_url:
                return None  # Label Studio may serve it from its own document root
            raise ImageFetchError(f"local file {path} (from {ref}) does not exist")
        size = path.stat().st_size
        if size > self._limit(what):
            raise self._too_big(ref, size, what)
        return path

    def _local_file(self, ref: str) -> MediaItem | None:
        path = self._local_path(ref)
        return None if path is None else decode_image(path.read_bytes(), ref, self.settings.max_image_pixels)

    def _data_uri_bytes(self, ref: str, what: str = "image") -> bytes:
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise ImageDecodeError(f"data URI {what}s must be base64 encoded")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise ImageDecodeError("data URI holds invalid base64") from None
        if len(data) > self._limit(what):
            raise self._too_big("data URI", len(data), what)
        return data

    def _from_data_uri(self, ref: str) -> MediaItem:
        return decode_image(self._data_uri_bytes(ref), "data URI", self.settings.max_image_pixels)

    def _too_big(self, source: str, size: int, what: str = "image") -> ImageTooLargeError:
        error = ImageTooLargeError if what == "image" else VideoTooLargeError
        return error(f"{what} {source} is {size} bytes, over the download limit of {self._limit(what)} bytes "
                     f"({LIMIT_SETTING[what]})")

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def headers_for(self, url: str) -> dict[str, str]:
        """The Authorization header for `url`: Label Studio's own host only."""
        if self._auth and self._ls_url and origin(url) == origin(self._ls_url):
            return self._auth.header()
        return {}

    def _fetch(self, url: str, source: str, sink=None, what: str = "image") -> MediaItem | None:
        """GET `url` (following checked redirects): an image decoded, or with `sink` (a binary file) the body
        written there (None returned), under the size limit of `what`."""
        timeout = self.settings.download_timeout if what == "image" else self.settings.video_download_timeout
        deadline = time.monotonic() + timeout
        shown = redact(url)
        self.guard.check(url, source)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                data, location = self._get(url, source, deadline, sink, what)
                if location is None:
                    return None if sink is not None else decode_image(data, redact(source), self.settings.max_image_pixels)
                from_ls, url = self.guard.is_tool(url), urljoin(url, location)
                self.guard.check(url, source, redirect=True, redirected_by_tool=from_ls)  # before following the hop
                shown = redact(url)
        except httpx.TimeoutException:
            raise ImageFetchError(f"{what} {redact(source)} ({shown}) timed out after {timeout} s "
                                  f"({TIMEOUT_SETTING[what]})") from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"{what} {redact(source)} ({shown}) could not be fetched: {exc}") from None
        raise ImageFetchError(f"{what} {redact(source)} redirected more than {MAX_REDIRECTS} times (last {shown})")

    def _get(self, url: str, source: str, deadline: float, sink=None, what: str = "image") -> tuple[bytes, str | None]:
        """One hop: (body, None) (b"" when written to `sink`), or (b"", Location) for a redirect. Limits and auth
        errors raise."""
        limit, shown, source = self._limit(what), redact(url), redact(source)
        with self.client.stream("GET", url, headers=self.headers_for(url)) as response:
            if response.is_redirect and response.headers.get("location"):
                return b"", response.headers["location"]
            if response.status_code in (401, 403):
                sent = "with" if self.headers_for(url) else "without"
                raise ImageAuthError(
                    f"Label Studio refused {what} {source} ({shown}) {sent} an API key: {response.status_code} "
                    f"{_detail_streamed(response)}; check LABEL_STUDIO_API_KEY (a legacy token or a personal "
                    f"access token of a user of that Label Studio) and LABEL_STUDIO_URL"
                )
            if response.status_code >= 400:
                raise ImageFetchError(f"{what} {source} ({shown}) answered HTTP {response.status_code}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > limit:
                raise self._too_big(source, declared, what)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise self._too_big(source, size, what)
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"{what} {source} took longer than {self._timeout(what)} s to download "
                                          f"({TIMEOUT_SETTING[what]})")
                if sink is not None:
                    sink.write(chunk)
                else:
                    chunks.append(chunk)
        return b"".join(chunks), None

    # -- videos -------------------------------------------------------------------------------------------------
    def fetch_file(self, ref: str, task_id: int | None, dest: Path, what: str = "video") -> Path:
        """A task's video (any form an image may take) as a local file: a local-files path is used where it lies;
        anything else streams into `dest` under PRELABEL_MAX_VIDEO_BYTES and PRELABEL_VIDEO_DOWNLOAD_TIMEOUT."""
        if not isinstance(ref, str) or not ref.strip():
            raise ImageFetchError(f"{what} reference {ref!r} is empty or not a string")
        ref = ref.strip()
        scheme = urlsplit(ref).scheme.lower()
        if scheme == "data":
            dest.write_bytes(self._data_uri_bytes(ref, what))
            return dest
        if scheme in ("http", "https", "") and (path := self._local_path(ref, what)) is not None:
            return path
        if scheme in CLOUD_SCHEMES:
            url = self._presign_url(ref, task_id)
        elif scheme in ("http", "https"):
            url = ref
        elif ref.startswith("/") and self._ls_url:
            url = urljoin(self._ls_url + "/", ref.lstrip("/"))
        elif ref.startswith("/"):
            raise ImageFetchError(f"{what} URL {ref} is relative to Label Studio, but LABEL_STUDIO_URL is not set")
        else:
            raise ImageFetchError(f"{what} URL {ref!r} has an unsupported form (scheme {scheme or 'none'!r})")
        with open(dest, "wb") as sink:
            self._fetch(url, ref, sink, what)
        return dest

    def _limit(self, what: str) -> int:
        return self.settings.max_download_bytes if what == "image" else self.settings.max_video_bytes

    def _timeout(self, what: str) -> float:
        return self.settings.download_timeout if what == "image" else self.settings.video_download_timeout


TIMEOUT_SETTING = {"image": "PRELABEL_DOWNLOAD_TIMEOUT", "video": "PRELABEL_VIDEO_DOWNLOAD_TIMEOUT"}
LIMIT_SETTING = {"image": "PRELABEL_MAX_DOWNLOAD_BYTES", "video": "PRELABEL_MAX_VIDEO_BYTES"}


def _detail_streamed(response: httpx.Response) -> str:
    try:
        response.read()
    except httpx.HTTPError:
        return response.reason_phrase
    return _detail(response)


