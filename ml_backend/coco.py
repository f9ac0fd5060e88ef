"""The one place where core Detections become COCO: boxes `[x, y, w, h]` in pixels, masks as COCO RLE
(pycocotools), category ids 1..N in label order, `score` kept (these are predictions)."""

from __future__ import annotations

import numpy as np
import supervision as sv
from pycocotools import mask as mask_utils


def categories(names: list[str]) -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]


def annotations(detections: sv.Detections, image_id: int, names: list[str], scores: bool = True,
                masks: bool = True) -> list[dict]:
    """One COCO annotation per detection (ids are assigned when the document is assembled); `scores=False` for
    ground truth, `masks=False` for boxes only (area = box area)."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    out = []
    for i in range(len(detections)):
        x1, y1, x2, y2 = (float(v) for v in detections.xyxy[i])
        ann = {
            "image_id": image_id,
            "category_id": ids[str(detections.data["class_name"][i])],
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "area": round((x2 - x1) * (y2 - y1), 2),
            "iscrowd": 0,
        }
        if scores:
            ann["score"] = round(float(detections.confidence[i]), 4)
        if masks and detections.mask is not None:
            rle = mask_utils.encode(np.asfortranarray(detections.mask[i].astype(np.uint8)))
            ann["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            ann["area"] = float(mask_utils.area(rle))
        out.append(ann)
    return out


def document(images: list[dict], anns: list[dict], names: list[str]) -> dict:
    """`images`: `{"id", "file_name", "width", "height"}`; annotation ids are numbered here, from 1."""
    return {
        "info": {"description": "prelabel pre-annotations"},
        "images": images,
        "annotations": [a | {"id": i + 1} for i, a in enumerate(anns)],
        "categories": categories(names),
    }
