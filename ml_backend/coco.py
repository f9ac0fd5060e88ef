"""COCO is read and written here and nowhere else: documents (`images`, `annotations`, `categories`), results lists
(bare annotations with `score`), boxes `[x, y, w, h]` in pixels, masks as COCO RLE (pycocotools; polygons and
uncompressed RLE, as CVAT writes them, are read too), category ids 1..N in label order. Written from core
Detections; read back as neutral records (`LabeledImage`) keyed by file name, stable across exports."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import supervision as sv
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .errors import ConfigError
from .types import LabeledImage, clip_to_image, region_rows

log = logging.getLogger(__name__)

# -- writing -------------------------------------------------------------------------------------------------------


def categories(names: list[str]) -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]


def image(image_id: int, file_name: str, width: int, height: int, **extra) -> dict:
    """One `images` entry; `extra` keys (ours, e.g. `prelabel_source`) follow the standard ones."""
    return {"id": image_id, "file_name": file_name, "width": width, "height": height, **extra}


def annotations(detections: sv.Detections, image_id: int, names: list[str], scores: bool = True,
                masks: bool = True, width: int | None = None, height: int | None = None) -> list[dict]:
    """One COCO annotation per detection (ids are assigned when the document is assembled); `scores=False` for
    ground truth, `masks=False` for boxes only (area = box area). With scores and without ids, a results list.
    Boxes are clipped to the image (`width` x `height`, else the masks' size, else unbounded); one with no area
    there, as written, is dropped and an empty mask leaves its box without a segmentation (logged at debug level)."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    if width is None and height is None and detections.mask is not None:
        height, width = detections.mask.shape[1:]
    label_names = detections.data.get("class_name")
    xyxy = clip_to_image(np.asarray(detections.xyxy, np.float64), width, height)
    out = []
    for i in region_rows(xyxy, label_names, width, height, f"COCO image {image_id}"):
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
        if bbox[2] <= 0 or bbox[3] <= 0:
            log.debug("COCO image %s: dropped the box %s of label %r: under 0.01 px wide or high", image_id,
                      xyxy[i].tolist(), label_names[i])
            continue
        ann = {
            "image_id": image_id,
            "category_id": ids[str(label_names[i])],
            "bbox": bbox,
            "area": round((x2 - x1) * (y2 - y1), 2),
            "iscrowd": 0,
        }
        if scores:
            ann["score"] = round(float(detections.confidence[i]), 4)
        if masks and detections.mask is not None and not detections.mask[i].any():
            log.debug("COCO image %s: no segmentation for the empty mask of label %r", image_id, label_names[i])
        elif masks and detections.mask is not None:
            rle = mask_utils.encode(np.asfortranarray(detections.mask[i].astype(np.uint8)))
            ann["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            ann["area"] = float(mask_utils.area(rle))
        out.append(ann)
    return out


def document(images: list[dict], anns: list[dict], names: list[str]) -> dict:
    """`images`: entries of `image()`; annotation ids are numbered here, from 1."""
    return {
        "info": {"description": "prelabel pre-annotations"},
        "images": images,
        "annotations": [a | {"id": i + 1} for i, a in enumerate(anns)],
        "categories": categories(names),
    }


def write(path: Path, doc: dict | list) -> None:
    Path(path).write_text(json.dumps(doc))


# -- reading -------------------------------------------------------------------------------------------------------


def index(doc: dict) -> COCO:
    """pycocotools' index of a document (quietly: it prints its progress)."""
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read(path: Path) -> COCO | list[dict]:
    """A COCO file: a document (indexed, its three lists checked) or a bare results list."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read COCO file {path}: {exc}") from None
    if isinstance(doc, list):  # a bare results list
        return doc
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ConfigError(f"COCO file {path} has no {key!r} list")
    return index(doc)


def category_names(coco: COCO) -> list[str]:
    """The label names of a document, in category id order."""
    return [c["name"] for c in sorted(coco.dataset["categories"], key=lambda c: c["id"])]


def _objects(coco: COCO, anns: list[dict], path: Path) -> list[dict]:
    """Annotations as reader objects `{"box": xyxy, "label", "score", "mask"?}` (see `LabeledImage.detections`)."""
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
            img = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann).astype(bool)
            if mask.shape != (img["height"], img["width"]):
                raise ConfigError(f"{path}: annotation {ann.get('id')} mask is {mask.shape}, image is "
                                  f"{img['height']}x{img['width']}")
            obj["mask"] = mask if mask.any() else None
        objects.append(obj)
    return objects


def read_records(annotations: Path, images: Path, predictions: Path | None = None,
                 model_version: str | None = None) -> list[LabeledImage]:
    """Records from a COCO ground-truth file (ours, CVAT's "COCO 1.0", any tool's) and images below `images`;
    `predictions` is a COCO file or a results list (`score` per annotation) over the same images (matched by image
    id, or by file name for a document)."""
    coco = read(annotations)
    if isinstance(coco, list):
        raise ConfigError(f"{annotations} is a results list; the ground truth must be a COCO document")
    labels = category_names(coco)
    pred_by_file: dict[str, list[dict]] = {}
    pred_coco = None
    if predictions is not None:
        pred_coco = read(predictions)
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
        gt = _objects(coco, coco.imgToAnns.get(img["id"], []), annotations)
        pred = None
        if pred_coco is not None:
            anns = [a | {"image_id": img["id"]} for a in pred_by_file.get(img["file_name"], [])] \
                if pred_coco is coco else pred_by_file.get(img["file_name"], [])
            objs = _objects(pred_coco, anns, predictions)
            pred = LabeledImage.detections(objs, labels, w, h) or sv.Detections.empty()  # predicted: nothing found
        records.append(LabeledImage(
            key=img["file_name"], image=str(path), width=w, height=h, predictions=pred,
            # an image listed in a COCO file is annotated, even with nothing
            annotations=LabeledImage.detections(gt, labels, w, h) if gt else sv.Detections.empty(),
            link=img.get("coco_url") or None, model_version=model_version,
        ))
    return records
