"""One exception type per kind of user mistake; the edges (HTTP, CLI) turn them into clear messages."""


class PrelabelError(Exception):
    """Base class. `kind` names the problem in JSON errors and metrics; `status` is the HTTP status at the edge."""

    kind = "error"
    status = 400


class ConfigError(PrelabelError):
    """A label config or prompts file we cannot work with."""

    kind = "config"
    status = 422


class PromptsError(ConfigError):
    kind = "prompts"


class ModelUnavailableError(PrelabelError):
    """Weights are neither cached nor reachable."""

    kind = "model_unavailable"
    status = 503


class ImageError(PrelabelError):
    """An image that cannot be fetched or decoded (names the URL and the cause)."""

    kind = "image"
    status = 422


class ImageFetchError(ImageError):
    kind = "image_fetch"


class ImageAuthError(ImageFetchError):
    kind = "image_auth"


class ImageDecodeError(ImageError):
    kind = "image_decode"


class ImageTooLargeError(ImageError):
    kind = "image_too_large"
    status = 413


class RequestError(PrelabelError):
    """A malformed request body (missing fields, wrong types, bad context)."""

    kind = "request"
    status = 400


class ImageBlockedError(ImageFetchError):
    """An image URL outside the hosts we may fetch from (SSRF guard)."""

    kind = "image_blocked"
    status = 403


class RequestTooLargeError(RequestError):
    """A request body over PRELABEL_MAX_REQUEST_BYTES."""

    kind = "request_too_large"
    status = 413


class OverloadedError(PrelabelError):
    """The inference queue is full: come back later (503 with Retry-After)."""

    kind = "overloaded"
    status = 503


class InferenceError(PrelabelError):
    """The model failed on one task's image; the other tasks of the batch keep their results."""

    kind = "inference"
    status = 500


def describe_validation(errors: list[dict]) -> str:
    """pydantic's errors() as one line: `field.sub: message; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)


def validated(model, raw, error: type[PrelabelError], where: str, expected: str = "a mapping"):
    """`model` validated from a parsed document `raw`; anything else, or a field that does not validate, raises
    `error` naming `where` and the problem."""
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        raise error(f"{where} must be {expected}, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{where}: {describe_validation(exc.errors())}") from None


class VideoDecodeError(ImageDecodeError):
    """A video that cannot be decoded: corrupt, truncated, no frames, unknown codec (names the video and cause)."""

    kind = "video_decode"


class VideoTooLargeError(ImageTooLargeError):
    """A video over the size, duration or per-frame pixel limits."""

    kind = "video_too_large"
