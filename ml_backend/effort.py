"""Labelling effort saved by pre-annotation: the edits a person made to the model's boxes, against drawing every
final box from scratch.

The measure, per task (one image), on two `sv.Detections` in absolute pixel xyxy, labels in `data["class_name"]`:

1. Match predicted boxes to annotated boxes one-to-one, maximising the summed IoU (`types.box_iou`):
   Hungarian assignment (`scipy.optimize.linear_sum_assignment`) when scipy is installed, else greedy by IoU, highest
   first. Labels do not take part in matching (a relabelled box is still the same box), except that among equal IoUs
   same-label pairs win. A pair with IoU 0 is no match.
2. Classify every box into edit kinds, with `iou` the threshold (default 0.9):
   - kept: matched, IoU >= iou, same label: no work;
   - relabelled: matched, IoU >= iou, another label: one click;
   - moved: matched, 0 < IoU < iou (moved or resized): one adjustment; when the label also changed the pair counts
     as moved *and* relabelled (two edits);
   - deleted: a prediction without a match: one click;
   - added: an annotation without a match: one box drawn.
   IoU is compared in float64 with a tolerance of 1e-6 (IoU within 1e-6 of the threshold counts as reaching it), so
   boxes that went through Label Studio's percentages land on the side they were drawn on.
3. Effort units, with drawing one box from scratch = 1 (`EffortWeights`, configurable): add 1.0, move 0.5,
   relabel 0.2, delete 0.1, keep 0. Edit effort = sum of count x weight; scratch effort = annotated boxes x the add
   weight (= the number of annotated boxes with the default weights).
4. Saved = 1 - edit effort / scratch effort, reported in percent, overall and per label, pooled over tasks (sums of
   efforts over all tasks, not a mean of per-task ratios). Kept, relabelled, moved and added boxes count under their
   final (annotated) label, deleted ones under their predicted label. Saved is 100 % when every prediction was
   kept, 0 % when nothing was predicted, and negative when fixing the predictions cost more than drawing from
   scratch (e.g. many false positives); with no annotated box it is undefined (None / null).

Over labelling-tool records (`LabeledImage`): a task without an annotation is skipped and counted; a task with an
annotation but no prediction counts as all added; an annotation with no region is an image with nothing in it
(predictions on it are deletions).

The pure measure (`task_edits`, `measure_effort`) takes Detections only, so the distill benchmark can score a
student's predictions on synthetic data the same way; `records_effort` is the thin layer over records (e.g. from
`labelstudio.records.project_records`); the CLI composes the two.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import supervision as sv

from .errors import PrelabelError
from .types import LabeledImage, box_iou

log = logging.getLogger(__name__)

KINDS = ("kept", "relabelled", "moved", "deleted", "added")
_WEIGHT_OF = {"kept": "keep", "relabelled": "relabel", "moved": "move", "deleted": "delete", "added": "add"}
_TOLERANCE = 1e-6


class EffortError(PrelabelError):
    """Effort options we cannot work with (an IoU threshold or weight out of range, an unknown edit kind)."""

    kind = "effort"


@dataclass(frozen=True)
class EffortWeights:
    """Cost of each edit, in units of drawing one box from scratch."""

    add: float = 1.0
    move: float = 0.5
    relabel: float = 0.2
    delete: float = 0.1
    keep: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not np.isfinite(value) or value < 0:
                raise EffortError(f"effort weight {f.name}={value}: use a finite number >= 0")
        if self.add <= 0:
            raise EffortError("effort weight add must be > 0: drawing a box from scratch is the unit")

    @classmethod
    def parse(cls, items: Iterable[str] | None) -> EffortWeights:
        """Weights from `KIND=VALUE` strings (e.g. `move=0.3`); kinds not given keep their defaults."""
        values, names = {}, [f.name for f in fields(cls)]
        for item in items or ():
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in names:
                raise EffortError(f"effort weight {item!r}: write KIND=VALUE with KIND one of {', '.join(names)}")
            try:
                values[name] = float(value)
            except ValueError:
                raise EffortError(f"effort weight {item!r}: {value!r} is not a number") from None
        return cls(**values)


@dataclass
class EditCounts:
    """Edits on a set of boxes; `boxes` = annotated boxes (the scratch count). A pair both moved and relabelled
    counts in both."""

    kept: int = 0
    relabelled: int = 0
    moved: int = 0
    deleted: int = 0
    added: int = 0
    boxes: int = 0

    def __iadd__(self, other: EditCounts) -> EditCounts:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def edit_effort(self, weights: EffortWeights) -> float:
        return float(sum(getattr(self, k) * getattr(weights, _WEIGHT_OF[k]) for k in KINDS))

    def scratch_effort(self, weights: EffortWeights) -> float:
        return float(self.boxes * weights.add)

    def saved(self, weights: EffortWeights) -> float | None:
        """Effort saved as a fraction (1.0 = everything kept); None without annotated boxes."""
        scratch = self.scratch_effort(weights)
        return None if scratch == 0 else 1.0 - self.edit_effort(weights) / scratch

    def as_dict(self, weights: EffortWeights) -> dict:
        saved = self.saved(weights)
        return asdict(self) | {"edit_effort": round(self.edit_effort(weights), 9),
                               "scratch_effort": round(self.scratch_effort(weights), 9),
                               "saved_percent": None if saved is None else round(100 * saved, 6)}


@dataclass
class EffortReport:
    iou: float
    weights: EffortWeights
    overall: EditCounts = field(default_factory=EditCounts)
    labels: dict[str, EditCounts] = field(default_factory=dict)
    tasks: int = 0  # measured (annotated)
    skipped_unannotated: int = 0
    without_prediction: int = 0  # measured tasks with no prediction: all added
    model_versions: list[str] = field(default_factory=list)  # of the records' predictions, measured or not

    @property
    def saved(self) -> float | None:
        return self.overall.saved(self.weights)

    def add(self, per_label: dict[str, EditCounts]) -> None:
        for label, counts in per_label.items():
            self.labels.setdefault(label, EditCounts()).__iadd__(counts)
            self.overall += counts

    def as_dict(self) -> dict:
        return {
            "iou": self.iou,
            "weights": asdict(self.weights),
            "tasks": {"measured": self.tasks, "skipped_unannotated": self.skipped_unannotated,
                      "without_prediction": self.without_prediction},
            "overall": self.overall.as_dict(self.weights),
            "labels": {k: v.as_dict(self.weights) for k, v in sorted(self.labels.items())},
        }


def _labels(detections: sv.Detections | None) -> list[str]:
    if detections is None or len(detections) == 0:
        return []
    names = (detections.data or {}).get("class_name")
    if names is not None:
        return [str(n) for n in names]
    if detections.class_id is not None:
        return [str(c) for c in detections.class_id]
    raise EffortError("detections carry neither data['class_name'] nor class_id: cannot tell their labels")


def _hungarian(score: np.ndarray) -> list[tuple[int, int]] | None:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return None
    rows, cols = linear_sum_assignment(score, maximize=True)
    return list(zip(rows.tolist(), cols.tolist()))


def _greedy(score: np.ndarray) -> list[tuple[int, int]]:
    order = np.argsort(-score, axis=None, kind="stable")
    used_r, used_c, pairs = set(), set(), []
    for flat in order:
        r, c = np.unravel_index(flat, score.shape)
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            pairs.append((int(r), int(c)))
    return pairs


def match_boxes(iou: np.ndarray, same_label: np.ndarray | None = None,
                hungarian: bool = True) -> list[tuple[int, int]]:
    """One-to-one (prediction, annotation) index pairs maximising summed IoU; pairs with IoU 0 are dropped.
    Hungarian when `hungarian` and scipy is installed, else greedy by IoU. `same_label` (bool, like `iou`) breaks
    ties in favour of same-label pairs."""
    if iou.size == 0:
        return []
    score = iou + (1e-9 * same_label if same_label is not None else 0.0)
    pairs = _hungarian(score) if hungarian else None
    if pairs is None:
        pairs = _greedy(score)
    return sorted((r, c) for r, c in pairs if iou[r, c] > 0)


def task_edits(predictions: sv.Detections | None, annotations: sv.Detections, iou: float = 0.9,
               hungarian: bool = True) -> dict[str, EditCounts]:
    """The edits turning one image's `predictions` into its `annotations`, per label (see the module docstring).
    `predictions` None or empty: every annotated box is added."""
    if not 0 < iou <= 1:
        raise EffortError(f"IoU threshold {iou}: use a number in (0, 1]")
    pred_labels, ann_labels = _labels(predictions), _labels(annotations)
    per_label: dict[str, EditCounts] = {}

    def at(label: str) -> EditCounts:
        return per_label.setdefault(label, EditCounts())

    for label in ann_labels:
        at(label).boxes += 1
    overlap = box_iou(predictions.xyxy if pred_labels else np.zeros((0, 4)),
                      annotations.xyxy if ann_labels else np.zeros((0, 4)))
    same = np.array([[p == a for a in ann_labels] for p in pred_labels], bool).reshape(overlap.shape)
    pairs = match_boxes(overlap, same, hungarian)
    for p, a in pairs:
        counts = at(ann_labels[a])
        if overlap[p, a] >= iou - _TOLERANCE:
            if same[p, a]:
                counts.kept += 1
            else:
                counts.relabelled += 1
        else:
            counts.moved += 1
            if not same[p, a]:
                counts.relabelled += 1
    matched_p, matched_a = {p for p, _ in pairs}, {a for _, a in pairs}
    for p, label in enumerate(pred_labels):
        if p not in matched_p:
            at(label).deleted += 1
    for a, label in enumerate(ann_labels):
        if a not in matched_a:
            at(label).added += 1
    return per_label


def measure_effort(pairs: Iterable[tuple[sv.Detections | None, sv.Detections]], iou: float = 0.9,
                   weights: EffortWeights | None = None, hungarian: bool = True) -> EffortReport:
    """Effort over many images, pooled: `pairs` of (predictions, annotations) per image, both absolute xyxy."""
    report = EffortReport(iou=iou, weights=weights or EffortWeights())
    for predictions, annotated in pairs:
        report.add(task_edits(predictions, annotated, iou, hungarian))
        report.tasks += 1
        if predictions is None or len(predictions) == 0:
            report.without_prediction += 1
    return report


def records_effort(records: Iterable[LabeledImage], iou: float = 0.9,
                   weights: EffortWeights | None = None, hungarian: bool = True) -> EffortReport:
    """Effort over labelling-tool records: records without an annotation (`annotations` None) are skipped and
    counted; a record annotated but not predicted counts as all added."""
    records = list(records)
    annotated = [r for r in records if r.annotations is not None]
    report = measure_effort(((r.predictions, r.annotations) for r in annotated), iou, weights, hungarian)
    report.skipped_unannotated = len(records) - len(annotated)
    report.model_versions = sorted({r.model_version for r in records if r.model_version})
    log.info("effort: %d tasks measured, %d skipped (no annotation)", report.tasks, report.skipped_unannotated)
    return report


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def print_effort(report: EffortReport, console=None, title: str = "labelling effort") -> None:
    """A rich table: per label and overall, the count of each edit kind, annotated boxes and effort saved."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{title} (IoU >= {report.iou:g}; draw a box = {report.weights.add:g})")
    for column in ("label", *KINDS, "boxes", "edit effort", "saved"):
        table.add_column(column, justify="left" if column == "label" else "right")

    def row(name: str, c: EditCounts, **style) -> None:
        table.add_row(name, *(str(getattr(c, k)) for k in (*KINDS, "boxes")), f"{c.edit_effort(report.weights):.2f}",
                      _percent(c.saved(report.weights)), **style)

    for label, counts in sorted(report.labels.items()):
        row(label, counts)
    table.add_section()
    row("overall", report.overall, style="bold")
    console.print(table)
    console.print(f"{report.tasks} tasks measured, {report.without_prediction} of them without a prediction; "
                  f"{report.skipped_unannotated} skipped (no annotation)")
