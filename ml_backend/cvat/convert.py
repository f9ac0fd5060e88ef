"""The one place where core Detections become CVAT shapes: `rectangle` (x1, y1, x2, y2), `mask` (CVAT's run lengths
over the box crop with the inclusive box appended, via `cvat_sdk.masks`) and `polygon` (flat x, y list); and where
classifier choices become CVAT tags (`{"type": "tag"}` in a serverless answer, `cvat_sdk.auto_annotation.tag`)."""

from __future__ import annotations

import numpy as np
import supervision as sv
from cvat_sdk.masks import decode_mask, encode_mask

from ..errors import ConfigError
from ..types import clip_box, clip_to_image, region_rows

SHAPE_TYPES = ("rectangle", "mask", "polygon")


def rectangle_points(xyxy) -> list[float]:
    return [round(float(v), 2) for v in xyxy]


def mask_points(mask: np.ndarray, xyxy=None) -> list[float]:
    """CVAT mask encoding of a full-size boolean mask (tight box around its pixels). An empty mask with a box
    becomes that box filled: the detection is kept, not turned into nothing."""
    mask = mask.astype(bool)
    if xyxy is not None and not mask.any():
        x1, y1, x2, y2 = clip_box(xyxy, mask.shape[1], mask.shape[0])
        mask = mask.copy()
        mask[y1:y2, x1:x2] = True
    return encode_mask(mask)


def points_to_mask(points: list[float], width: int, height: int) -> np.ndarray:
    return decode_mask(points, image_width=width, image_height=height)


def polygon_points(mask: np.ndarray) -> list[float]:
    """The largest outer contour of a mask as CVAT's flat [x1, y1, x2, y2, ...] (empty if under 3 points)."""
    polygons = [p for p in sv.mask_to_polygons(mask.astype(bool)) if len(p) >= 3]
    if not polygons:
        return []
    return [float(v) for v in max(polygons, key=len).reshape(-1)]


def outline_points(mask: np.ndarray, xyxy) -> list[float]:
    """A polygon for a mask; a speck with no outline of 3 points gets its box corners: nothing is dropped."""
    x1, y1, x2, y2 = rectangle_points(xyxy)
    return polygon_points(mask) or [x1, y1, x2, y1, x2, y2, x1, y2]


def match_labels(names: list[str], cvat_labels: list[str]) -> dict[str, str]:
    """Our label -> CVAT label, by exact then case-insensitive name; a label CVAT does not have is an error naming
    both sides."""
    folded = {c.casefold(): c for c in cvat_labels}
    out, missing = {}, []
    for name in names:
        match = name if name in cvat_labels else folded.get(name.casefold())
        if match is None:
            missing.append(name)
        else:
            out[name] = match
    if missing:
        raise ConfigError(f"labels {missing} are not labels of the CVAT task {sorted(cvat_labels)}")
    return out


def shape_points(shape_type: str, xyxy, mask: np.ndarray | None) -> list[float]:
    """What CVAT stores as a shape's points: a rectangle's corners, a mask's run lengths (with its box), a
    polygon's outline."""
    if shape_type == "rectangle":
        return rectangle_points(xyxy)
    if mask is None:
        raise ConfigError(f"{shape_type} shapes need masks: run with a segmenter")
    return mask_points(mask, xyxy) if shape_type == "mask" else outline_points(mask, xyxy)


def clicks(pos: list, neg: list, corners) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """CVAT's interactor prompts -> (points (P, 2), their labels (1 positive, 0 negative), one xyxy box from two
    opposite corners), each None when absent."""
    both = [(p, 1) for p in pos] + [(p, 0) for p in neg]
    points = np.array([p for p, _ in both], np.float32).reshape(-1, 2) if both else None
    labels = np.array([label for _, label in both]) if both else None
    box = None
    if corners is not None:
        (x1, y1), (x2, y2) = corners
        box = np.array([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], np.float32)
    return points, labels, box


def shape_boxes(detections: sv.Detections, width: int | None, height: int | None, where: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, boxes): the detections whose boxes, clipped to the image (`width` x `height`, else the masks' size,
    else unbounded) and rounded as CVAT stores them, still have an area; a dropped one is logged (debug)."""
    if width is None and height is None and detections.mask is not None:
        height, width = detections.mask.shape[1:]
    clipped = clip_to_image(np.asarray(detections.xyxy, np.float64), width, height)
    xyxy = np.array([rectangle_points(box) for box in clipped], np.float64).reshape(-1, 4)
    return region_rows(xyxy, detections.data.get("class_name"), width, height, where), xyxy


def detections_to_shapes(detections: sv.Detections, shape_type: str = "rectangle", width: int | None = None,
                         height: int | None = None) -> list[dict]:
    """CVAT's serverless response: one dict per detection, confidence as a string, as CVAT's own functions send;
    a mask also carries its outline as `points`. A box with no area in the image is dropped (`shape_boxes`)."""
    if shape_type not in SHAPE_TYPES:
        raise ConfigError(f"shape type {shape_type!r} is not one of {SHAPE_TYPES}")
    if shape_type != "rectangle" and detections.mask is None:
        raise ConfigError(f"{shape_type} shapes need masks: run with a segmenter")
    shapes = []
    names = detections.data.get("class_name", [])
    rows, xyxy = shape_boxes(detections, width, height, "CVAT shapes")
    for i in rows:
        shape = {"confidence": f"{float(detections.confidence[i]):.4f}", "label": str(names[i]), "type": shape_type}
        mask = None if detections.mask is None else detections.mask[i]
        if shape_type == "mask":
            shape["mask"] = shape_points("mask", xyxy[i], mask)
            shape["points"] = polygon_points(mask)
        else:
            shape["points"] = shape_points(shape_type, xyxy[i], mask)
        shapes.append(shape)
    return shapes


def detections_to_sdk_shapes(detections: sv.Detections, shapes: dict[str, str], conv_mask_to_poly: bool = False,
                             width: int | None = None, height: int | None = None) -> list:
    """cvat-sdk auto-annotation shapes: each detection as its label's shape type (`shapes`), a mask as a polygon
    when CVAT asks to convert them; a detection's class id is its label's id in the function spec. A box with no
    area in the image is dropped (`shape_boxes`)."""
    import cvat_sdk.auto_annotation as cvataa

    out = []
    names = detections.data.get("class_name", [])
    rows, xyxy = shape_boxes(detections, width, height, "CVAT auto-annotation shapes")
    for i in rows:
        shape_type = shapes[str(names[i])]
        if shape_type == "mask" and conv_mask_to_poly:
            shape_type = "polygon"
        mask = None if detections.mask is None else detections.mask[i]
        points = shape_points(shape_type, xyxy[i], mask)
        make = {"rectangle": cvataa.rectangle, "mask": cvataa.mask, "polygon": cvataa.polygon}[shape_type]
        out.append(make(int(detections.class_id[i]), points, score=float(detections.confidence[i])))
    return out


def classification_to_tags(names: list[str], probs, chosen: list[int]) -> list[dict]:
    """A serverless detector's tags for one image: the chosen classes, best first, confidence as a string."""
    return [{"confidence": f"{float(probs[j]):.4f}", "label": names[j], "type": "tag"} for j in chosen]


def classification_to_sdk_tags(label_ids: list[int], chosen: list[int]) -> list:
    """cvat-sdk auto-annotation tags (`LabeledImageRequest`; CVAT stores no score on a tag)."""
    import cvat_sdk.auto_annotation as cvataa

    return [cvataa.tag(label_ids[j]) for j in chosen]
