"""A cvat-sdk auto-annotation detection function: Grounding DINO (+ SAM), or SAM 3 alone (boxes and its own masks),
for the labels of a prompts file, and tags from a zero-shot classifier (CLIP/SigLIP) for its `tags:` labels.

    cvat-cli task auto-annotate TASK_ID --function-module ml_backend.cvat.auto_annotation \\
        -p prompts=str:prompts/example.yaml [-p shape=str:mask] [--conf-threshold 0.3] [--conv-mask-to-poly]

Parameters (`-p NAME=TYPE:VALUE`): `prompts` (file), `shape` (`rectangle`, `mask`, `polygon`, or per label
`Car=mask,Person=rectangle`; unnamed labels get rectangles), `detector` (`facebook/sam3`: masks from SAM 3 itself,
no SAM is loaded), `segmenter`, `classifier`, `device`. CVAT matches the labels to the task's by name (tag labels
to tag labels); `--conf-threshold` replaces the prompts file's box thresholds (tags keep their own: CVAT stores no
score on a tag). Free self-hosted CVAT runs it.
"""

from __future__ import annotations

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image

from ..engine import ClassifyRequest, Engine, RequestSpec
from ..errors import ConfigError
from ..media import MediaItem
from ..ontology import PromptsFile
from ..settings import Settings
from .convert import SHAPE_TYPES, classification_to_sdk_tags, detections_to_sdk_shapes
from .engines import without_segmenter_if_sam3


def parse_shapes(value: str, labels: list[str]) -> dict[str, str]:
    """`mask` -> every label a mask; `Car=mask,Person=polygon` -> those, the rest rectangles."""
    value = value.strip()
    if "=" not in value:
        if value not in SHAPE_TYPES:
            raise ConfigError(f"shape {value!r} is not one of {SHAPE_TYPES}")
        return dict.fromkeys(labels, value)
    shapes = dict.fromkeys(labels, "rectangle")
    folded = {name.casefold(): name for name in labels}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, shape = (s.strip() for s in item.partition("="))
        if name.casefold() not in folded:
            raise ConfigError(f"shape for unknown label {name!r}; the prompts file has {labels}")
        if shape not in SHAPE_TYPES:
            raise ConfigError(f"shape {shape!r} for label {name!r} is not one of {SHAPE_TYPES}")
        shapes[folded[name.casefold()]] = shape
    return shapes


class PrelabelDetectionFunction:
    def __init__(
        self,
        prompts: str | None = None,
        shape: str = "rectangle",
        detector: str | None = None,
        segmenter: str | None = None,
        device: str | None = None,
        classifier: str | None = None,
    ):
        overrides = {k: v for k, v in dict(prompts=prompts, detector=detector, device=device, classifier=classifier).items() if v}
        prompts_file = PromptsFile.load(prompts or Settings().prompts)
        names = prompts_file.ontology().names
        if not names and prompts_file.tags is None:
            raise ConfigError("no labels: pass a prompts file with -p prompts=str:FILE (see prompts/example.yaml)")
        self.shapes = parse_shapes(shape, names)
        needs_masks = any(s != "rectangle" for s in self.shapes.values())
        if not needs_masks or segmenter is not None:  # boxes only: SAM is not loaded
            overrides["segmenter"] = segmenter if needs_masks and segmenter.lower() != "none" else ""
        self.engine = Engine.from_settings(without_segmenter_if_sam3(Settings(**overrides)))  # SAM 3: its own masks
        if needs_masks and not self.engine.gives_masks:
            self.engine.require_segmenter()
        self.ontology = self.engine.ontology()
        self.tags = self.engine.prompts.tag_classification()
        if self.tags is not None:
            self.engine.require_classifier("the prompts file's `tags:`")
        self.mask_labels = frozenset(name for name, shape in self.shapes.items() if shape != "rectangle")
        labels = [cvataa.label_spec(s.name, i, type=self.shapes[s.name]) for i, s in enumerate(self.ontology.labels)]
        self.tag_ids = [len(labels) + j for j in range(len(self.tags.choices) if self.tags else 0)]
        labels += [cvataa.label_spec(name, i, type="tag") for i, name in zip(self.tag_ids, self.tags.names if self.tags else [])]
        self.spec = cvataa.DetectionFunctionSpec(labels=labels)

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image) -> list:
        """Tags, then each detection as its label's shape; SAM runs only on images where a mask label was found
        (SAM 3 masks only its candidates, and only when a label is a mask or polygon)."""
        ontology = self.ontology if context.conf_threshold is None else self.ontology.with_threshold(context.conf_threshold)
        classify = (ClassifyRequest("tags", self.tags),) if self.tags is not None else ()
        item = MediaItem(np.array(image.convert("RGB")), getattr(context, "frame_name", "a CVAT frame"))
        result = self.engine.run([item], RequestSpec(ontology, classify, masks=self.mask_labels))[0]
        if result.error is not None:
            raise result.error
        out = [tag for scores in result.classes for tag in classification_to_sdk_tags(self.tag_ids, scores.chosen[0])]
        return out + detections_to_sdk_shapes(result.detections, self.shapes, context.conv_mask_to_poly, item.width, item.height)


create = PrelabelDetectionFunction
