"""Labels <-> text prompts, from `prompts/*.yaml`, the labeling tool's label names and `predicted_values`.

A label's prompts come from, in order: its entry in the prompts file, the `predicted_values` attribute of its
`<Label>` tag in Label Studio, its own name. All prompts of a label are synonyms: their boxes are merged by
class-aware NMS, never duplicated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PromptsError, describe_validation


def normalize_prompt(text: str) -> str:
    return " ".join(text.strip().lower().replace(".", " ").split())


class LabelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] | None = None
    threshold: float | None = Field(None, ge=0, le=1)

    @field_validator("prompts")
    @classmethod
    def _clean(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [normalize_prompt(p) for p in value if normalize_prompt(p)]
        if not cleaned:
            raise ValueError("needs at least one non-empty prompt")
        return cleaned


class PromptsFile(BaseModel):
    """The parsed `prompts/*.yaml`; `ontology()` resolves it against the labels a project actually has."""

    model_config = ConfigDict(extra="forbid")
    detector: str | None = None
    segmenter: str | None = None
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int | None = Field(None, ge=1)
    labels: dict[str, LabelEntry] = Field(default_factory=dict)

    @field_validator("labels", mode="before")
    @classmethod
    def _shorthand(cls, value):
        if not isinstance(value, dict):
            return value
        out = {}
        for name, entry in value.items():
            if isinstance(entry, str):
                entry = {"prompts": [entry]}
            elif isinstance(entry, list):
                entry = {"prompts": entry}
            elif entry is None:
                entry = {}
            out[str(name)] = entry
        return out

    @classmethod
    def load(cls, path: str | Path | None) -> PromptsFile:
        if path is None:
            return cls()
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise PromptsError(f"prompts file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise PromptsError(f"prompts file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise PromptsError(f"prompts file {path} must be a mapping with a 'labels' key")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise PromptsError(f"prompts file {path}: {describe_validation(exc.errors())}") from None

    def entry_for(self, label: str) -> LabelEntry | None:
        if label in self.labels:
            return self.labels[label]
        folded = {k.casefold(): v for k, v in self.labels.items()}
        return folded.get(label.casefold())

    def ontology(
        self,
        label_names: list[str] | None = None,
        predicted_values: dict[str, list[str]] | None = None,
        max_detections: int = 100,
    ) -> Ontology:
        """Resolve prompts for `label_names` (default: every label in the file)."""
        names = list(dict.fromkeys(label_names if label_names is not None else self.labels))
        predicted_values = predicted_values or {}
        specs = []
        for name in names:
            entry = self.entry_for(name) or LabelEntry()
            prompts = entry.prompts or [
                normalize_prompt(v) for v in predicted_values.get(name, []) if normalize_prompt(v)
            ] or [normalize_prompt(name)]
            if not prompts[0]:
                raise PromptsError(f"label {name!r} has no usable prompt; give it prompts in the prompts file")
            specs.append(LabelSpec(name, tuple(dict.fromkeys(prompts)), entry.threshold or self.box_threshold))
        return Ontology(
            labels=tuple(specs),
            text_threshold=self.text_threshold,
            nms_iou=self.nms_iou,
            max_detections=self.max_detections or max_detections,
        )


@dataclass(frozen=True)
class LabelSpec:
    name: str
    prompts: tuple[str, ...]
    threshold: float


@dataclass(frozen=True)
class Ontology:
    """What to look for: labels with their synonym prompts and thresholds."""

    labels: tuple[LabelSpec, ...]
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_detections: int = 100

    def __post_init__(self):
        owner: dict[str, str] = {}
        for spec in self.labels:
            for prompt in spec.prompts:
                if prompt in owner and owner[prompt] != spec.name:
                    raise PromptsError(
                        f"prompt {prompt!r} is given for both labels {owner[prompt]!r} and {spec.name!r}"
                    )
                owner[prompt] = spec.name

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.labels]

    @property
    def prompts(self) -> list[tuple[str, int]]:
        """Every (prompt, label index) pair."""
        return [(p, i) for i, s in enumerate(self.labels) for p in s.prompts]

    def with_threshold(self, threshold: float) -> Ontology:
        """The same labels with one box threshold for all (a caller's explicit threshold overrides the file's)."""
        return replace(self, labels=tuple(replace(s, threshold=threshold) for s in self.labels))

    def digest(self) -> str:
        payload = {
            "labels": [[s.name, list(s.prompts), s.threshold] for s in self.labels],
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
            "max_detections": self.max_detections,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
