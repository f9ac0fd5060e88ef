"""CVAT serverless (nuclio) functions over the core. The `cvat_nuclio/*/main.py` shells only call this.

CVAT's lambda manager sends a detector `{"image": base64, "threshold": float}` and answers with a list of shapes; an
interactor `{"image", "pos_points": [[x, y]], "neg_points", "obj_bbox": [[x1, y1], [x2, y2]] | null}` and answers
with `{"mask": full-size 0/1 rows, "points": [[x, y], ...]}`. Every bad body gets status 400 and
`{"error": {"kind", "message"}}` naming the problem; the function keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..engine import ClassifyRequest, Engine, RequestSpec
from ..errors import ConfigError, ImageError, PrelabelError, RequestError, validated
from ..media import MediaItem, decode_image
from ..ontology import Classification, Ontology
from ..settings import Settings
from .convert import SHAPE_TYPES, classification_to_tags, clicks, detections_to_shapes, match_labels, polygon_points
from .engines import NO_CLICKS, clicker_engine, without_segmenter_if_sam3

log = logging.getLogger(__name__)

SHAPE_ENV = "PRELABEL_CVAT_SHAPE"  # rectangle | mask | polygon: what the detector returns for every label
PROMPTS_FILE = "prompts.yaml"  # beside main.py in the function's folder (copied there by `prelabel cvat spec`)
TAGS = "tags"  # the classify request of the prompts file's `tags:`

Point = tuple[float, float]


class DetectBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str
    threshold: float | None = Field(None, ge=0, le=1)
    labels: list[str] | None = None  # optional: only these of the function's labels


class InteractBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str
    pos_points: list[Point] = Field(default_factory=list)
    neg_points: list[Point] = Field(default_factory=list)
    obj_bbox: tuple[Point, Point] | None = None


def _parse(model: type[BaseModel], body: Any) -> Any:
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body or b"null")
        except ValueError as exc:
            raise RequestError(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return validated(model, body, RequestError, "malformed request")


def decode_base64_image(text: str, max_pixels: int) -> MediaItem:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"'image' is not valid base64 ({exc})") from None
    return decode_image(data, "in the request's 'image'", max_pixels)


def _settings(function_dir: Path | None, **overrides) -> Settings:
    """Environment first; the function folder's prompts.yaml when PRELABEL_PROMPTS is not set."""
    settings = Settings(**overrides)
    if settings.prompts is None and function_dir is not None and (function_dir / PROMPTS_FILE).exists():
        settings = Settings(prompts=function_dir / PROMPTS_FILE, **overrides)
    return settings


class DetectorFunction:
    """Boxes (and masks for `mask`/`polygon`: SAM 3's own, else SAM's on the boxes) for the labels of the prompts
    file, and tags (zero-shot classification of the whole image) for its `tags:` labels."""

    def __init__(self, engine: Engine, shape: str = "rectangle"):
        if shape not in SHAPE_TYPES:
            raise ConfigError(f"{SHAPE_ENV}={shape!r} is not one of {SHAPE_TYPES}")
        if shape != "rectangle" and not engine.gives_masks:
            engine.require_segmenter()
        self.engine, self.shape = engine, shape
        self.ontology = engine.ontology()
        self.tags: Classification | None = engine.prompts.tag_classification()
        if self.tags is not None:
            engine.require_classifier("the prompts file's `tags:`")
        if not self.ontology.labels and self.tags is None:
            raise ConfigError(f"the detector has no labels: give it a prompts file ({PROMPTS_FILE} or PRELABEL_PROMPTS)")

    @classmethod
    def from_env(cls, function_dir: Path | None = None) -> DetectorFunction:
        shape = os.environ.get(SHAPE_ENV, "rectangle")
        overrides = {"segmenter": ""} if shape == "rectangle" else {}  # boxes only: do not load SAM
        return cls(Engine.from_settings(without_segmenter_if_sam3(_settings(function_dir, **overrides))), shape)

    def label_spec(self) -> list[dict]:
        return label_spec(self.ontology, self.shape, self.tags)

    def __call__(self, body: Any) -> list[dict]:
        """Shapes for the detected labels, then tags; `threshold` replaces the box thresholds (tags keep theirs).
        CVAT sends no task data: a prompt naming a field is a clear error."""
        req = _parse(DetectBody, body)
        wanted = self._wanted(req.labels)
        ontology = replace(self.ontology, labels=tuple(s for s in self.ontology.labels if s.name in wanted))
        if req.threshold is not None:
            ontology = ontology.with_threshold(req.threshold)
        tags = self.tags is not None and bool(wanted & set(self.tags.names))
        spec = RequestSpec(ontology, (ClassifyRequest(TAGS, self.tags),) if tags else (), masks=self.shape != "rectangle")
        image = decode_base64_image(req.image, self.engine.settings.max_image_pixels)
        result = self.engine.run([image], spec)[0]
        if result.error is not None:
            raise result.error
        out = detections_to_shapes(result.detections, self.shape, image.width, image.height) if ontology.labels else []
        for scores in result.classes:
            out += [t for t in classification_to_tags(self.tags.names, scores.probs[0], scores.chosen[0]) if t["label"] in wanted]
        return out

    def _wanted(self, labels: list[str] | None) -> set[str]:
        names = self.ontology.names + (self.tags.names if self.tags else [])
        if labels is None:
            return set(names)
        try:
            return set(match_labels(labels, names).values())
        except ConfigError as exc:
            raise RequestError(f"unknown label: {exc}; this function detects {names}") from None


class InteractorFunction:
    """SAM (or SAM 3's tracker): positive/negative clicks and/or a box -> one mask; image embeddings are cached
    across clicks."""

    def __init__(self, engine: Engine):
        if engine.clicker is None:
            raise ConfigError(f"the interactor: {NO_CLICKS}")
        self.engine = engine

    @classmethod
    def from_env(cls, function_dir: Path | None = None) -> InteractorFunction:
        """PRELABEL_SEGMENTER (SAM or SAM 3), else SAM 3 as PRELABEL_DETECTOR with an empty PRELABEL_SEGMENTER."""
        return cls(clicker_engine(_settings(function_dir)))

    def __call__(self, body: Any) -> dict:
        req = _parse(InteractBody, body)
        if not req.pos_points and req.obj_bbox is None:
            raise RequestError("nothing to segment: give at least one positive point (pos_points) or a box (obj_bbox)")
        image = decode_base64_image(req.image, self.engine.settings.max_image_pixels)
        w, h = image.width, image.height
        for field in ("pos_points", "neg_points", "obj_bbox"):
            for i, (x, y) in enumerate(getattr(req, field) or ()):
                if not (0 <= x <= w and 0 <= y <= h):
                    raise RequestError(f"{field}[{i}] = ({x:g}, {y:g}) lies outside the {w}x{h} image")
        mask, score = self.engine.segment(image.array, *clicks(req.pos_points, req.neg_points, req.obj_bbox))
        flat = polygon_points(mask)
        return {
            "mask": mask.astype(np.uint8).tolist(),
            "points": [[round(x), round(y)] for x, y in zip(flat[0::2], flat[1::2])],
            "confidence": f"{score:.4f}",
        }


def label_spec(ontology: Ontology, shape: str = "rectangle", tags: Classification | None = None) -> list[dict]:
    """The detector's `metadata.annotations.spec` in function.yaml: CVAT matches these names to task labels;
    `tags` labels (whole-image classes) come after the detected ones, with type `tag`."""
    spec = [{"id": i, "name": s.name, "type": shape} for i, s in enumerate(ontology.labels)]
    return spec + [{"id": len(spec) + j, "name": name, "type": "tag"} for j, name in enumerate(tags.names if tags else [])]


def respond(context, function: Callable[[Any], Any], event) -> Any:
    """Run `function` on the event body and wrap the result (or the error) in a nuclio Response."""
    started = time.perf_counter()
    try:
        result, status = function(event.body), 200
    except PrelabelError as exc:
        status = 400 if isinstance(exc, (RequestError, ImageError)) else exc.status
        result = {"error": {"kind": exc.kind, "message": str(exc)}}
        context.logger.warn(f"{status}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one bad call must not take the function down
        log.exception("function failed")
        status, result = 500, {"error": {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        context.logger.error(f"500: {type(exc).__name__}: {exc}")
    else:
        count = len(result) if isinstance(result, list) else 1
        context.logger.info(f"{count} result(s) in {time.perf_counter() - started:.2f} s")
    return context.Response(
        body=json.dumps(result), headers={}, content_type="application/json", status_code=status
    )
