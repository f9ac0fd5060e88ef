"""Labels <-> text prompts, from `prompts/*.yaml`, the labeling tool's label names and `predicted_values`.

A label's prompts come from, in order: its entry in the prompts file, the `predicted_values` attribute of its
`<Label>` tag in Label Studio, its own name. All prompts of a label are synonyms: their boxes are merged by
class-aware NMS, never duplicated.

Classification (Label Studio `Choices`, CVAT tags) uses the same entries: a choice's prompts are put into the
`templates` ("a photo of a {}") and all of them averaged into one text embedding per choice (`Classification`).

A prompt or template may name task data fields, `"{product_name} bottle"`: they are filled per task from the task's
data (`Ontology.fill`, `Classification.fill`), so metadata steers pre-annotation. Digests (model versions) hash the
templates, never the filled text. A task without the field gets a `PromptFieldError` naming the task and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import PrelabelError, PromptsError, RequestError, validated

DEFAULT_TEMPLATES = ("a photo of a {}",)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
_FORMATTER = string.Formatter()


class PromptFieldError(RequestError):
    """A prompt names a task data field the task does not have (one task fails, the others are answered)."""

    kind = "prompt_field"


def read_yaml(path: Path, error: type[PrelabelError], where: str):
    """A YAML file's document; a missing, unreadable or invalid file raises `error` naming `where`."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{where} is not valid YAML: {exc}") from None


def _parse_template(text: str) -> list[tuple[str, str | None]]:
    """(literal, field) pieces of a template: field None after the last literal, "" for the `{}` slot.
    Raises ValueError naming what is wrong: unbalanced braces, positional `{0}`, conversions or format specs."""
    pieces = []
    for literal, field, spec, conversion in _FORMATTER.parse(text):
        if field is not None:
            if spec or conversion:
                raise ValueError(f"'{{{field}...}}' has a format spec or conversion; write plain '{{field}}'")
            if field != "" and not _FIELD_NAME.match(field):
                raise ValueError(f"'{{{field}}}' is not a task data field name (letters, digits, _ and . for nesting)")
        pieces.append((literal, field))
    return pieces


def template_fields(text: str) -> list[str]:
    """The task data fields a prompt or template names (`{}`, the prompt slot of a template, is not one)."""
    return [f for _, f in _parse_template(text) if f]


def _lookup(data: dict, field: str):
    value = data
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def fill_template(text: str, data: dict | None, where: str = "", slot: str | None = None) -> str:
    """`text` with its `{field}`s taken from task `data` and `{}` replaced by `slot`. A missing or empty field is a
    `PromptFieldError` naming the field, the prompt (`where`) and the fields the task has."""
    out = []
    for literal, field in _parse_template(text):
        out.append(literal)
        if field is None:
            continue
        if field == "":
            if slot is None:
                raise PromptsError(f"{where}{text!r}: '{{}}' is only allowed in templates")
            out.append(slot)
            continue
        value = _lookup(data or {}, field)
        if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
            have = sorted(data or {})
            raise PromptFieldError(
                f"{where}{text!r} needs the task data field {field!r}, which this task "
                f"{'has empty' if value is not None else 'does not have'} (task data fields: {have})"
            )
        out.append(str(value))
    return "".join(out)


def _plain(text: str) -> str:
    return " ".join(text.strip().lower().replace(".", " ").split())


def normalize_prompt(text: str) -> str:
    """Lower case, dots as spaces, single spaces; `{field}` placeholders are kept as written."""
    if "{" not in text and "}" not in text:
        return _plain(text)
    try:
        pieces = _parse_template(text)
    except ValueError:
        return " ".join(text.strip().split())  # checked (and reported) by the caller
    out = []
    for literal, field in pieces:
        out.append(literal.lower().replace(".", " ").replace("{", "{{").replace("}", "}}"))
        if field is not None:
            out.append("{" + field + "}")
    return " ".join("".join(out).split())


def literal_prompt(text: str) -> str:
    """A prompt taken from a label's name or `predicted_values`: plain text, braces dropped (only the prompts file
    holds templates)."""
    return _plain(text.replace("{", " ").replace("}", " "))


def _check_prompt(text: str, template: bool) -> str:
    try:
        pieces = _parse_template(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid template: {exc}") from None
    slots = sum(1 for _, f in pieces if f == "")
    if template and slots != 1:
        raise ValueError(f"template {text!r} must hold exactly one '{{}}' where the label's prompt goes")
    if not template and slots:
        raise ValueError(f"prompt {text!r} has '{{}}': name a task data field, e.g. '{{product_name}}'")
    return text


class LabelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] | None = None
    threshold: float | None = Field(None, ge=0, le=1)  # box score, or for multi-label choices the choice score
    templates: list[str] | None = None  # classification only: replaces the file's `templates` for this label
    # two-stage: the detector looks for these prompts, and the classifier (on `prompts` and templates) picks, per box,
    # which of the labels with the same `detect` it is
    detect: list[str] | None = None

    @field_validator("detect")
    @classmethod
    def _detect(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [_check_prompt(normalize_prompt(p), False) for p in value if normalize_prompt(p)]
        if not cleaned:
            raise ValueError("needs at least one non-empty prompt for the detector")
        return list(dict.fromkeys(cleaned))

    @field_validator("prompts")
    @classmethod
    def _clean(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [_check_prompt(normalize_prompt(p), False) for p in value if normalize_prompt(p)]
        if not cleaned:
            raise ValueError("needs at least one non-empty prompt")
        return cleaned

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _clean_templates(value)


def _clean_templates(value: list[str]) -> list[str]:
    cleaned = [_check_prompt(" ".join(t.split()), True) for t in value if t.strip()]
    if not cleaned:
        raise ValueError("needs at least one template such as 'a photo of a {}'")
    return cleaned


class TagsEntry(BaseModel):
    """Labels that are whole-image classes (CVAT tags) rather than boxes, classified by the classifier."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] = Field(min_length=1)
    multiple: bool = False  # multi-label: every label over its threshold; else the single best label


class ControlsEntry(BaseModel):
    """Which controls of a Label Studio label config (by `name`) the server pre-annotates: `only` these, or every
    control but those in `skip`. A control named here that a project's config lacks gets a warning, not an error."""

    model_config = ConfigDict(extra="forbid")
    only: list[str] | None = Field(None, min_length=1)
    skip: list[str] = Field(default_factory=list)

    @field_validator("only", "skip", mode="before")
    @classmethod
    def _one_name(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_way(self) -> ControlsEntry:
        if self.only is not None and self.skip:
            raise ValueError("give either `only` (the controls to fill) or `skip` (the controls to leave), not both")
        return self

    @property
    def names(self) -> list[str]:
        return list(self.only or []) + self.skip

    def opted_out(self, name: str) -> str | None:
        """Why the control `name` is not to be filled, or None."""
        if name in self.skip:
            return "the prompts file's `controls: skip` names it"
        if self.only is not None and name not in self.only:
            return f"the prompts file's `controls: only` lists {self.only}"
        return None


class PromptsFile(BaseModel):
    """The parsed `prompts/*.yaml`; `ontology()` resolves it against the labels a project actually has."""

    model_config = ConfigDict(extra="forbid")
    detector: str | None = None
    segmenter: str | None = None
    classifier: str | None = None  # CLIP/SigLIP: Choices, per-region classes, CVAT tags
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    choice_threshold: float | None = Field(None, ge=0, le=1)  # multi-label default; None: the model's own default
    tags: TagsEntry | None = None
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int | None = Field(None, ge=1)
    labels: dict[str, LabelEntry] = Field(default_factory=dict)
    controls: ControlsEntry = Field(default_factory=ControlsEntry)  # Label Studio: which controls to fill

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

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        return _clean_templates(value)

    @field_validator("detector")
    @classmethod
    def _detector(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # not silently the default: say so
            raise ValueError("names no model: name one (hub id, directory, student:DIR) or leave the key out for the "
                             "default")
        return value

    @classmethod
    def load(cls, path: str | Path | None) -> PromptsFile:
        if path is None:
            return cls()
        where = f"prompts file {path}"
        return validated(cls, read_yaml(Path(path), PromptsError, where) or {}, PromptsError, where,
                         "a mapping with a 'labels' key")

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
        """Resolve prompts for `label_names` (default: every label in the file but the `tags`)."""
        if label_names is None:
            tags = {t.casefold() for t in (self.tags.labels if self.tags else [])}
            label_names = [n for n in self.labels if n.casefold() not in tags]
        names = list(dict.fromkeys(label_names))
        predicted_values = predicted_values or {}
        specs = []
        for name in names:
            entry = self.entry_for(name) or LabelEntry()
            prompts = entry.prompts or [
                literal_prompt(v) for v in predicted_values.get(name, []) if literal_prompt(v)
            ] or [literal_prompt(name)]
            if not prompts[0]:
                raise PromptsError(f"label {name!r} has no usable prompt; give it prompts in the prompts file")
            threshold = self.box_threshold if entry.threshold is None else entry.threshold
            if entry.detect:
                specs.append(LabelSpec(name, tuple(dict.fromkeys(prompts)), threshold, tuple(entry.detect),
                                       tuple(entry.templates or self.templates)))
            else:
                specs.append(LabelSpec(name, tuple(dict.fromkeys(prompts)), threshold))
        return Ontology(
            labels=tuple(specs),
            text_threshold=self.text_threshold,
            nms_iou=self.nms_iou,
            max_detections=self.max_detections or max_detections,
        )

    def classification(
        self, choices: list[str], multiple: bool = False, hints: dict[str, list[str]] | None = None
    ) -> Classification:
        """Prompts and templates for classifying into `choices`: a choice's prompts come from its entry in the
        file, else `hints` (e.g. a Choice's `hint`/`value`), else its own name."""
        hints = hints or {}
        specs = []
        for name in dict.fromkeys(choices):
            entry = self.entry_for(name) or LabelEntry()
            prompts = entry.prompts or [
                literal_prompt(v) for v in hints.get(name, []) if literal_prompt(v)
            ] or [literal_prompt(name)]
            if not prompts[0]:
                raise PromptsError(f"choice {name!r} has no usable prompt; give it prompts in the prompts file")
            for prompt in prompts:
                try:
                    _check_prompt(prompt, False)
                except ValueError as exc:
                    raise PromptsError(f"choice {name!r}: {exc}") from None
            templates = tuple(entry.templates or self.templates)
            specs.append(ChoiceSpec(name, tuple(dict.fromkeys(prompts)), templates, entry.threshold))
        return Classification(tuple(specs), multiple, self.choice_threshold)

    def tag_classification(self) -> Classification | None:
        """The `tags:` labels as one classification (CVAT tags), or None."""
        if self.tags is None:
            return None
        names = [next((k for k in self.labels if k.casefold() == t.casefold()), t) for t in self.tags.labels]
        return self.classification(names, self.tags.multiple)


@dataclass(frozen=True)
class LabelSpec:
    """A label: its detector prompts (synonyms) and box threshold. A two-stage label has `detect` prompts for the
    detector, shared with the other labels of its group, and its `prompts` and `templates` go to the classifier."""

    name: str
    prompts: tuple[str, ...]
    threshold: float
    detect: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ontology:
    """What to look for: labels with their synonym prompts and thresholds."""

    labels: tuple[LabelSpec, ...]
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_detections: int = 100

    def __post_init__(self):
        owner: dict[str, str] = {}
        group: dict[str, tuple] = {}
        for spec in self.labels:
            for prompt in spec.detect or spec.prompts:  # what the detector is asked for
                same_group = bool(spec.detect) and group.get(prompt) == spec.detect
                if prompt in owner and owner[prompt] != spec.name and not same_group:
                    raise PromptsError(
                        f"prompt {prompt!r} is given for both labels {owner[prompt]!r} and {spec.name!r}"
                        + (" (two-stage labels share a group only with the same `detect` list)" if spec.detect else "")
                    )
                owner.setdefault(prompt, spec.name)
                group.setdefault(prompt, spec.detect or None)

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
            "labels": [
                [s.name, list(s.prompts), s.threshold] + ([list(s.detect), list(s.templates)] if s.detect else [])
                for s in self.labels
            ],
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
            "max_detections": self.max_detections,
        }
        return _digest(payload)

    @property
    def fields(self) -> list[str]:
        """Task data fields the prompts name (empty for an ontology without metadata templates)."""
        return _fields(t for s in self.labels for t in (*s.prompts, *s.detect, *s.templates))

    def fill(self, data: dict | None) -> Ontology:
        """This ontology with `{field}`s filled from one task's data (itself when no prompt names a field)."""
        if not self.fields:
            return self
        labels = []
        for s in self.labels:
            where = f"prompt of label {s.name!r}: "
            filled = [_plain(fill_template(p, data, where)) for p in s.prompts]
            detect = tuple(dict.fromkeys(_plain(fill_template(p, data, where)) for p in s.detect))
            templates = tuple(_fill_keeping_slot(t, data, f"template of label {s.name!r}: ") for t in s.templates)
            labels.append(replace(s, prompts=tuple(dict.fromkeys(p for p in filled if p)), detect=detect, templates=templates))
            if not labels[-1].prompts:
                raise PromptFieldError(f"label {s.name!r} has no prompt left once filled from the task data")
        return replace(self, labels=tuple(labels))

    # -- two-stage ----------------------------------------------------------------------------------------------
    @property
    def two_stage(self) -> bool:
        return any(s.detect for s in self.labels)

    def stages(self) -> tuple[Ontology, list[int], dict[int, tuple[list[int], Classification]]]:
        """What the detector is asked for: (its ontology, the ontology label index of each of its one-stage
        labels (-1 for a group), and per group label index (member label indices, the classification among them)).
        A group's box threshold is the lowest of its members'."""
        labels, index, groups = [], [], {}
        by_detect: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.labels):
            if s.detect:
                by_detect.setdefault(s.detect, []).append(i)
            else:
                labels.append(s)
                index.append(i)
        for detect, members in by_detect.items():
            specs = [self.labels[i] for i in members]
            groups[len(labels)] = (members, Classification(tuple(ChoiceSpec(s.name, s.prompts, s.templates) for s in specs)))
            labels.append(LabelSpec(" | ".join(s.name for s in specs), detect, min(s.threshold for s in specs)))
            index.append(-1)
        return replace(self, labels=tuple(labels)), index, groups


@dataclass(frozen=True)
class ChoiceSpec:
    name: str
    prompts: tuple[str, ...]
    templates: tuple[str, ...]
    threshold: float | None = None  # multi-label only


@dataclass(frozen=True)
class Classification:
    """What to classify an image (or a region's crop) into: choices with synonym prompts and templates.

    Single choice: the best choice (probabilities softmax over the choices). Multiple: every choice whose probability
    reaches its threshold (`ChoiceSpec.threshold`, else `threshold`, else the classifier's default)."""

    choices: tuple[ChoiceSpec, ...]
    multiple: bool = False
    threshold: float | None = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.choices]

    @property
    def fields(self) -> list[str]:
        return _fields(t for c in self.choices for t in (*c.prompts, *c.templates))

    def fill(self, data: dict | None) -> Classification:
        if not self.fields:
            return self
        choices = []
        for c in self.choices:
            where = f"prompt of choice {c.name!r}: "
            prompts = tuple(_plain(fill_template(p, data, where)) for p in c.prompts)
            templates = tuple(_fill_keeping_slot(t, data, f"template of choice {c.name!r}: ") for t in c.templates)
            choices.append(replace(c, prompts=prompts, templates=templates))
        return replace(self, choices=tuple(choices))

    def texts(self) -> tuple[tuple[str, ...], ...]:
        """Per choice, every template with every prompt: the texts averaged into the choice's embedding."""
        if self.fields:
            raise PromptFieldError(f"choices {self.names} name task data fields {self.fields}, but no task data was given")
        return tuple(
            tuple(dict.fromkeys(fill_template(t, None, slot=p) for t in c.templates for p in c.prompts))
            for c in self.choices
        )

    def thresholds(self, default: float) -> list[float]:
        base = default if self.threshold is None else self.threshold
        return [base if c.threshold is None else c.threshold for c in self.choices]

    def decide(self, probs, default_threshold: float) -> list[list[int]]:
        """Chosen choice indices per row of `probs` (rows: images or regions, columns: choices), best first."""
        out = []
        thresholds = self.thresholds(default_threshold)
        for row in probs:
            order = sorted(range(len(row)), key=lambda j: -float(row[j]))
            if not self.multiple:
                out.append(order[:1])
            else:
                out.append([j for j in order if float(row[j]) >= thresholds[j]])
        return out

    def digest(self) -> str:
        payload = {
            "choices": [[c.name, list(c.prompts), list(c.templates), c.threshold] for c in self.choices],
            "multiple": self.multiple,
            "threshold": self.threshold,
        }
        return _digest(payload)


def _fields(texts) -> list[str]:
    """The task data fields `texts` name, in order, once each."""
    return list(dict.fromkeys(f for t in texts for f in template_fields(t)))


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def _fill_keeping_slot(template: str, data: dict | None, where: str) -> str:
    """A template with its `{field}`s filled and its `{}` slot kept (so that `texts()` can put prompts in)."""
    if not template_fields(template):
        return template
    marker = "\x00slot\x00"
    filled = fill_template(template, data, where, slot=marker)
    return filled.replace("{", "{{").replace("}", "}}").replace(marker, "{}")
