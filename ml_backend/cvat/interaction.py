"""A cvat-sdk interaction function (CVAT's agent-based AI tools): SAM turns clicks and/or a box into a mask.

    cvat-cli function create-native "SAM (prelabel)" --function-module ml_backend.cvat.interaction \\
        [-p segmenter=str:facebook/sam-vit-huge] [-p device=str:cuda]
    cvat-cli function run-agent FUNCTION_ID --function-module ml_backend.cvat.interaction [-p ...]

`preprocess_image` computes the image embedding once (and keeps it in the segmenter's cache too); `detect` then
costs only the mask decoder per set of clicks. Agents need CVAT Online or Enterprise; on free self-hosted CVAT use
the nuclio interactor in `cvat_nuclio/sam`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
from cvat_sdk import models

from ..errors import ConfigError
from ..models import Segmenter, build_segmenter, pick_device
from ..ontology import PromptsFile
from ..pipeline import model_refs, segment_interactive
from ..settings import Settings
from .convert import mask_points


@dataclass(frozen=True)
class PreparedImage:
    array: np.ndarray  # RGB uint8; its embedding is in the segmenter's cache


class PrelabelInteractionFunction:
    spec = cvataa.InteractionFunctionSpec(min_pos_points=0, min_neg_points=0, min_bounding_boxes=0)

    def __init__(self, segmenter: str | None = None, device: str | None = None, prompts: str | None = None):
        settings = Settings(**{k: v for k, v in dict(segmenter=segmenter, device=device, prompts=prompts).items() if v})
        ref = model_refs(settings, PromptsFile.load(settings.prompts))[1]
        if not ref:
            raise ConfigError("the interaction function needs a segmenter: -p segmenter=str:HUB_ID_OR_DIR")
        self.segmenter: Segmenter = build_segmenter(
            ref, settings.model_dir, pick_device(settings.device), settings.embedding_cache_size
        )

    def preprocess_image(self, context: cvataa.InteractionFunctionContext, image: PIL.Image.Image) -> PreparedImage:
        array = np.array(image.convert("RGB"))
        self.segmenter.prepare(array)
        return PreparedImage(array)

    def detect(
        self, context: cvataa.InteractionFunctionContext, pp_image: PreparedImage, prompts: cvataa.InteractionPrompts
    ) -> list[cvataa.InteractionResultShape]:
        clicks = [(p, 1) for p in prompts.pos_points] + [(p, 0) for p in prompts.neg_points]
        box = None
        if prompts.bounding_box is not None:
            (x1, y1), (x2, y2) = prompts.bounding_box
            box = np.array([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], np.float32)
        if not clicks and box is None:
            return []
        points = np.array([p for p, _ in clicks], np.float32) if clicks else None
        labels = np.array([label for _, label in clicks]) if clicks else None
        mask, score = segment_interactive(self.segmenter, pp_image.array, points, labels, box)
        if not mask.any():
            return []
        confidence = models.AttributeValRequest(spec_id=cvataa.InteractionResultAttributes.CONFIDENCE, value=f"{score:.4f}")
        return [cvataa.InteractionResultShape(type="mask", points=mask_points(mask), attributes=[confidence])]


create = PrelabelInteractionFunction
