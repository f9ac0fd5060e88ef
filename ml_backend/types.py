"""The neutral currency: `supervision.Detections` with absolute pixel `xyxy`, `confidence`, `class_id` (index into
the ontology's labels), `data["class_name"]` (the label) and optional full-size boolean `mask` (N, H, W).
Adapters convert from and to it; none invents a twin."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import supervision as sv

# Named extras a model puts beside each box (`Detections.data[...]`) or per image (`Detections.metadata[...]`);
# `active.py` turns them into the uncertainty that ranks images hardest first.
CLASS_NAME = "class_name"  # data: the label of each box
PROMPT = "prompt"  # data: the synonym prompt that found the box
RUNNER_UP = "runner_up"  # data: the best score another label got for the same box (label confusion)
SYNONYM_SPREAD = "synonym_spread"  # data: how much the chosen label's own prompts disagreed (0 with one prompt)
CLASS_PROBABILITY = "class_probability"  # data, two-stage: the classifier's probability of the chosen label
NEAR_MISSES = "near_misses"  # metadata: `score - threshold` (< 0) of candidates dropped within NEAR_MISS_BAND
NEAR_MISS_BAND = 0.1  # how far below its threshold a dropped candidate still counts as a near miss

log = logging.getLogger(__name__)


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU (N, M) of absolute xyxy boxes (N, 4) x (M, 4), in float64; 0 where both boxes are empty."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a, area_b = (np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1) for x in (a, b))
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The exact xyxy box of a non-empty boolean mask, pixel edges included (a pixel at column x spans [x, x + 1))."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def clip_box(xyxy, width: int, height: int) -> tuple[int, int, int, int]:
    """The whole pixels an xyxy box touches, as slice bounds (x1, y1, x2, y2): rounded outwards (floor, ceil),
    clipped to the image, at least one pixel wide and high (a box outside the image gets its nearest edge pixel)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    x1, y1 = min(max(0, int(np.floor(x1))), width - 1), min(max(0, int(np.floor(y1))), height - 1)
    x2, y2 = max(x1 + 1, min(width, int(np.ceil(x2)))), max(y1 + 1, min(height, int(np.ceil(y2))))
    return x1, y1, x2, y2


def valid_boxes(xyxy, width: float | None = None, height: float | None = None) -> np.ndarray:
    """Which xyxy boxes are regions of a `width` x `height` image (None: unbounded on that side): finite, with
    positive width and height once clipped to the image. Zero-size, inverted, off-image and NaN boxes are not."""
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    w, h = (np.inf if v is None else float(v) for v in (width, height))
    with np.errstate(invalid="ignore"):  # NaN compares False: invalid
        clipped = np.clip(xyxy, 0, [w, h, w, h])
        return np.isfinite(xyxy).all(1) & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


def region_rows(xyxy, names, width: float | None, height: float | None, where: str) -> np.ndarray:
    """The indices of the xyxy boxes that are regions of the image (`valid_boxes`); each other one is logged (debug)
    with its box, its label (`names`, or None) and `where` it was dropped."""
    xyxy = np.asarray(xyxy).reshape(-1, 4)
    keep = valid_boxes(xyxy, width, height)
    for i in np.flatnonzero(~keep):
        log.debug("%s: dropped the box %s of label %r: it has no area inside the %sx%s image", where,
                  xyxy[i].tolist(), None if names is None else names[i], width, height)
    return np.flatnonzero(keep)


def clip_to_image(xyxy, width: float | None, height: float | None) -> np.ndarray:
    """xyxy boxes (float) clipped to a `width` x `height` image (None: unbounded on that side)."""
    xyxy = np.asarray(xyxy)
    w, h = (np.inf if v is None else v for v in (width, height))
    return np.clip(xyxy, 0, np.array([w, h, w, h], np.float64)).astype(xyxy.dtype)


def image_regions(detections: sv.Detections, width: float | None, height: float | None, where: str) -> sv.Detections:
    """`detections` whose boxes are regions of the image (`region_rows`), clipped to it (a new Detections when
    anything changes; the caller's stay as they were)."""
    rows = region_rows(detections.xyxy, detections.data.get(CLASS_NAME), width, height, where)
    if len(rows) < len(detections):
        detections = detections[rows]
    clipped = clip_to_image(detections.xyxy, width, height)
    return detections if np.array_equal(clipped, detections.xyxy) else replace(detections, xyxy=clipped)


def crop(image: np.ndarray, xyxy) -> np.ndarray:
    """The pixels of an (H, W, ...) image inside an xyxy box (`clip_box`: at least one pixel, within the image)."""
    x1, y1, x2, y2 = clip_box(xyxy, image.shape[1], image.shape[0])
    return image[y1:y2, x1:x2]


def make_detections(xyxy, confidence, class_id, names, mask=None, **data) -> sv.Detections:
    return sv.Detections(
        xyxy=np.asarray(xyxy, np.float32).reshape(-1, 4),
        confidence=np.asarray(confidence, np.float32),
        class_id=np.asarray(class_id, int),
        mask=mask,
        data={CLASS_NAME: np.asarray(names, dtype=object), **data},
    )


@dataclass
class LabeledImage:
    """One image as a labeling tool holds it, in neutral terms: what the model predicted and what people annotated
    (both Detections as above; masks full-size, rows without a mask have `data["has_mask"]` False), a stable `key`
    (e.g. the task id) and a link back to the tool. Readers of the tools produce these; review/distill consume them."""

    key: str
    image: str  # local path, or a reference (URL, Label Studio path) an ImageSource resolves
    width: int | None = None
    height: int | None = None
    predictions: sv.Detections | None = None
    annotations: sv.Detections | None = None
    link: str | None = None
    model_version: str | None = None
    extra: dict = field(default_factory=dict)  # tool-specific scalars worth keeping (e.g. annotator, task id)

    @staticmethod
    def detections(objects: list[dict], labels: list[str], width: int, height: int) -> sv.Detections | None:
        """Detections from reader objects `{"box": xyxy px, "label", "score"?, "mask"?: full-size bool}`; class ids
        index `labels` (a label not in it is appended). Mixed box/mask rows get empty masks with has_mask False."""
        if not objects:
            return None
        for o in objects:
            if o["label"] not in labels:
                labels.append(o["label"])
        has_mask = np.array([o.get("mask") is not None for o in objects])
        mask = None
        if has_mask.any():
            mask = np.zeros((len(objects), height, width), bool)
            for i, o in enumerate(objects):
                if o.get("mask") is not None:
                    mask[i] = o["mask"]
        scores = [1.0 if o.get("score") is None else float(o["score"]) for o in objects]
        return make_detections([o["box"] for o in objects], scores, [labels.index(o["label"]) for o in objects],
                               [o["label"] for o in objects], mask=mask, has_mask=has_mask)
