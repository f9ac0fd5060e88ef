"""Synthetic images with exact boxes and masks, for distillation tests and benchmarks.

Each image has a noisy gradient background and 1 to `max_objects` filled shapes of random colour; the class is the
shape (so a detector must learn form, not colour). Masks are the shapes' exact pixels (a later shape may cover an
earlier one: masks and boxes describe what stays visible; a shape left with less than `min_visible` of its area
is dropped from the labels, its visible rest stays in the image as clutter).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import coco as coco_format
from ..types import LabeledImage, make_detections, mask_box

SHAPES = ("circle", "square", "triangle")


def _draw(kind: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("1", size)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=1)
    return np.asarray(canvas, bool)


def synthetic_image(rng: np.random.Generator, size: tuple[int, int] = (160, 160), max_objects: int = 4,
                    object_size: tuple[int, int] = (16, 64), max_overlap: float = 0.15, min_visible: float = 0.6,
                    classes: tuple[str, ...] = SHAPES) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(RGB image H x W x 3, class names, masks N x H x W)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a, b, c = rng.uniform(-0.5, 0.5, 3)
    base = rng.integers(40, 200, 3)
    image = base + 60 * (a * xx / w + b * yy / h + c)[..., None] + rng.normal(0, 12, (h, w, 3))
    image = image.clip(0, 255)
    masks, names, drawn = [], [], []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(20):  # shapes may touch but not hide each other
            side = int(rng.integers(*object_size))
            bw, bh = side, int(np.clip(side * rng.uniform(0.8, 1.25), object_size[0], object_size[1]))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            if all(_overlap((x0, y0, x0 + bw, y0 + bh), other) < max_overlap for other in boxes):
                break
        else:
            continue
        boxes.append((x0, y0, x0 + bw, y0 + bh))
        kind = classes[rng.integers(len(classes))]
        mask = _draw(kind, (x0, y0, x0 + bw, y0 + bh), (w, h))
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - image[mask].mean(0)).sum() < 120:  # keep it visible against what it covers
            colour = rng.integers(0, 256, 3)
        image[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        names.append(kind)
        drawn.append(mask.sum())
    keep = [i for i, m in enumerate(masks) if m.sum() >= min_visible * drawn[i]]
    masks = [masks[i] for i in keep]
    names = [names[i] for i in keep]
    return image.clip(0, 255).astype(np.uint8), names, np.array(masks, bool).reshape(-1, h, w)


def generate(out_dir: Path, images: int = 200, seed: int = 0, size: tuple[int, int] = (160, 160),
             max_objects: int = 4, classes: tuple[str, ...] = SHAPES,
             object_size: tuple[int, int] | None = None, sizes: list[tuple[int, int]] | None = None,
             max_overlap: float = 0.15) -> list[LabeledImage]:
    """Writes `out_dir/images/*.png` and `out_dir/annotations.json` (COCO with RLE masks); returns the records
    (annotations exact, no predictions). Each image is `size`, or one of `sizes` (width, height) drawn at random;
    objects overlap by up to `max_overlap` of the smaller one's box and measure from 1/10 to 2/5 of the image's
    shorter side by default."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, coco_images, anns = [], [], []
    labels = list(classes)
    for i in range(images):
        wh = tuple(sizes[rng.integers(len(sizes))]) if sizes else tuple(size)
        side = min(wh)
        objects = object_size or (max(8, side // 10), side * 2 // 5)
        array, names, masks = synthetic_image(rng, wh, max_objects, objects, max_overlap, classes=classes)
        name = f"synthetic-{i:05d}.png"
        Image.fromarray(array).save(out_dir / "images" / name)
        boxes = np.array([mask_box(m) for m in masks], np.float32).reshape(-1, 4)
        det = make_detections(boxes, np.ones(len(names)), [labels.index(n) for n in names], names, mask=masks)
        records.append(LabeledImage(key=name, image=str(out_dir / "images" / name), width=wh[0], height=wh[1],
                                    annotations=det))
        coco_images.append(coco_format.image(i + 1, name, wh[0], wh[1]))
        anns += coco_format.annotations(det, i + 1, labels, scores=False)
    coco_format.write(out_dir / "annotations.json", coco_format.document(coco_images, anns, labels))
    return records


def _overlap(a: tuple, b: tuple) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
