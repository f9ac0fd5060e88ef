"""All configuration in one object, read from environment variables; CLI flags override."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "facebook/sam-vit-base"
DEFAULT_TRACKER = "facebook/sam2.1-hiera-tiny"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRELABEL_", populate_by_name=True, extra="ignore")

    # Ecosystem names (Label Studio ML backend examples use these).
    label_studio_url: str | None = Field(None, validation_alias=_env("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"))
    label_studio_api_key: SecretStr | None = Field(None, validation_alias=_env("LABEL_STUDIO_API_KEY"))
    basic_auth_user: str | None = Field(None, validation_alias=_env("BASIC_AUTH_USER"))
    basic_auth_pass: SecretStr | None = Field(None, validation_alias=_env("BASIC_AUTH_PASS"))
    model_dir: Path = Field(Path(".prelabel"), validation_alias=_env("MODEL_DIR"))
    local_files_document_root: Path | None = Field(None, validation_alias=_env("LOCAL_FILES_DOCUMENT_ROOT"))

    # Ours (PRELABEL_*).
    prompts: Path | None = None
    detector: str = DEFAULT_DETECTOR
    segmenter: str | None = DEFAULT_SEGMENTER
    tracker: str | None = DEFAULT_TRACKER  # video: follows detected objects between detection frames (SAM 2 video, SAM 3)
    classifier: str | None = None  # CLIP/SigLIP for Choices, per-region classes and CVAT tags (else the prompts file's)
    classifier_batch_size: int = Field(64, ge=1)  # image crops per classifier forward
    device: str = "auto"
    precision: Literal["float32", "bfloat16", "float16"] = "float32"  # SAM 3's weights on CUDA (CPU: float32)
    embedding_cache_size: int = Field(8, ge=0)
    batch_size: int = Field(4, ge=1)
    max_detections: int = Field(100, ge=1)
    max_image_pixels: int = Field(80_000_000, ge=1)
    max_download_bytes: int = Field(100 * 2**20, ge=1)
    download_timeout: float = Field(30.0, gt=0)
    fetch_workers: int = Field(8, ge=1)
    max_tasks_per_request: int = Field(256, ge=1)

    # Video (see README "Video"): the detector runs every `video_detect_every` frames, the tracker in between.
    video_detect_every: int = Field(10, ge=1)
    video_track_fps: float = Field(8.0, gt=0)  # the tracker steps on about this many frames per second of video
    keyframe_tolerance: float = Field(2.0, ge=0)  # px: Label Studio's interpolation between keyframes stays this close
    max_video_seconds: float = Field(600.0, gt=0)
    max_video_bytes: int = Field(2 * 2**30, ge=1)
    video_download_timeout: float = Field(600.0, gt=0)
    max_video_pixels: int = Field(3840 * 2160, ge=1)  # per frame

    # Serving under load and at the edge (see README "Under load" and "Security").
    max_request_bytes: int = Field(64 * 2**20, ge=1)  # request bodies over this get 413
    queue_size: int = Field(64, ge=1)  # /predict requests admitted at once per lane; more get 503 + Retry-After
    batch_wait_ms: float = Field(10.0, ge=0)  # how long a small batch waits for concurrent requests to join it
    background_nice: int = Field(10, ge=0, le=19)  # how far batch/follower threads lower their priority (Linux)
    # Hosts images may come from besides Label Studio: names, *.suffix, IPs or CIDRs; "*" = any public address.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Following projects (see README "Data that keeps arriving"): new tasks are pre-annotated as they are created.
    follow: bool = True  # queue Label Studio's TASKS_CREATED webhooks and pre-annotate those tasks
    follow_rate: float = Field(0.0, ge=0)  # tasks per second at most (0: no cap); clicks always go first
    follow_batch_images: int = Field(1, ge=1)  # images per model batch of followed tasks (the batch thread yields between)
    public_url: str | None = None  # this server's address as Label Studio reaches it (for the webhook it adds)

    # START_TRAINING runs `prelabel distill --project ID` with these extra arguments (e.g. "--epochs 20").
    distill_args: str = ""

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        """PRELABEL_ALLOWED_HOSTS is comma- or space-separated."""
        if isinstance(value, str):
            return [h for h in value.replace(",", " ").split() if h]
        return value


def environment_variables() -> set[str]:
    """Every environment variable the settings read."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names |= set(alias.choices) if alias is not None else {f"PRELABEL_{name.upper()}"}
    return names
