"""The one place where core Detections become Label Studio regions (percent boxes, brush RLE, polygons), and
Label Studio context regions become pixels."""

from __future__ import annotations

import uuid

import numpy as np
import supervision as sv
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from .config import Control


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


def mask_to_rle(mask: np.ndarray) -> list[int]:
    return mask2rle(mask.astype(np.uint8) * 255)


def rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    return np.reshape(decode_rle(rle), (height, width, 4))[:, :, 3] > 0


def mask_to_polygons(mask: np.ndarray, width: int, height: int) -> list[list[list[float]]]:
    """Polygons (percent points) of a mask's outer contours, largest first; contours under 3 points are specks."""
    polygons = sorted(sv.mask_to_polygons(mask.astype(bool)), key=len, reverse=True)
    return [[[100.0 * x / width, 100.0 * y / height] for x, y in poly.tolist()] for poly in polygons if len(poly) >= 3]


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


def detections_to_results(detections: sv.Detections, controls: list[Control], width: int, height: int) -> list[dict]:
    """Every detection whose label a control has becomes a region of that control."""
    results = []
    names = detections.data.get("class_name", [])
    for i in range(len(detections)):
        label = str(names[i])
        score = None if detections.confidence is None else detections.confidence[i]
        mask = None if detections.mask is None else detections.mask[i]
        for control in controls:
            if label not in control.labels:
                continue
            if control.type == "rectanglelabels":
                value = box_to_percent(detections.xyxy[i], width, height) | {"rectanglelabels": [label]}
                results.append(_region(control, width, height, value, score))
            elif mask is not None and control.type == "brushlabels":
                value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
                results.append(_region(control, width, height, value, score))
            elif mask is not None and control.type == "polygonlabels":
                for points in mask_to_polygons(mask, width, height):
                    value = {"points": points, "closed": True, "polygonlabels": [label]}
                    results.append(_region(control, width, height, value, score))
    return results
