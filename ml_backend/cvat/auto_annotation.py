"""A cvat-sdk auto-annotation detection function: Grounding DINO (+ SAM) for the labels of a prompts file, and tags
from a zero-shot classifier (CLIP/SigLIP) for its `tags:` labels.

    cvat-cli task auto-annotate TASK_ID --function-module ml_backend.cvat.auto_annotation \\
        -p prompts=str:prompts/example.yaml [-p shape=str:mask] [--conf-threshold 0.3] [--conv-mask-to-poly]

Parameters (`-p NAME=TYPE:VALUE`): `prompts` (file), `shape` (`rectangle`, `mask`, `polygon`, or per label
`Car=mask,Person=rectangle`; unnamed labels get rectangles), `detector`, `segmenter`, `classifier`, `device`. CVAT
matches the labels to the task's by name (tag labels to tag labels); `--conf-threshold` replaces the prompts file's
box thresholds (tags keep their own: CVAT stores no score on a tag). Free self-hosted CVAT runs it.
"""

from __future__ import annotations

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image

from ..errors import ConfigError
from ..ontology import PromptsFile
from ..pipeline import Pipeline
from ..settings import Settings
from .convert import SHAPE_TYPES, classification_to_sdk_tags, mask_points, outline_points, rectangle_points


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
        self.pipeline = Pipeline.from_settings(Settings(**overrides))
        if needs_masks:
            self.pipeline.require_segmenter()
        self.ontology = self.pipeline.ontology()
        self.tags = self.pipeline.prompts.tag_classification()
        if self.tags is not None:
            self.pipeline.require_classifier("the prompts file's `tags:`")
        labels = [cvataa.label_spec(s.name, i, type=self.shapes[s.name]) for i, s in enumerate(self.ontology.labels)]
        self.tag_ids = [len(labels) + j for j in range(len(self.tags.choices) if self.tags else 0)]
        labels += [cvataa.label_spec(name, i, type="tag") for i, name in zip(self.tag_ids, self.tags.names if self.tags else [])]
        self.spec = cvataa.DetectionFunctionSpec(labels=labels)

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image) -> list:
        ontology = self.ontology if context.conf_threshold is None else self.ontology.with_threshold(context.conf_threshold)
        array = np.array(image.convert("RGB"))
        out = []
        if self.tags is not None:
            out += classification_to_sdk_tags(self.tag_ids, self.pipeline.classify([array], self.tags.fill(None))[1][0])
        if not ontology.labels:
            return out
        detections = self.pipeline.detect([array], ontology.fill(None))[0]
        names = [str(n) for n in detections.data.get("class_name", [])]
        if any(self.shapes[n] != "rectangle" for n in names):
            self.pipeline.add_masks(array, detections)
        for i, name in enumerate(names):
            label_id, score = int(detections.class_id[i]), float(detections.confidence[i])
            shape = self.shapes[name]
            if shape == "mask" and context.conv_mask_to_poly:
                shape = "polygon"
            if shape == "rectangle":
                out.append(cvataa.rectangle(label_id, rectangle_points(detections.xyxy[i]), score=score))
            elif shape == "mask":
                out.append(cvataa.mask(label_id, mask_points(detections.mask[i], detections.xyxy[i]), score=score))
            else:
                out.append(cvataa.polygon(label_id, outline_points(detections.mask[i], detections.xyxy[i]), score=score))
        return out


create = PrelabelDetectionFunction
