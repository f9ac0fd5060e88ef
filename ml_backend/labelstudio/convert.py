"""The one place where core Detections become Label Studio regions (percent boxes, brush RLE, polygons),
classifier probabilities become `choices` results (whole image, or per region under the region's id), and Label
Studio context regions become pixels."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import numpy as np
import supervision as sv

from ..types import clip_to_image, region_rows
from .config import ChoiceControl, Control

if TYPE_CHECKING:
    from ..engine import ClassScores

log = logging.getLogger(__name__)


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def box_to_percent(xyxy, width: int, height: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return {
        "x": 100.0 * x1 / width,
        "y": 100.0 * y1 / height,
        "width": 100.0 * (x2 - x1) / width,
        "height": 100.0 * (y2 - y1) / height,
        "rotation": 0,
    }


def percent_to_box(value: dict, width: int, height: int) -> np.ndarray:
    x, y = value["x"] * width / 100.0, value["y"] * height / 100.0
    return np.array([x, y, x + value["width"] * width / 100.0, y + value["height"] * height / 100.0], np.float32)


def percent_to_point(value: dict, width: int, height: int) -> np.ndarray:
    return np.array([value["x"] * width / 100.0, value["y"] * height / 100.0], np.float32)


# Label Studio brush RLE (thi.ng rle-pack): header = 32-bit length, 5-bit word size - 1, four 4-bit run sizes - 1;
# then per run: flag (1 = repeat), 2-bit size index, (run length - 1) in that many bits, the 8-bit value.
_RUN_BITS = np.array([3, 4, 8, 16])
_HEADER = f"{0:032b}{8 - 1:05b}" + "".join(f"{n - 1:04b}" for n in _RUN_BITS)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Brush RLE of a boolean mask, bit-identical to label-studio-sdk's `converter.brush.mask2rle(mask * 255)`,
    vectorised: the SDK's per-run Python loop takes seconds on large, ragged masks."""
    flat = mask.astype(np.uint8).ravel() * np.uint8(255)
    n = flat.size * 4  # RGBA, every channel equal
    if flat.size == 0:
        raise ValueError("cannot encode an empty mask")
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    lengths = np.diff(np.append(-1, ends)) * 4
    values = flat[ends].astype(np.uint32)
    # runs longer than 2**16 are split into 2**16-long pieces, the remainder last
    pieces = (lengths - 1) // 2**16 + 1
    values = np.repeat(values, pieces)
    last = np.cumsum(pieces) - 1
    if len(last) < len(values):
        tail = np.repeat(lengths - (pieces - 1) * 2**16, pieces)
        lengths = np.full(len(values), 2**16, np.int64)
        lengths[last] = tail[last]
    index = np.searchsorted(np.array([8, 16, 256]), lengths).astype(np.uint32)  # <=8, <=16, <=256, longer
    size = _RUN_BITS.astype(np.uint32)[index]
    repeat = (lengths > 1).astype(np.uint32)
    count = np.where(repeat == 1, lengths - 1, 0).astype(np.uint32)
    code = (repeat << (2 + size + 8)) | (index << (size + 8)) | (count << 8) | values
    width = 1 + 2 + size + 8
    shifts = np.arange(26, -1, -1, dtype=np.uint32)
    bits = ((code[:, None] >> shifts) & 1).astype(np.uint8)[shifts[None, :] < width[:, None]]
    header = np.frombuffer((f"{n:032b}" + _HEADER[32:]).encode(), np.uint8) - ord("0")
    stream = np.concatenate([header, bits, np.zeros(8 - (header.size + bits.size) % 8, np.uint8)])
    return np.packbits(stream).tolist()  # the SDK always pads, a whole zero byte when already aligned


def rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle  # heavy import, only needed to read masks back

    return np.reshape(decode_rle(rle), (height, width, 4))[:, :, 3] > 0


def mask_to_polygons(mask: np.ndarray, width: int, height: int) -> list[list[list[float]]]:
    """Polygons (percent points) of a mask's outer contours, largest first; contours under 3 points are specks."""
    polygons = sorted(sv.mask_to_polygons(mask.astype(bool)), key=len, reverse=True)
    return [[[100.0 * x / width, 100.0 * y / height] for x, y in poly.tolist()] for poly in polygons if len(poly) >= 3]


def polygon_to_mask(points: list[list[float]], width: int, height: int) -> np.ndarray:
    """Label Studio polygon points (percent) as a full-size boolean mask."""
    pixels = np.array([[x * width / 100.0, y * height / 100.0] for x, y in points], np.float64)
    return sv.polygon_to_mask(np.round(pixels).astype(int), (width, height)).astype(bool)


def _region(control: Control, width: int, height: int, value: dict, score: float | None) -> dict:
    region = {
        "id": region_id(),
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": control.type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
    }
    if score is not None:
        region["score"] = round(float(score), 6)
    return region


def choices_result(
    control: ChoiceControl, scores: ClassScores, row: int, width: int, height: int, region: dict | None = None
) -> dict | None:
    """One `choices` result: the chosen choices of `row`, `score` the lowest probability among them, and every
    choice's probability in `meta.scores` (Label Studio keeps `meta` with the prediction). Per region, it takes the
    region's `id` (that is how Label Studio links a per-region choice to its region) and a rectangle's geometry.
    None when a multi-label classification chose nothing (the probabilities then say why in the log)."""
    chosen = scores.chosen[row]
    if not chosen:
        return None
    names = scores.classification.names
    probs = scores.probs[row]
    value: dict = {}
    if region is not None and region["type"] == "rectanglelabels":
        value = {k: region["value"][k] for k in ("x", "y", "width", "height", "rotation")}
    value["choices"] = [names[j] for j in chosen]
    return {
        "id": region["id"] if region is not None else region_id(),
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": "choices",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": round(float(min(probs[j] for j in chosen)), 6),
        "meta": {"scores": {name: round(float(p), 6) for name, p in zip(names, probs)}},
    }


def detections_to_results(
    detections: sv.Detections,
    controls: list[Control],
    width: int,
    height: int,
    per_region: list[tuple[ChoiceControl, ClassScores]] | tuple = (),
) -> list[dict]:
    """Every detection whose label a control has becomes a region of that control; each per-region Choices that
    applies to the region adds a `choices` result with the region's id (rows of `per_region` are detections).
    A box with no area inside the image, and an empty mask's brush, are dropped (logged at debug level)."""
    results = []
    names = detections.data.get("class_name", [])
    xyxy = clip_to_image(detections.xyxy, width, height)
    for i in region_rows(detections.xyxy, names, width, height, "Label Studio results"):
        label = str(names[i])
        score = None if detections.confidence is None else detections.confidence[i]
        mask = None if detections.mask is None else detections.mask[i]
        for control in controls:
            if label not in control.labels:
                continue
            regions = []
            if control.type == "rectanglelabels":
                value = box_to_percent(xyxy[i], width, height) | {"rectanglelabels": [label]}
                regions.append(_region(control, width, height, value, score))
            elif mask is not None and control.type == "brushlabels" and not mask.any():
                log.debug("Label Studio results: no brush for the empty mask of label %r (box %s)", label, xyxy[i].tolist())
            elif mask is not None and control.type == "brushlabels":
                value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
                regions.append(_region(control, width, height, value, score))
            elif mask is not None and control.type == "polygonlabels":
                for points in mask_to_polygons(mask, width, height):
                    value = {"points": points, "closed": True, "polygonlabels": [label]}
                    regions.append(_region(control, width, height, value, score))
            for region in regions:
                results.append(region)
                for choice_control, scores in per_region:
                    if choice_control.applies_to(control, label):
                        choice = choices_result(choice_control, scores, i, width, height, region)
                        if choice is not None:
                            results.append(choice)
    return results
