"""A cvat-sdk interaction function (CVAT's agent-based AI tools): SAM (or SAM 3's tracker) turns clicks and/or a box
into a mask; with SAM 3 and `find_all`, a box around one object returns a mask for every object like it.

    cvat-cli function create-native "SAM (prelabel)" --function-module ml_backend.cvat.interaction \\
        [-p segmenter=str:facebook/sam-vit-huge] [-p device=str:cuda]
    cvat-cli function run-agent FUNCTION_ID --function-module ml_backend.cvat.interaction [-p ...]

Parameters (`-p NAME=TYPE:VALUE`): `segmenter` (SAM or SAM 3, for clicks), `detector` (SAM 3: clicks go to its
tracker when no `segmenter` is given), `find_all` (`bool:true`: the box is an exemplar, see below), `threshold`
(`float:`, find-all's score threshold; default the prompts file's `box_threshold`), `prompts`, `device`.

Find all like this (`-p detector=str:facebook/sam3 -p find_all=bool:true`): the box drawn around one object is
SAM 3's positive exemplar, and the answer is one mask per similar object in the frame, best first; each negative
point removes the found objects whose mask contains it (positive points are not used with a box). Clicks without
a box still give the one mask of the clicked object (SAM 3's tracker, or the segmenter).

`preprocess_image` computes the image features once (and keeps them in the model's cache too); `detect` then costs
only the decoders per set of prompts. Agents need CVAT Online or Enterprise; on free self-hosted CVAT use the nuclio
interactor in `cvat_nuclio/sam` (one mask per interaction: CVAT's nuclio interactors return a single shape).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
from cvat_sdk import models

from ..errors import ConfigError, RequestError
from ..ontology import LabelSpec
from ..settings import Settings
from .convert import clicks, mask_points
from .engines import NO_CLICKS, clicker_engine, exemplar_engine

LIKE = "like the box"  # the label find-all's instances carry inside the engine (CVAT gives the shapes its own)


@dataclass(frozen=True)
class PreparedImage:
    array: np.ndarray  # RGB uint8; its features are in the model's cache


def confidence(score: float) -> models.AttributeValRequest:
    return models.AttributeValRequest(spec_id=cvataa.InteractionResultAttributes.CONFIDENCE, value=f"{score:.4f}")


class PrelabelInteractionFunction:
    spec = cvataa.InteractionFunctionSpec(min_pos_points=0, min_neg_points=0, min_bounding_boxes=0)

    def __init__(self, segmenter: str | None = None, device: str | None = None, prompts: str | None = None,
                 detector: str | None = None, find_all: bool = False, threshold: float | None = None):
        overrides = {k: v for k, v in dict(device=device, prompts=prompts, detector=detector).items() if v}
        if segmenter is not None:
            overrides["segmenter"] = "" if segmenter.lower() == "none" else segmenter
        elif detector or find_all:
            overrides["segmenter"] = ""  # SAM 3's tracker takes the clicks: one model
        settings = Settings(**overrides)
        if threshold is not None and not 0 <= threshold <= 1:
            raise ConfigError(f"threshold {threshold} is not between 0 and 1")
        self.find_all = find_all
        self.engine = exemplar_engine(settings) if find_all else clicker_engine(settings)
        if find_all:  # one label with find-all's threshold; the prompts file's nms_iou and max_detections
            ontology = self.engine.ontology()
            spec = LabelSpec(LIKE, (), self.engine.prompts.box_threshold if threshold is None else threshold)
            self.ontology = replace(ontology, labels=(spec,))
        self._features = self.engine.clicker or self.engine.detector  # what caches the image's features

    def preprocess_image(self, context: cvataa.InteractionFunctionContext, image: PIL.Image.Image) -> PreparedImage:
        array = np.array(image.convert("RGB"))
        self._features.prepare(array)
        return PreparedImage(array)

    def detect(
        self, context: cvataa.InteractionFunctionContext, pp_image: PreparedImage, prompts: cvataa.InteractionPrompts
    ) -> list[cvataa.InteractionResultShape]:
        points, labels, box = clicks(prompts.pos_points, prompts.neg_points, prompts.bounding_box)
        if self.find_all and box is not None:
            return self.find_like(pp_image.array, box, prompts.neg_points)
        if points is None and box is None:
            return []
        if self.engine.clicker is None:
            raise RequestError(f"draw a box around one object: this function finds every object like it ({NO_CLICKS})")
        mask, score = self.engine.segment(pp_image.array, points, labels, box)
        if not mask.any():
            return []
        return [cvataa.InteractionResultShape(type="mask", points=mask_points(mask), attributes=[confidence(score)])]

    def find_like(self, image: np.ndarray, box: np.ndarray, neg_points) -> list[cvataa.InteractionResultShape]:
        """A mask for every object like the one in `box` (SAM 3 exemplar), best first, but those whose mask holds
        a negative point."""
        h, w = image.shape[:2]
        for i, (x, y) in enumerate(neg_points):
            if not (0 <= x <= w and 0 <= y <= h):
                raise RequestError(f"negative point {i} ({x:g}, {y:g}) lies outside the {w}x{h} image")
        found = self.engine.find_like(image, box[None], np.ones(1, int), LIKE, self.ontology)
        pixels = [(min(int(y), h - 1), min(int(x), w - 1)) for x, y in neg_points]
        return [
            cvataa.InteractionResultShape(type="mask", points=mask_points(mask, xyxy), attributes=[confidence(score)])
            for mask, xyxy, score in zip(found.mask, found.xyxy, found.confidence)
            if not any(mask[y, x] for y, x in pixels)
        ]


create = PrelabelInteractionFunction
