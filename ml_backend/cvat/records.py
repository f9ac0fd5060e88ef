"""A CVAT "CVAT for images 1.1" XML export as neutral records: boxes, polygons and masks (CVAT's `rle` attribute:
run lengths over the mask's own box, decoded by `convert.points_to_mask`). CVAT's "COCO 1.0" export is plain COCO and
is read by the COCO reader (`ml_backend.coco.read_records`). Keys are image names; a shape's `source`
("auto" for a model's, "manual" for a person's) decides whether it is a prediction or an annotation."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import supervision as sv

from ..errors import ConfigError
from ..types import LabeledImage
from .convert import points_to_mask


def _floats(text: str, where: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{where}: cannot read points {text!r}") from None


def shape_object(el: ET.Element, width: int, height: int, where: str) -> dict | None:
    """One `<box>`, `<polygon>` or `<mask>` as a reader object; other shapes (points, polylines...) give None."""
    label = el.get("label")
    if not label:
        raise ConfigError(f"{where}: <{el.tag}> has no label")
    where = f"{where} <{el.tag} label={label!r}>"
    score = el.get("score")  # CVAT keeps no confidence; ours may carry one as an attribute
    for attr in el.findall("attribute"):
        if attr.get("name") in ("score", "confidence"):
            score = attr.text
    obj = {"label": label, "score": float(score) if score else None}
    if el.tag == "box":
        obj["box"] = np.array([float(el.get(k)) for k in ("xtl", "ytl", "xbr", "ybr")], np.float32)
    elif el.tag == "polygon":
        xy = np.array(_floats(el.get("points", ""), where), np.float64).reshape(-1, 2)
        if len(xy) < 3:
            raise ConfigError(f"{where}: a polygon needs 3 points, it has {len(xy)}")
        obj["mask"] = sv.polygon_to_mask(np.round(xy).astype(int), (width, height)).astype(bool)
        obj["box"] = np.array([*xy.min(0), *xy.max(0)], np.float32)
    elif el.tag == "mask":
        left, top, w, h = (int(el.get(k)) for k in ("left", "top", "width", "height"))
        runs = [int(v) for v in _floats(el.get("rle", ""), where)]
        if sum(runs) != w * h:
            raise ConfigError(f"{where}: rle covers {sum(runs)} pixels, the mask box {w}x{h} has {w * h}")
        obj["mask"] = points_to_mask(runs + [left, top, left + w - 1, top + h - 1], width, height).astype(bool)
        obj["box"] = np.array([left, top, left + w, top + h], np.float32)
    else:
        return None
    return obj


def _read(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"cannot read CVAT XML {path}: {exc}") from None


def _labels(root: ET.Element) -> list[str]:
    return [lab.findtext("name") for lab in root.iter("label") if lab.findtext("name")]  # meta: class order


def cvat_xml_labels(path: Path) -> list[str]:
    """The label names of a CVAT for images 1.1 XML file (its meta), in CVAT's order."""
    return _labels(_read(path))


def cvat_xml_records(path: Path, images: Path, link_base: str | None = None) -> list[LabeledImage]:
    """Records from a CVAT for images 1.1 XML file; images are looked up below `images` by their name. With
    `link_base` (e.g. `https://cvat.example/tasks/12/jobs/34`), links are `<link_base>?frame=<id>`."""
    root = _read(path)
    labels = _labels(root)
    records = []
    for image in root.iter("image"):
        name = image.get("name")
        where = f"{path} image {name!r}"
        width, height = int(image.get("width")), int(image.get("height"))
        file = Path(images) / name
        if not file.is_file():
            file = Path(images) / Path(name).name
        if not file.is_file():
            raise ConfigError(f"{where}: no such image below {images}")
        preds, anns = [], []
        for el in image:
            obj = shape_object(el, width, height, where)
            if obj is not None:
                (preds if el.get("source") == "auto" else anns).append(obj)
        records.append(LabeledImage(
            key=name, image=str(file), width=width, height=height,
            predictions=LabeledImage.detections(preds, labels, width, height),
            annotations=LabeledImage.detections(anns, labels, width, height) or sv.Detections.empty(),
            link=f"{link_base}?frame={image.get('id')}" if link_base else None,
        ))
    return records
