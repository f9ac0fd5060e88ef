"""What a Label Studio label config asks of us, parsed with label-studio-sdk's LabelInterface."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

from label_studio_sdk.label_interface import LabelInterface

from ..errors import ConfigError
from ..ontology import Classification, ControlsEntry, Ontology, PromptsFile

log = logging.getLogger(__name__)

OUTPUT_TAGS = {"RectangleLabels": "rectanglelabels", "BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
MASK_TYPES = {"brushlabels", "polygonlabels"}
# A RectangleLabels label of this name (any case) marks negative exemplars ("find all like this, but not like
# this"); it names nothing to find, so it is never predicted.
EXCLUDE = "Exclude"
NEEDS_DETECTOR = "boxes need a detector (--detector / PRELABEL_DETECTOR)"
NEEDS_SEGMENTER = "masks need a segmenter (set PRELABEL_SEGMENTER, --segmenter or `segmenter:` in the prompts file)"
NEEDS_CLASSIFIER = ("Choices need a zero-shot classifier (set PRELABEL_CLASSIFIER, --classifier or `classifier:` in "
                    "the prompts file to a CLIP/SigLIP model)")


def is_exclude(label: str | None) -> bool:
    return isinstance(label, str) and label.casefold() == EXCLUDE.casefold()


@dataclass(frozen=True)
class Control:
    type: str  # result type: rectanglelabels | brushlabels | polygonlabels
    from_name: str
    to_name: str
    data_key: str  # task.data key of the image it labels
    labels: tuple[str, ...]


@dataclass(frozen=True)
class VideoControl:
    """A `<VideoRectangle>` on a `<Video>`: one `videorectangle` region per tracked object, labelled with the labels
    of the `<Labels>` on the same video. `framerate` is the Video tag's (a number, or `$field` of task data; Label
    Studio's default is 24): Label Studio numbers frames by it."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    framerate: str = "24"

    type = "videorectangle"

    def fps(self, data: dict) -> float:
        """The frame rate Label Studio uses for a task (a `$field` read from its data)."""
        raw = self.framerate
        if raw.startswith("$"):
            raw = str(data.get(raw[1:], ""))
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"<Video name={self.to_name!r} framerate={self.framerate!r}>: {raw!r} is not a number") from None
        if not value > 0:
            raise ConfigError(f"<Video name={self.to_name!r} framerate={self.framerate!r}> must be positive, got {value}")
        return value


@dataclass(frozen=True)
class ChoiceControl:
    """A `<Choices>` on an `<Image>`: classified by the zero-shot classifier, for the whole image or, with
    `perRegion="true"`, for each detected region (restricted by `whenTagName`/`whenLabelValue` when given)."""

    from_name: str
    to_name: str
    data_key: str
    choices: tuple[str, ...]  # the values Label Studio stores (a Choice's alias, else its value)
    multiple: bool = False
    per_region: bool = False
    when_tag: str | None = None
    when_labels: tuple[str, ...] = ()
    hints: tuple[tuple[str, tuple[str, ...]], ...] = ()  # choice -> prompt hints (predicted_values, aliased value)

    type = "choices"

    def classification(self, prompts: PromptsFile) -> Classification:
        return prompts.classification(list(self.choices), self.multiple, dict(self.hints))

    def applies_to(self, control: Control, label: str) -> bool:
        """Does this per-region Choices classify a region of `control` labelled `label`?"""
        if control.to_name != self.to_name:
            return False
        if self.when_tag and control.from_name != self.when_tag:
            return False
        return not self.when_labels or label in self.when_labels


@dataclass
class ProjectConfig:
    controls: list[Control]
    labels: list[str]
    predicted_values: dict[str, list[str]] = field(default_factory=dict)
    choices: list[ChoiceControl] = field(default_factory=list)
    others: tuple[str, ...] = ()  # names of the controls not filled (TextArea, KeyPointLabels, ..., skipped ones)
    videos: list[VideoControl] = field(default_factory=list)
    selected: bool = field(default=False, compare=False, repr=False)  # the result of `select`: nothing left to skip

    @property
    def needs_masks(self) -> bool:
        return any(c.type in MASK_TYPES for c in self.controls)

    @property
    def region_keys(self) -> set[str]:
        """The task data keys of the images that region controls (rectangles, brushes, polygons) label."""
        return {c.data_key for c in self.controls}

    @property
    def data_keys(self) -> list[str]:
        """The task data keys of every image the config labels (regions or choices)."""
        return list(dict.fromkeys([c.data_key for c in self.controls] + [c.data_key for c in self.choices]))

    def ontology(self, prompts: PromptsFile, max_detections: int) -> Ontology:
        return prompts.ontology(self.labels, self.predicted_values, max_detections)

    def classifications(self, prompts: PromptsFile) -> dict[str, Classification]:
        """Per Choices control (by name), what to classify into."""
        return {c.from_name: c.classification(prompts) for c in self.choices}

    @property
    def names(self) -> list[str]:
        """Every control's name, in config order (ours first)."""
        return list(dict.fromkeys([c.from_name for c in self.controls] + [c.from_name for c in self.choices]
                                  + [c.from_name for c in self.videos] + list(self.others)))

    def select(self, detector: bool, segmenter: bool, classifier: bool, wanted: ControlsEntry) -> Selection:
        """The controls this server fills, given which models it has and the prompts file's `controls:`; the
        others are skipped with the reason. Raises a ConfigError naming every control when none can be filled."""
        if self.selected:
            return Selection(self, [], [])
        skipped: dict[str, str] = {}
        for c in self.controls:
            why = wanted.opted_out(c.from_name) or (None if detector else NEEDS_DETECTOR)
            if why is None and c.type in MASK_TYPES and not segmenter:
                why = NEEDS_SEGMENTER
            if why:
                skipped.setdefault(c.from_name, why)
        for c in self.videos:
            if why := wanted.opted_out(c.from_name) or (None if detector else NEEDS_DETECTOR):
                skipped.setdefault(c.from_name, why)
        controls = [c for c in self.controls if c.from_name not in skipped]
        videos = [c for c in self.videos if c.from_name not in skipped]
        for c in self.choices:
            why = wanted.opted_out(c.from_name) or (None if classifier else NEEDS_CLASSIFIER)
            if why is None and c.per_region and not any(c.applies_to(r, label) for r in controls for label in r.labels):
                regions = sorted({r.from_name for r in self.controls if any(c.applies_to(r, n) for n in r.labels)})
                why = f"it classifies the regions of {regions}, which are skipped"
            if why:
                skipped.setdefault(c.from_name, why)
        unknown = [n for n in wanted.names if n not in self.names]
        warnings = [f"the prompts file's `controls:` names {n!r}, which is not a control of this label config (it "
                    f"has {self.names})" for n in unknown]
        notes = [Skipped(name, why) for name, why in skipped.items()]
        choices = [c for c in self.choices if c.from_name not in skipped]
        if not controls and not choices and not videos:
            raise ConfigError("nothing in the label config can be pre-annotated: "
                              + "; ".join(f"{n.control!r}: {n.reason}" for n in notes)
                              + "".join(f"; {w}" for w in warnings))
        if not notes:
            return Selection(replace(self, selected=True), [], warnings)
        labels = [name for name in self.labels if any(name in c.labels for c in [*controls, *videos])]
        filled = replace(self, controls=controls, labels=labels, choices=choices, videos=videos,
                         others=self.others + tuple(skipped), selected=True)
        return Selection(filled, notes, warnings)

    def mask_control(self, to_name: str | None = None) -> Control | None:
        """The control that receives interactive masks: brush first, polygons when they are the only mask tag."""
        for kind in ("brushlabels", "polygonlabels"):
            for c in self.controls:
                if c.type == kind and (to_name is None or c.to_name == to_name):
                    return c
        return None


@dataclass(frozen=True)
class Skipped:
    """A control the server does not fill, and why."""

    control: str
    reason: str


@dataclass
class Selection:
    """`config` with only the controls the server fills; `skipped` the others; `warnings` about control names in the
    prompts file's `controls:` that the config lacks."""

    config: ProjectConfig
    skipped: list[Skipped]
    warnings: list[str]


def _choice_control(tag, to_name: str, data_key: str) -> ChoiceControl:
    attrs = tag.attr or {}
    hints = []
    for name, choice in (tag.labels_attrs or {}).items():
        values = [v.strip() for v in (choice.attr.get("predicted_values") or "").split(",") if v.strip()]
        shown = choice.attr.get("value")
        if not values and shown and shown != name:  # aliased: the shown value says more than the alias
            values = [shown]
        if values:
            hints.append((name, tuple(values)))
    return ChoiceControl(
        from_name=tag.name,
        to_name=to_name,
        data_key=data_key,
        choices=tuple(tag.labels),
        multiple=attrs.get("choice") == "multiple",
        per_region=str(attrs.get("perRegion", "")).lower() == "true",
        when_tag=attrs.get("whenTagName") or None,
        when_labels=tuple(v.strip() for v in (attrs.get("whenLabelValue") or "").split(",") if v.strip()),
        hints=tuple(hints),
    )


def _objects(interface, tag, kind: str = "Image"):
    """(name, object, task data key) of each <Image> (or `kind`) the control labels; other objects are not ours."""
    for to_name in tag.to_name:
        obj = interface.get_object(to_name)
        if obj is None or obj.tag != kind:
            continue
        if not obj.value.startswith("$"):
            raise ConfigError(f"<{kind} name={to_name!r}> must take its URL from task data (value=\"$key\")")
        yield to_name, obj, obj.value_name


def _images(interface, tag):
    return ((name, key) for name, _, key in _objects(interface, tag))


def _videos(interface) -> list[VideoControl]:
    """Each `<VideoRectangle>` on a `<Video>`, with the labels of the `<Labels>` on that video."""
    out = []
    for tag in interface.controls:
        if tag.tag != "VideoRectangle":
            continue
        for to_name, obj, key in _objects(interface, tag, "Video"):
            labels = [name for t in interface.controls if t.tag == "Labels" and to_name in t.to_name
                      for name in (t.labels_attrs or {}) if not is_exclude(name)]
            if not labels:
                raise ConfigError(f"<VideoRectangle name={tag.name!r}> on <Video name={to_name!r}> has no <Labels> "
                                  f"on that video to label its boxes with")
            rate = str((obj.attr or {}).get("framerate") or "24")
            out.append(VideoControl(tag.name, to_name, key, tuple(dict.fromkeys(labels)), rate))
    return out


@functools.lru_cache(maxsize=64)
def parse_config(config: str) -> ProjectConfig:
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("label config is empty")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # noqa: BLE001 - the SDK raises many types for broken XML
        raise ConfigError(f"label config cannot be parsed: {exc}") from None
    controls, labels, predicted, choices = [], [], {}, []
    for tag in interface.controls:
        if tag.tag == "Choices":
            for to_name, data_key in _images(interface, tag):
                if not tag.labels:
                    raise ConfigError(f"<Choices name={tag.name!r}> has no <Choice> to classify into")
                choices.append(_choice_control(tag, to_name, data_key))
            continue
        if tag.tag not in OUTPUT_TAGS:
            continue
        for to_name, data_key in _images(interface, tag):
            controls.append(Control(OUTPUT_TAGS[tag.tag], tag.name, to_name, data_key, tuple(tag.labels)))
        for name, label_tag in (tag.labels_attrs or {}).items():
            if is_exclude(name):
                continue
            labels.append(name)
            values = label_tag.attr.get("predicted_values")
            if values:
                predicted[name] = [v.strip() for v in values.split(",") if v.strip()]
    videos = _videos(interface)
    for video in videos:
        for name in video.labels:
            labels.append(name)
            label_tag = next(t.labels_attrs[name] for t in interface.controls
                             if t.tag == "Labels" and name in (t.labels_attrs or {}))
            if values := label_tag.attr.get("predicted_values"):
                predicted[name] = [v.strip() for v in values.split(",") if v.strip()]
    if not controls and not choices and not videos:
        found = sorted({t.tag for t in interface.controls}) or ["none"]
        raise ConfigError(
            f"label config has no control we can pre-annotate: found {', '.join(found)}; supported are "
            f"RectangleLabels, BrushLabels, PolygonLabels and Choices on an <Image> (KeyPointLabels/TextArea only "
            f"with them), and VideoRectangle with Labels on a <Video>"
        )
    for choice in choices:
        if choice.per_region and not any(choice.applies_to(c, label) for c in controls for label in c.labels):
            raise ConfigError(
                f"<Choices name={choice.from_name!r} perRegion=\"true\"> classifies regions, but no RectangleLabels, "
                f"BrushLabels or PolygonLabels on <Image name={choice.to_name!r}>"
                + (f" has the labels {list(choice.when_labels)}" if choice.when_labels else "")
                + (f" is named {choice.when_tag!r}" if choice.when_tag else "")
                + " to give it regions"
            )
    ours = {c.from_name for c in controls} | {c.from_name for c in choices} | {c.from_name for c in videos}
    video_labels = {t.name for t in interface.controls if t.tag == "Labels" and any(v.to_name in t.to_name for v in videos)}
    others = tuple(dict.fromkeys(t.name for t in interface.controls if t.name not in ours | video_labels))
    return ProjectConfig(controls, list(dict.fromkeys(labels)), predicted, choices, others, videos)
