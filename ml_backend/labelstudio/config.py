"""What a Label Studio label config asks of us, parsed with label-studio-sdk's LabelInterface."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from ..errors import ConfigError
from ..ontology import Ontology, PromptsFile

log = logging.getLogger(__name__)

OUTPUT_TAGS = {"RectangleLabels": "rectanglelabels", "BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
MASK_TYPES = {"brushlabels", "polygonlabels"}


@dataclass(frozen=True)
class Control:
    type: str  # result type: rectanglelabels | brushlabels | polygonlabels
    from_name: str
    to_name: str
    data_key: str  # task.data key of the image it labels
    labels: tuple[str, ...]


@dataclass
class ProjectConfig:
    controls: list[Control]
    labels: list[str]
    predicted_values: dict[str, list[str]] = field(default_factory=dict)

    @property
    def needs_masks(self) -> bool:
        return any(c.type in MASK_TYPES for c in self.controls)

    def ontology(self, prompts: PromptsFile, max_detections: int) -> Ontology:
        return prompts.ontology(self.labels, self.predicted_values, max_detections)

    def mask_control(self, to_name: str | None = None) -> Control | None:
        """The control that receives interactive masks: brush first, polygons when they are the only mask tag."""
        for kind in ("brushlabels", "polygonlabels"):
            for c in self.controls:
                if c.type == kind and (to_name is None or c.to_name == to_name):
                    return c
        return None


@functools.lru_cache(maxsize=64)
def parse_config(config: str) -> ProjectConfig:
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("label config is empty")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # noqa: BLE001 - the SDK raises many types for broken XML
        raise ConfigError(f"label config cannot be parsed: {exc}") from None
    controls, labels, predicted = [], [], {}
    for tag in interface.controls:
        if tag.tag not in OUTPUT_TAGS:
            continue
        for to_name in tag.to_name:
            obj = interface.get_object(to_name)
            if obj is None or obj.tag != "Image":
                continue
            if not obj.value.startswith("$"):
                raise ConfigError(f"<Image name={to_name!r}> must take its URL from task data (value=\"$key\")")
            controls.append(Control(OUTPUT_TAGS[tag.tag], tag.name, to_name, obj.value_name, tuple(tag.labels)))
        for name, label_tag in (tag.labels_attrs or {}).items():
            labels.append(name)
            values = label_tag.attr.get("predicted_values")
            if values:
                predicted[name] = [v.strip() for v in values.split(",") if v.strip()]
    if not controls:
        found = sorted({t.tag for t in interface.controls}) or ["none"]
        raise ConfigError(
            f"label config has no control we can pre-annotate: found {', '.join(found)}; supported are "
            f"RectangleLabels, BrushLabels and PolygonLabels on an <Image> (KeyPointLabels/TextArea only with them)"
        )
    return ProjectConfig(controls, list(dict.fromkeys(labels)), predicted)
