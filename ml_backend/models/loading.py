"""Resolve a model reference (local dir, MODEL_DIR entry or hub id) to a local directory, failing fast when the
weights are neither cached nor reachable instead of hanging on hub lookups."""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ..errors import ModelUnavailableError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
STUDENT_PREFIX = "student:"
# ref prefixes naming a local directory (`student:DIR`), with what the directory is; families add theirs (registry)
LOCAL_PREFIXES: dict[str, str] = {STUDENT_PREFIX: "student directory"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def pick_device(requested: str = "auto") -> torch.device:
    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError(f"device {requested!r} was requested but CUDA is not available on this machine")
    return device


_quiet_depth = 0
_quiet_lock = threading.Lock()


@contextmanager
def quiet_weights():
    """Without transformers' per-model progress bars ("Loading weights", "Writing model shards") inside, unless
    debug logging is on (`--verbose`): on every start they are noise. Also a decorator. Restored on the way out
    (nested and concurrent uses count), so that hub downloads keep their bars."""
    global _quiet_depth
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        quiet = _quiet_depth > 0 or (hf_logging.is_progress_bar_enabled() and not log.isEnabledFor(logging.DEBUG))
        if quiet:
            _quiet_depth += 1
            hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            with _quiet_lock:
                _quiet_depth -= 1
                if _quiet_depth == 0:
                    hf_logging.enable_progress_bar()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub within `timeout` (DNS included)?"""
    parts = urlsplit(hub_endpoint())
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(outcome and outcome[0])


def _unavailable(ref: str, model_dir: Path, why: str) -> ModelUnavailableError:
    name = ref.rstrip("/").split("/")[-1]
    return ModelUnavailableError(
        f"model {ref!r} is not in the local cache and {why}; download it where the hub is reachable "
        f"(`hf download {ref} --local-dir DIR`) and pass DIR instead of the id, or put it at {model_dir / name} "
        f"(MODEL_DIR)"
    )


def resolve_model(ref: str, model_dir: Path, local_only: bool = False) -> Path:
    """Return a local path (directory, or a checkpoint file) holding the model `ref`; a prefixed ref such as
    `student:DIR` (a distilled student) is DIR as given, else below MODEL_DIR. `local_only`: never download."""
    prefix = next((p for p in LOCAL_PREFIXES if ref.startswith(p)), None)
    if prefix is not None:
        directory = Path(ref[len(prefix):]).expanduser()
        if not directory.is_dir() and (model_dir / directory).is_dir():
            directory = model_dir / directory
        if not directory.is_dir():
            raise ModelUnavailableError(f"{LOCAL_PREFIXES[prefix]} {directory} does not exist (from {ref})")
        return directory
    path = Path(ref).expanduser()
    if path.exists():
        return path
    name = ref.rstrip("/").split("/")[-1]
    for candidate in (model_dir / ref, model_dir / name):
        if candidate.exists():
            return candidate
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(WEIGHT_SUFFIXES):
        raise ModelUnavailableError(f"model path {ref!r} does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if local_only:
        raise _unavailable(ref, model_dir, "it was not to be downloaded now")
    if hub_offline():
        raise _unavailable(ref, model_dir, "HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise _unavailable(ref, model_dir, f"the hub ({hub_endpoint()}) cannot be reached")
    log.info("downloading %s from %s", ref, hub_endpoint())
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(ref)
        ignore = ["*.msgpack", "*.h5", "*.onnx", "*.tflite", "*.ot"]
        if any(f.endswith(".safetensors") for f in files):
            ignore += ["*.bin", "*.pth", "*.pt"]
        return Path(snapshot_download(ref, ignore_patterns=ignore))
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; report them as one
        raise download_error(ref, exc) from exc


def download_error(ref: str, exc: Exception) -> ModelUnavailableError:
    """One line for a failed download; a gated model (facebook/sam3) says how to get access."""
    from huggingface_hub.errors import GatedRepoError

    if isinstance(exc, GatedRepoError):
        return ModelUnavailableError(
            f"model {ref!r} is gated: accept its licence at {hub_endpoint()}/{ref} with your account, then log in "
            f"here (`hf auth login`, or set HF_TOKEN) and run `prelabel fetch` again")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelUnavailableError(f"model {ref!r} could not be downloaded: {first}")
