"""Fetching and decoding images, with size limits, EXIF orientation and Label Studio's URL forms.

Label Studio task data may hold: uploads (`/data/upload/...`), local-files storage (`/data/local-files/?d=...`,
read from `LOCAL_FILES_DOCUMENT_ROOT` when it is set), http(s) URLs, cloud URIs (`s3://`, `gs://`,
`azure-blob://`) resolved through Label Studio's presign endpoint, and `data:` URIs. The Label Studio API key
is sent only to the Label Studio host (as `Token` for a legacy key, as `Bearer` with an access token obtained
from a personal access token).

SSRF guard (`UrlGuard`): a URL is fetched only from the Label Studio host, hosts in PRELABEL_ALLOWED_HOSTS, or
a public address a Label Studio response redirected to (cloud presign). The host is resolved and its addresses
classified before connecting, and again at every redirect hop.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urljoin, urlsplit, urlunsplit

import httpcore
import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageAuthError, ImageBlockedError, ImageDecodeError, ImageError, ImageFetchError, ImageTooLargeError
from .settings import Settings
from .types import LabeledImage

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5
NEVER_LABEL_STUDIO = ("link-local", "multicast", "unspecified")  # cloud metadata lives at link-local addresses
SECRET_PARAMS = ("sig", "signature", "token", "key", "credential", "password", "secret", "auth", "session")
Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit before decoding


@dataclass
class LoadedImage:
    array: np.ndarray  # RGB uint8, H x W x 3, EXIF orientation applied
    source: str

    @property
    def height(self) -> int:
        return self.array.shape[0]

    @property
    def width(self) -> int:
        return self.array.shape[1]


def decode_image(data: bytes, source: str, max_pixels: int) -> LoadedImage:
    if not data:
        raise ImageDecodeError(f"image {source} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > max_pixels:
            raise ImageTooLargeError(
                f"image {source} has {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                f"(PRELABEL_MAX_IMAGE_PIXELS)"
            )
        image = ImageOps.exif_transpose(image)
        array = np.array(image.convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{source} is not an image of a known format ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"image {source} is corrupt or truncated: {exc}") from None
    if array.size == 0:
        raise ImageDecodeError(f"image {source} has no pixels")
    return LoadedImage(array, source)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def redact(url: str) -> str:
    """A URL safe for logs and error bodies: no userinfo, values of signature/token-like query parameters masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.scheme not in ("http", "https"):
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode(
        [(k, "***" if any(s in k.lower() for s in SECRET_PARAMS) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="/*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class _RedactUrls(logging.Filter):
    """httpx logs every request's URL at INFO: presigned signatures and userinfo must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactUrls())

Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address the host resolves to (the connection may go to any of them)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def address_kind(address: str) -> str | None:
    """None for a public (global) address, else what it is: loopback, link-local, private, ..."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for attr in ("unspecified", "loopback", "link_local", "private", "multicast", "reserved"):
        if getattr(ip, f"is_{attr}"):
            return attr.replace("_", "-")
    return None if ip.is_global else "non-public"


class UrlGuard:
    """Decides whether a URL may be fetched, by host name and by the classes of the addresses it resolves to.

    Allowed: the Label Studio origin (or the same port on the same addresses); hosts in `allowed` (exact names,
    `*.suffix`, IPs, CIDRs); with `*` in `allowed`, any host whose addresses are all public; a hop that a Label
    Studio response redirected to (cloud presign), when its addresses are all public."""

    def __init__(self, allowed: list[str], resolver: Resolver = resolve):
        self.resolver = resolver
        self.any_public = "*" in allowed
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (a.strip().lower() for a in allowed if a.strip() != "*"):
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if entry.startswith("*."):
                    self.suffixes.append(entry[1:])
                else:
                    self.names.add(entry)
        self.label_studio: tuple[str, str, int | None] | None = None
        self._ls_addresses: frozenset[str] | None = None
        self._pins: dict[tuple[str, int], list[str]] = {}  # (host, port) -> the addresses a check accepted

    def pinned(self, host: str, port: int) -> list[str]:
        """The addresses last checked for `host`: connections go there, never to a fresh DNS answer."""
        return self._pins.get((host.lower(), port), [])

    def set_label_studio(self, url: str | None) -> None:
        self.label_studio = _origin(url) if url else None
        self._ls_addresses = None

    def is_label_studio(self, url: str) -> bool:
        return self.label_studio is not None and _origin(url) == self.label_studio

    def _ls_address_set(self) -> frozenset[str]:
        """Label Studio's addresses, resolved once."""
        if self._ls_addresses is None and self.label_studio:
            scheme, host, port = self.label_studio
            port = port or (443 if scheme == "https" else 80)
            try:
                self._ls_addresses = frozenset(self.resolver(host, port))
            except OSError:
                return frozenset()
            self._pins[(host, port)] = sorted(self._ls_addresses)
        return self._ls_addresses or frozenset()

    def _explicitly_allowed(self, host: str, addresses) -> bool:
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
        return bool(ips and self.networks) and all(any(ip in n for n in self.networks if ip.version == n.version) for ip in ips)

    def refusal(self, url: str, redirected_by_label_studio: bool = False) -> str | None:
        """Why `url` must not be fetched, or None when it may."""
        parts = urlsplit(url)
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https") or not host:
            return f"only http(s) URLs with a host are fetched, not {scheme or 'no scheme'!r}"
        if self.is_label_studio(url):
            # a Label Studio address given by an unauthenticated /setup must not reach cloud metadata endpoints
            odd = [(a, k) for a in self._ls_address_set() if (k := address_kind(a)) in NEVER_LABEL_STUDIO]
            if odd and not self._explicitly_allowed(host, self._ls_address_set()):
                return f"the Label Studio host {host} resolves to {odd[0][0]}, a {odd[0][1]} address"
            return None
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return None
        port = port or (443 if scheme == "https" else 80)
        try:
            addresses = self.resolver(host, port)
        except OSError as exc:
            return f"host {host} does not resolve ({exc})"
        if not addresses:
            return f"host {host} does not resolve"
        self._pins[(host, port)] = list(addresses)  # only used when this check lets the URL through
        if self._explicitly_allowed(host, addresses):
            return None
        ls_machine = set(map(_same_machine, self._ls_address_set()))
        if self.label_studio and port == self.label_studio[2] and set(map(_same_machine, addresses)) <= ls_machine:
            return None  # Label Studio under another name (localhost for 127.0.0.1)
        kinds = [(a, address_kind(a)) for a in addresses]
        private = [(a, k) for a, k in kinds if k]
        if private:
            address, kind = private[0]
            return f"{host} resolves to {address}, a {kind} address that is not Label Studio's"
        if self.any_public or redirected_by_label_studio:
            return None
        where = f"the Label Studio host ({self.label_studio[1]})" if self.label_studio else "the Label Studio host"
        return f"{parts.hostname} is neither {where} nor in PRELABEL_ALLOWED_HOSTS"

    def check(self, url: str, source: str, redirect: bool = False, redirected_by_label_studio: bool = False) -> None:
        """Raises ImageBlockedError naming the URL and the reason."""
        reason = self.refusal(url, redirected_by_label_studio)
        if reason:
            hop = ", a redirect" if redirect else ""
            raise ImageBlockedError(
                f"image {redact(source)} ({redact(url)}{hop}) could not be fetched: refused, {reason}; images are "
                f"fetched only from the Label Studio host, PRELABEL_ALLOWED_HOSTS and cloud presign redirects"
            )


class PinnedBackend(httpcore.SyncBackend):
    """Opens TCP connections to the addresses the guard checked for the host (no second DNS lookup, so no DNS
    rebinding between the check and the connection); TLS still verifies the certificate for the host name."""

    def __init__(self, guard: UrlGuard):
        self.guard = guard

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = self.guard.pinned(host, port) or [host]  # hosts allowed by name are not resolved by the guard
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error


def _same_machine(address: str) -> str:
    """Loopback addresses all name this machine."""
    return "loopback" if address_kind(address) == "loopback" else address.split("%", 1)[0]


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


class ImageLoader:
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
        self.guard.set_label_studio(self._ls_url)
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
    def load(self, ref: str, task_id: int | None = None) -> LoadedImage:
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

    def load_many(self, refs: list[tuple[str, int | None]]) -> list[LoadedImage | ImageError]:
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

    def _local_file(self, ref: str) -> LoadedImage | None:
        """`/data/local-files/?d=rel/path` read straight from LOCAL_FILES_DOCUMENT_ROOT when it is set here."""
        root = self.settings.local_files_document_root
        parts = urlsplit(ref)
        if root is None or not parts.path.endswith("/data/local-files/"):
            return None
        if parts.scheme and self._ls_url and _origin(ref) != _origin(self._ls_url):
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
        if size > self.settings.max_download_bytes:
            raise self._too_big(ref, size)
        return decode_image(path.read_bytes(), ref, self.settings.max_image_pixels)

    def _from_data_uri(self, ref: str) -> LoadedImage:
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise ImageDecodeError("data URI images must be base64 encoded")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise ImageDecodeError("data URI holds invalid base64") from None
        if len(data) > self.settings.max_download_bytes:
            raise self._too_big("data URI", len(data))
        return decode_image(data, "data URI", self.settings.max_image_pixels)

    def _too_big(self, source: str, size: int) -> ImageTooLargeError:
        limit = self.settings.max_download_bytes
        return ImageTooLargeError(
            f"image {source} is {size} bytes, over the download limit of {limit} bytes (PRELABEL_MAX_DOWNLOAD_BYTES)"
        )

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _headers_for(self, url: str) -> dict[str, str]:
        if self._auth and self._ls_url and _origin(url) == _origin(self._ls_url):
            return self._auth.header()
        return {}

    def _fetch(self, url: str, source: str) -> LoadedImage:
        deadline = time.monotonic() + self.settings.download_timeout
        shown = redact(url)
        self.guard.check(url, source)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                data, location = self._get(url, source, deadline)
                if location is None:
                    return decode_image(data, redact(source), self.settings.max_image_pixels)
                from_ls, url = self.guard.is_label_studio(url), urljoin(url, location)
                self.guard.check(url, source, redirect=True, redirected_by_label_studio=from_ls)  # before following the hop
                shown = redact(url)
        except httpx.TimeoutException:
            raise ImageFetchError(
                f"image {redact(source)} ({shown}) timed out after {self.settings.download_timeout} s (PRELABEL_DOWNLOAD_TIMEOUT)"
            ) from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"image {redact(source)} ({shown}) could not be fetched: {exc}") from None
        raise ImageFetchError(f"image {redact(source)} redirected more than {MAX_REDIRECTS} times (last {shown})")

    def _get(self, url: str, source: str, deadline: float) -> tuple[bytes, str | None]:
        """One hop: (body, None), or (b"", Location) for a redirect. Limits and auth errors raise."""
        limit, shown, source = self.settings.max_download_bytes, redact(url), redact(source)
        with self.client.stream("GET", url, headers=self._headers_for(url)) as response:
            if response.is_redirect and response.headers.get("location"):
                return b"", response.headers["location"]
            if response.status_code in (401, 403):
                sent = "with" if self._headers_for(url) else "without"
                raise ImageAuthError(
                    f"Label Studio refused image {source} ({shown}) {sent} an API key: {response.status_code} "
                    f"{_detail_streamed(response)}; check LABEL_STUDIO_API_KEY (a legacy token or a personal "
                    f"access token of a user of that Label Studio) and LABEL_STUDIO_URL"
                )
            if response.status_code >= 400:
                raise ImageFetchError(f"image {source} ({shown}) answered HTTP {response.status_code}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > limit:
                raise self._too_big(source, declared)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise self._too_big(source, size)
                if time.monotonic() > deadline:
                    raise ImageFetchError(
                        f"image {source} took longer than {self.settings.download_timeout} s to download "
                        f"(PRELABEL_DOWNLOAD_TIMEOUT)"
                    )
                chunks.append(chunk)
        return b"".join(chunks), None


def _detail_streamed(response: httpx.Response) -> str:
    try:
        response.read()
    except httpx.HTTPError:
        return response.reason_phrase
    return _detail(response)


def local_file(ref: str) -> Path | None:
    """The file a labelled record's image reference names, when it is a local file (not a URL, not a Label Studio
    `/data/...` path)."""
    path = Path(ref)
    return path if "://" not in ref and not ref.startswith("/data/") and path.is_file() else None


def record_image(record: LabeledImage, loader: ImageLoader | None, max_pixels: int) -> np.ndarray:
    """A labelled record's image as RGB: a local file is read directly; anything else (Label Studio URLs, cloud
    URIs) goes through `loader`."""
    path = local_file(record.image)
    if path is not None:
        return decode_image(path.read_bytes(), str(path), max_pixels).array
    if loader is None:
        raise ConfigError(f"image {record.image} of {record.key} is not a local file and no image loader is configured")
    return loader.load(record.image, record.extra.get("task_id")).array
