"""Media items, the engine's input: decoded pixels (an image, or one frame of a video) with where they came from and
the fields of the task they belong to (prompt templates read them); decoding with limits and EXIF orientation; and
the `ImageSource` interface through which adapters resolve their own references (URLs, paths) into items."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageDecodeError, ImageError, ImageTooLargeError
from .types import LabeledImage

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit before decoding


@dataclass(frozen=True)
class Frame:
    """Where a video frame sits in its video (`MediaItem.source`): 0-based index and time in seconds."""

    index: int
    timestamp: float | None = None


@dataclass
class MediaItem:
    """What the engine predicts on: RGB uint8 H x W x 3 pixels (EXIF orientation applied), `source` (a URL, path or
    description, for messages), `fields` (the task's own data: prompt templates fill `{field}`s from it) and, for a
    frame of a video, `frame`."""

    array: np.ndarray
    source: str
    fields: dict | None = None
    frame: Frame | None = None

    @property
    def height(self) -> int:
        return self.array.shape[0]

    @property
    def width(self) -> int:
        return self.array.shape[1]


class ImageSource(Protocol):
    """Resolves an adapter's image references (Label Studio URLs, cloud URIs, ...) into media items."""

    def load(self, ref: str, task_id: int | None = None) -> MediaItem: ...

    def load_many(self, refs: list[tuple[str, int | None]]) -> list[MediaItem | ImageError]:
        """Concurrently; each failure is returned in place, never raised."""
        ...

    def close(self) -> None: ...


def decode_image(data: bytes, source: str, max_pixels: int) -> MediaItem:
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
    return MediaItem(array, source)


def local_file(ref: str) -> Path | None:
    """The file a labelled record's image reference names, when it is a local file (not a URL, not a Label Studio
    `/data/...` path)."""
    path = Path(ref)
    return path if "://" not in ref and not ref.startswith("/data/") and path.is_file() else None


def record_image(record: LabeledImage, source: ImageSource | None, max_pixels: int) -> np.ndarray:
    """A labelled record's image as RGB: a local file is read directly; anything else (Label Studio URLs, cloud
    URIs) goes through `source`."""
    path = local_file(record.image)
    if path is not None:
        return decode_image(path.read_bytes(), str(path), max_pixels).array
    if source is None:
        raise ConfigError(f"image {record.image} of {record.key} is not a local file and no image source is configured")
    return source.load(record.image, record.extra.get("task_id")).array
