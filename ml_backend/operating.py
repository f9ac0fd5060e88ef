"""Operating points: per label the score threshold that meets a target the business states (`precision=0.95`,
`recall=0.8` or `f1=0.9`, overall or per label), with precision, recall and F1 there and their 95% confidence
intervals from the sample count. Used by `prelabel prompts eval` and by distill's evaluation of the student.

On the corrected samples each distinct detection score is a candidate threshold (a box counts when its score is at
least the threshold); a detection matched to a ground-truth object at IoU 0.5 is a true positive. Per target:
- precision >= v: the threshold with the most recall among those reaching it (a tie: the better precision);
- recall >= v: the best precision among those reaching it (normally the highest such threshold; a tie: more recall);
- f1 >= v: the most recall among those reaching it (a tie: the better precision).
When no threshold reaches the target the point says so, with the best value the metric reaches and where, and
falls back to the threshold with the best F1. Intervals: Wilson score intervals for precision = TP/(TP+FP) and
recall = TP/(TP+FN); for F1 = 2J/(1+J), the Wilson interval of J = TP/(TP+FP+FN) mapped through that (increasing)
function, as (TP, FP, FN) are multinomial counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .evaluation import Matches, wilson_interval

METRICS = ("precision", "recall", "f1")
INTERVALS = ("95% Wilson score intervals for precision TP/(TP+FP) and recall TP/(TP+FN); F1 = 2J/(1+J) over the "
             "Wilson interval of J = TP/(TP+FP+FN)")
_TOLERANCE = 1e-9  # 4/5 reaches 0.8 whatever the float rounding


class TargetError(ConfigError):
    """A `--target` we cannot read, or one naming a label the data does not have."""

    kind = "target"


@dataclass(frozen=True)
class Target:
    metric: str  # precision | recall | f1
    value: float
    label: str | None = None  # None: every label without a target of its own

    @classmethod
    def parse(cls, text: str) -> Target:
        """`precision=0.95`, `recall=0.8`, `f1=0.9`, or for one label `Car:precision=0.95`."""
        example = "e.g. precision=0.95, recall=0.8, f1=0.9 or Car:precision=0.95"
        head, eq, value = str(text).rpartition("=")
        label, colon, metric = head.rpartition(":")
        metric = metric.strip().casefold()
        if not eq or metric not in METRICS:
            raise TargetError(f"--target {text!r}: give METRIC=VALUE with METRIC one of precision, recall, f1 "
                              f"({example})")
        if colon and not label.strip():
            raise TargetError(f"--target {text!r}: the label before ':' is empty ({example})")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0 < number <= 1:
            raise TargetError(f"--target {text!r}: {metric} must be a number above 0 and at most 1 ({example})")
        return cls(metric, number, label.strip() if colon else None)

    def __str__(self) -> str:
        return (f"{self.label}:" if self.label else "") + f"{self.metric}={self.value:g}"

    def describe(self) -> str:
        return f"{'F1' if self.metric == 'f1' else self.metric} >= {self.value:g}"


@dataclass(frozen=True)
class Targets:
    """Parsed `--target` options: `overall` for every label, `per_label` overriding it."""

    overall: Target | None = None
    per_label: dict[str, Target] = field(default_factory=dict)

    @classmethod
    def parse(cls, texts: list[str] | None) -> Targets:
        overall, per_label = None, {}
        for target in map(Target.parse, texts or []):
            if target.label is None:
                if overall is not None:
                    raise TargetError(f"--target {target} and --target {overall}: give one overall target (for "
                                      f"one label write LABEL:{target})")
                overall = target
            elif target.label in per_label:
                raise TargetError(f"label {target.label!r} has two targets: {per_label[target.label]} and {target}")
            else:
                per_label[target.label] = target
        return cls(overall, per_label)

    def __bool__(self) -> bool:
        return self.overall is not None or bool(self.per_label)

    def matched(self, labels: list[str]) -> Targets:
        """The same targets with label names spelled as in `labels` (case-insensitively matched); a label not
        there is an error naming the labels there are."""
        folded = {name.casefold(): name for name in labels}
        per_label = {}
        for name, target in self.per_label.items():
            actual = name if name in labels else folded.get(name.casefold())
            if actual is None:
                raise TargetError(f"--target {target}: label {name!r} is not in the data; its labels are: "
                                  f"{', '.join(map(repr, labels)) or 'none'}")
            per_label[actual] = Target(target.metric, target.value, actual)
        return Targets(self.overall, per_label)

    def for_label(self, label: str) -> Target | None:
        return self.per_label.get(label, self.overall)

    def as_list(self) -> list[str]:
        return [str(t) for t in ([self.overall] if self.overall else []) + list(self.per_label.values())]


@dataclass
class OperatingPoint:
    """One label at its chosen threshold. `met`: the target is reached there (None without a target); `best`:
    the best value the target's metric reaches at any threshold and that threshold (None when nothing was found);
    `chosen_by`: "target", "best F1 (target not reached)" or "best F1 (no target)". Without any detection
    `threshold` and `precision` are None."""

    label: str
    target: Target | None
    met: bool | None
    chosen_by: str
    threshold: float | None
    tp: int
    fp: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    precision_ci: tuple[float, float] | None
    recall_ci: tuple[float, float] | None
    f1_ci: tuple[float, float] | None
    best: dict | None = None  # {"value", "threshold"} of the target's metric

    @property
    def truth(self) -> int:
        return self.tp + self.fn

    def note(self) -> str:
        """One plain sentence: met, not met (with the best achievable and the fallback), or no target."""
        if self.target is None:
            return "no target: threshold at the best F1"
        if self.met:
            return f"{self.target.describe()} met"
        if self.best is None:
            return f"{self.target.describe()} NOT reached: nothing was detected"
        return (f"{self.target.describe()} NOT reached: the best {_metric_name(self.target.metric)} is "
                f"{self.best['value']:.3f} (at threshold {self.best['threshold']:g}); threshold at the best F1 "
                f"instead")

    def as_dict(self) -> dict:
        def interval(ci):
            return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]

        def value(v):
            return None if v is None else round(v, 4)

        return {"target": None if self.target is None else str(self.target), "met": self.met,
                "chosen_by": self.chosen_by, "note": self.note(), "threshold": self.threshold, "tp": self.tp,
                "fp": self.fp, "fn": self.fn, "truth": self.truth, "precision": value(self.precision),
                "recall": value(self.recall), "f1": value(self.f1), "precision_ci": interval(self.precision_ci),
                "recall_ci": interval(self.recall_ci), "f1_ci": interval(self.f1_ci), "best": self.best}


def _metric_name(metric: str) -> str:
    return "F1" if metric == "f1" else metric


def f1_interval(tp: int, fp: int, fn: int) -> tuple[float, float] | None:
    """95% interval of F1 = 2TP/(2TP+FP+FN): the Wilson interval of J = TP/(TP+FP+FN) through F1 = 2J/(1+J)."""
    j = wilson_interval(tp, tp + fp + fn)
    return None if j is None else (2 * j[0] / (1 + j[0]), 2 * j[1] / (1 + j[1]))


def threshold_points(matches: Matches) -> dict[str, np.ndarray]:
    """Every distinct score as a threshold, highest first, with TP, FP, precision, recall and F1 when boxes
    scoring at least it are kept."""
    order = np.argsort(-matches.scores, kind="stable")
    scores, tp = matches.scores[order], matches.tp[order]
    tps, fps = np.cumsum(tp), np.cumsum(~tp)
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)  # end of each tie
    tps, fps = tps[last], fps[last]
    truth = max(matches.truth, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"threshold": scores[last], "tp": tps, "fp": fps, "precision": tps / (tps + fps),
                "recall": tps / truth if truth else np.zeros(len(tps)),
                "f1": 2 * tps / np.maximum(2 * tps + fps + (truth - tps), 1)}


def _pick(points: dict[str, np.ndarray], candidates: np.ndarray, keys: tuple[str, ...]) -> int:
    """The candidate index with the largest `keys` (in order), then the highest threshold."""
    rows = [tuple(float(points[k][i]) for k in keys) + (float(points["threshold"][i]),) for i in candidates]
    return int(candidates[max(range(len(rows)), key=lambda j: rows[j])])


def _written_threshold(points: dict[str, np.ndarray], i: int) -> float:
    """The score at point i, rounded down to 4 decimals when that keeps the next lower score out (else as is)."""
    score = float(points["threshold"][i])
    lower = float(points["threshold"][i + 1]) if i + 1 < len(points["threshold"]) else -math.inf
    rounded = math.floor(score * 1e4) / 1e4
    return rounded if lower < rounded <= score else score


def operating_point(label: str, matches: Matches, target: Target | None) -> OperatingPoint | None:
    """The threshold for `target` on `matches` (see the module's docstring); None when the label has no
    ground-truth object (recall means nothing there)."""
    if matches.truth <= 0:
        return None
    points = threshold_points(matches)
    everything = np.arange(len(points["threshold"]))
    best = None
    if not len(everything):
        chosen, met = None, False if target else None
    else:
        f1_best = _pick(points, everything, ("f1",))
        chosen, met = f1_best, None
        if target is not None:
            metric = target.metric
            reached = everything[points[metric] >= target.value - _TOLERANCE]
            keys = {"precision": ("recall", "precision"), "recall": ("precision", "recall"),
                    "f1": ("recall", "precision")}[metric]
            met = bool(len(reached))
            if met:
                chosen = _pick(points, reached, keys)
            else:
                at = _pick(points, everything, (metric,) + tuple(k for k in ("recall", "precision") if k != metric))
                best = {"value": round(float(points[metric][at]), 4), "threshold": _written_threshold(points, at)}
    if target is None:
        chosen_by = "best F1 (no target)"
    else:
        chosen_by = "target" if met else "best F1 (target not reached)"
    if chosen is None:  # nothing detected at all
        tp, fp, threshold = 0, 0, None
    else:
        tp, fp, threshold = int(points["tp"][chosen]), int(points["fp"][chosen]), _written_threshold(points, chosen)
    fn = matches.truth - tp
    return OperatingPoint(
        label=label, target=target, met=met, chosen_by=chosen_by, threshold=threshold, tp=tp, fp=fp, fn=fn,
        precision=tp / (tp + fp) if tp + fp else None, recall=tp / matches.truth,
        f1=2 * tp / (2 * tp + fp + fn), precision_ci=wilson_interval(tp, tp + fp),
        recall_ci=wilson_interval(tp, tp + fn), f1_ci=f1_interval(tp, fp, fn), best=best,
    )


def operating_points(matches: dict[str, Matches], targets: Targets) -> dict[str, OperatingPoint]:
    """Per label of `matches` with ground truth, its operating point under its target (its own, else the
    overall one). Match `targets` to the data's labels first (`Targets.matched`)."""
    points = {name: operating_point(name, m, targets.for_label(name)) for name, m in matches.items()}
    return {name: p for name, p in points.items() if p is not None}


def cell(value: float | None, ci: tuple[float, float] | None) -> str:
    """`0.80 [0.49, 0.94]`, or `-`."""
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else "")


def point_cells(p: dict) -> list[str]:
    """Threshold, precision, recall and F1 (with intervals) of a point as `OperatingPoint.as_dict()` gives it."""
    return ["-" if p["threshold"] is None else f"{p['threshold']:g}", cell(p["precision"], p["precision_ci"]),
            cell(p["recall"], p["recall_ci"]), cell(p["f1"], p["f1_ci"])]


def markdown_table(points: dict[str, dict]) -> list[str]:
    """Operating points (`OperatingPoint.as_dict()` by label, as a report stores them) as a Markdown table."""
    lines = ["| label | target | threshold | precision | recall | F1 | TP / FP / FN | result |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in points.items():
        lines.append(" | ".join(["| " + name, p["target"] or "-", *point_cells(p),
                                 f"{p['tp']} / {p['fp']} / {p['fn']}", p["note"] + " |"]))
    return lines


__all__ = ["INTERVALS", "METRICS", "OperatingPoint", "Target", "TargetError", "Targets", "cell", "f1_interval",
           "markdown_table", "operating_point", "operating_points", "point_cells", "threshold_points"]
