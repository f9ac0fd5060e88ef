"""COCO files (ours, CVAT's "COCO 1.0" export, any tool's) as neutral records, read with pycocotools: polygons, RLE
and uncompressed RLE (CVAT masks) all become full-size masks. Keys are file names, stable across exports."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import supervision as sv

from ..errors import ConfigError
from ..types import LabeledImage

log = logging.getLogger(__name__)


def _load(path: Path):
    from pycocotools.coco import COCO

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read COCO file {path}: {exc}") from None
    if isinstance(doc, list):  # a bare results list
        return doc
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ConfigError(f"COCO file {path} has no {key!r} list")
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _objects(coco, anns: list[dict], height: int, width: int, path: Path) -> list[dict]:
    objects = []
    cats = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for ann in anns:
        if ann.get("category_id") not in cats:
            raise ConfigError(f"{path}: annotation {ann.get('id')} has category {ann.get('category_id')} that is not "
                              f"among the categories {sorted(cats)}")
        x, y, w, h = ann["bbox"]
        obj = {"box": np.array([x, y, x + w, y + h], np.float32), "label": cats[ann["category_id"]],
               "score": ann.get("score")}
        if ann.get("segmentation"):
            image = coco.imgs[ann["image_id"]]
            ann = ann | {"image_id": ann["image_id"]}
            mask = coco.annToMask(ann).astype(bool)
            if mask.shape != (image["height"], image["width"]):
                raise ConfigError(f"{path}: annotation {ann.get('id')} mask is {mask.shape}, image is "
                                  f"{image['height']}x{image['width']}")
            obj["mask"] = mask if mask.any() else None
        objects.append(obj)
    return objects


def coco_records(annotations: Path, images: Path, predictions: Path | None = None,
                 model_version: str | None = None) -> list[LabeledImage]:
    """Records from a COCO ground-truth file and images below `images`; `predictions` is a COCO file or a results
    list (`score` per annotation) over the same images (matched by image id, or by file name for a document)."""
    coco = _load(annotations)
    if isinstance(coco, list):
        raise ConfigError(f"{annotations} is a results list; the ground truth must be a COCO document")
    labels = [c["name"] for c in sorted(coco.dataset["categories"], key=lambda c: c["id"])]
    pred_by_file: dict[str, list[dict]] = {}
    pred_coco = None
    if predictions is not None:
        pred_coco = _load(predictions)
        if isinstance(pred_coco, list):
            results, pred_coco = pred_coco, coco
            for ann in results:
                name = coco.imgs.get(ann.get("image_id"), {}).get("file_name")
                if name is None:
                    raise ConfigError(f"{predictions}: result for image id {ann.get('image_id')} not in {annotations}")
                pred_by_file.setdefault(name, []).append(ann)
        else:
            for img in pred_coco.dataset["images"]:
                pred_by_file[img["file_name"]] = pred_coco.imgToAnns.get(img["id"], [])
    records = []
    for img in coco.dataset["images"]:
        path = Path(images) / img["file_name"]
        if not path.is_file():
            raise ConfigError(f"image {img['file_name']} of {annotations} is not in {images}")
        h, w = int(img["height"]), int(img["width"])
        gt = _objects(coco, coco.imgToAnns.get(img["id"], []), h, w, annotations)
        pred = None
        if pred_coco is not None:
            anns = [a | {"image_id": img["id"]} for a in pred_by_file.get(img["file_name"], [])] \
                if pred_coco is coco else pred_by_file.get(img["file_name"], [])
            objs = _objects(pred_coco, anns, h, w, predictions)
            pred = LabeledImage.detections(objs, labels, w, h) or sv.Detections.empty()  # predicted: nothing found
        records.append(LabeledImage(
            key=img["file_name"], image=str(path), width=w, height=h, predictions=pred,
            # an image listed in a COCO file is annotated, even with nothing
            annotations=LabeledImage.detections(gt, labels, w, h) if gt else sv.Detections.empty(),
            link=img.get("coco_url") or None, model_version=model_version,
        ))
    return records
