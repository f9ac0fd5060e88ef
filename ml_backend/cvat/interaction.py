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

from ..engine import Engine, model_refs
from ..errors import ConfigError
from ..ontology import PromptsFile
from ..settings import Settings
from .convert import clicks, mask_points


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
        self.engine = Engine.from_settings(settings, detector=False)

    def preprocess_image(self, context: cvataa.InteractionFunctionContext, image: PIL.Image.Image) -> PreparedImage:
        array = np.array(image.convert("RGB"))
        self.engine.prepare(array)
        return PreparedImage(array)

    def detect(
        self, context: cvataa.InteractionFunctionContext, pp_image: PreparedImage, prompts: cvataa.InteractionPrompts
    ) -> list[cvataa.InteractionResultShape]:
        points, labels, box = clicks(prompts.pos_points, prompts.neg_points, prompts.bounding_box)
        if points is None and box is None:
            return []
        mask, score = self.engine.segment(pp_image.array, points, labels, box)
        if not mask.any():
            return []
        confidence = models.AttributeValRequest(spec_id=cvataa.InteractionResultAttributes.CONFIDENCE, value=f"{score:.4f}")
        return [cvataa.InteractionResultShape(type="mask", points=mask_points(mask), attributes=[confidence])]


create = PrelabelInteractionFunction
