"""The neutral currency: `supervision.Detections` with absolute pixel `xyxy`, `confidence`, `class_id` (index into
the ontology's labels), `data["class_name"]` (the label) and optional full-size boolean `mask` (N, H, W).
Adapters convert from and to it; none invents a twin."""

from __future__ import annotations

import numpy as np
import supervision as sv


def make_detections(xyxy, confidence, class_id, names, mask=None, **data) -> sv.Detections:
    return sv.Detections(
        xyxy=np.asarray(xyxy, np.float32).reshape(-1, 4),
        confidence=np.asarray(confidence, np.float32),
        class_id=np.asarray(class_id, int),
        mask=mask,
        data={"class_name": np.asarray(names, dtype=object), **data},
    )
