"""Training data for the student: labelled records -> a deterministic, class-stratified train/val split, COCO
files of both halves, and letterboxed image tensors in memory."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervision as sv
import torch

from .. import coco as coco_format
from ..errors import PrelabelError
from ..models.student import letterbox
from ..types import LabeledImage

log = logging.getLogger(__name__)


class DistillError(PrelabelError):
    kind = "distill"
    status = 400


@dataclass
class Example:
    """One training image: the record plus which labels train it ("human" or "accepted prediction")."""

    record: LabeledImage
    truth: sv.Detections
    source: str  # "annotation" | "prediction"


def training_examples(records: list[LabeledImage], accept_predictions: float | None = None) -> list[Example]:
    """Records with a human annotation (an empty one counts: "nothing here"); with `accept_predictions`, tasks
    nobody annotated also train on their predictions scoring at least that (never used for validation)."""
    out = []
    for r in records:
        if r.annotations is not None:
            out.append(Example(r, r.annotations, "annotation"))
        elif accept_predictions is not None and r.predictions is not None:
            p = r.predictions
            out.append(Example(r, p[p.confidence >= accept_predictions] if len(p) else p, "prediction"))
    return out


def _order(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def stratified_split(examples: list[Example], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic for a seed and the same keys, whatever their order. Each image's stratum is its rarest label
    (images with no object form their own), and each stratum sends round(fraction x size) images, at least one
    when it has two or more, to validation. Only human annotations validate."""
    if not 0 < val_fraction < 1:
        raise DistillError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    human = [e for e in examples if e.source == "annotation"]
    counts = Counter(str(n) for e in human for n in e.truth.data.get("class_name", []))
    strata: dict[str, list[Example]] = {}
    for e in human:
        names = {str(n) for n in e.truth.data.get("class_name", [])}
        key = min(names, key=lambda n: (counts[n], n)) if names else ""
        strata.setdefault(key, []).append(e)
    val_keys: set[str] = set()
    for members in strata.values():
        members.sort(key=lambda e: _order(e.record.key, seed))
        n = round(len(members) * val_fraction)
        n = max(n, 1) if len(members) >= 2 else n
        val_keys |= {e.record.key for e in members[:n]}
    train = sorted((e for e in examples if e.record.key not in val_keys), key=lambda e: e.record.key)
    val = sorted((e for e in examples if e.record.key in val_keys), key=lambda e: e.record.key)
    return train, val


def write_coco(examples: list[Example], labels: list[str], path: Path) -> None:
    images, anns = [], []
    for i, e in enumerate(examples):
        images.append(coco_format.image(i + 1, e.record.key, e.record.width, e.record.height,
                                        prelabel_source=e.source, prelabel_image=e.record.image))
        anns += coco_format.annotations(e.truth, i + 1, labels, scores=False, masks=False)
    coco_format.write(path, coco_format.document(images, anns, labels))


class TensorSet(torch.utils.data.Dataset):
    """Letterboxed uint8 images (3, S, S) held in memory with their targets in input pixels. `boxed[i]` is
    `letterbox(image, size)`: (array, scale); full-size images are never kept (see `from_arrays`)."""

    def __init__(self, boxed: list[tuple[np.ndarray, float]], truths: list[sv.Detections], labels: list[str],
                 size: int, augment: bool = False):
        self.size, self.augment = size, augment
        self.images, self.targets = [], []
        index = {name: i for i, name in enumerate(labels)}
        for (array, scale), truth in zip(boxed, truths):
            self.images.append(torch.from_numpy(array))
            names = [str(n) for n in truth.data.get("class_name", [])]
            self.targets.append({
                "boxes": torch.as_tensor(truth.xyxy * scale, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor([index[n] for n in names], dtype=torch.int64),
            })

    @classmethod
    def from_arrays(cls, images: list[np.ndarray], truths: list[sv.Detections], labels: list[str], size: int,
                    augment: bool = False) -> TensorSet:
        return cls([letterbox(a, size) for a in images], truths, labels, size, augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, target = self.images[i], self.targets[i]
        if self.augment and torch.rand(()) < 0.5:  # horizontal flip within the letterboxed content
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = self.size - target["boxes"][:, [2, 0]]
            target = {"boxes": boxes, "labels": target["labels"]}
        return image, target


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
