"""The one place where core Detections become FiftyOne labels: relative `[x, y, w, h]` boxes (top-left), the mask
cropped to the box (`types.clip_box`), and back to pixel boxes."""

from __future__ import annotations

import numpy as np
import supervision as sv

from ..types import clip_box, region_rows


def to_detections(detections: sv.Detections | None, width: int, height: int, **attributes):
    """`fo.Detections` of core Detections; `attributes` are set on every object."""
    import fiftyone as fo

    if detections is None:
        return None
    out = []
    names = detections.data.get("class_name", [])
    has_mask = detections.data.get("has_mask")
    for i in region_rows(detections.xyxy, names, width, height, "FiftyOne detections"):
        x1, y1, x2, y2 = clip_box(detections.xyxy[i], width, height)
        det = fo.Detection(
            label=str(names[i]),
            bounding_box=[x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height],
            confidence=None if detections.confidence is None else float(detections.confidence[i]),
            **attributes,
        )
        if detections.mask is not None and (has_mask is None or has_mask[i]):
            det.mask = np.ascontiguousarray(detections.mask[i][y1:y2, x1:x2].astype(bool))
        out.append(det)
    return fo.Detections(detections=out)


def to_pixels(bounding_box, width: int, height: int) -> np.ndarray:
    """A FiftyOne relative box as pixel xyxy."""
    x, y, w, h = bounding_box
    return np.array([x * width, y * height, (x + w) * width, (y + h) * height], np.float32)
