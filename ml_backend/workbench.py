"""Prompt workbench: which text prompt (and which detector, the teacher) finds each label best on samples people
corrected.

Every candidate prompt of a label runs alone (an ontology of that one label with that one prompt) at a low score
threshold, so that the precision/recall curve covers the whole range; the human annotations are the ground truth.
Per candidate: AP (mAP@[.5:.95]) and AP50 by pycocotools (`evaluation.coco_evaluate`), and the score threshold that
maximises F1 at IoU 0.5 with its precision and recall; with targets (`--target precision=0.95`, see operating.py)
also its operating point: the threshold that meets the target, P/R/F1 there with 95% intervals, and the winner
is then the candidate (and the detector the one) that meets the targets with the most recall. Model outputs are
cached per image content, model and prompt (`PredictionCache`, one SQLite file), so a new candidate costs only its own
runs and a re-run costs none.
With several detectors (e.g. Grounding DINO and SAM 3), each label also gets a teacher comparison: every detector's
best candidate for it, and the better teacher (`WorkbenchReport.teachers`).
Writes PR curves (one PNG per label, one curve per candidate and model), `report.json` and a prompts file with the
winners (`prompts.yaml`, loadable by `PromptsFile.load`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import supervision as sv
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import PromptsError, validated
from .evaluation import CocoResult, best_f1_threshold, coco_evaluate, pr_curve
from .operating import INTERVALS, OperatingPoint, Targets, cell, operating_point
from .engine import Engine, RequestSpec
from .media import ImageSource, MediaItem, record_image
from .ontology import LabelSpec, Ontology, PromptsFile, normalize_prompt, read_yaml
from .settings import Settings
from .types import LabeledImage, make_detections

log = logging.getLogger(__name__)


class CandidatesError(PromptsError):
    """A candidates file (or `--models`) we cannot work with, or labels the ground truth does not have."""

    kind = "candidates"


# -- the candidates file ----------------------------------------------------------------------------------------


class CandidatesFile(BaseModel):
    """`models:` (optional list of detectors: hub ids or local directories) and `labels:` mapping each label of the
    ground truth to its candidate prompts (a list, or one string)."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=list)
    labels: dict[str, list[str]]

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value):
        if not isinstance(value, dict) or not value:
            raise ValueError("needs a mapping of label -> candidate prompts, e.g. {Car: [car, automobile]}")
        out = {}
        for name, prompts in value.items():
            if isinstance(prompts, str):
                prompts = [prompts]
            if not isinstance(prompts, list) or not prompts:
                raise ValueError(f"label {name!r} has no candidate prompts (give a list of at least one prompt)")
            cleaned = [normalize_prompt(p) for p in prompts if isinstance(p, str)]
            if len(cleaned) != len(prompts):
                raise ValueError(f"label {name!r}: every candidate prompt must be a string")
            if not all(cleaned):
                raise ValueError(f"label {name!r} has an empty candidate prompt")
            templated = [p for p in cleaned if "{" in p or "}" in p]
            if templated:
                raise ValueError(f"label {name!r}: candidate {templated[0]!r} names a task data field; the workbench "
                                 f"compares plain prompts (fill the field in yourself)")
            out[str(name)] = list(dict.fromkeys(cleaned))
        return out

    @field_validator("models")
    @classmethod
    def _clean_models(cls, value: list[str]) -> list[str]:
        cleaned = [str(m).strip() for m in value]
        if not all(cleaned):
            raise ValueError("a model is empty")
        return list(dict.fromkeys(cleaned))

    @classmethod
    def load(cls, path: str | Path) -> CandidatesFile:
        where = f"candidates file {path}"
        raw = read_yaml(Path(path), CandidatesError, where)
        if not isinstance(raw, dict) or "labels" not in raw:
            raise CandidatesError(f"{where} must be a mapping with a 'labels' key (label: [prompt, ...]); see "
                                  f"prompts/candidates.example.yaml")
        return validated(cls, raw, CandidatesError, where)

    def matched(self, truth_labels: list[str]) -> CandidatesFile:
        """The same candidates with label names spelled as in the ground truth (case-insensitively matched);
        a label the ground truth does not have is an error naming the labels it does have."""
        folded = {name.casefold(): name for name in truth_labels}
        labels, unknown = {}, []
        for name, prompts in self.labels.items():
            actual = name if name in truth_labels else folded.get(name.casefold())
            if actual is None:
                unknown.append(name)
            else:
                labels[actual] = list(dict.fromkeys(labels.get(actual, []) + prompts))
        if unknown:
            raise CandidatesError(
                f"label(s) {', '.join(map(repr, unknown))} of the candidates file are not in the ground truth; "
                f"its annotated labels are: {', '.join(map(repr, sorted(truth_labels))) or 'none'}"
            )
        return CandidatesFile(models=self.models, labels=labels)


def parse_models(value: str | None, detectors: list[str] | None = None) -> list[str]:
    """`--models a,b` and `--detector c --detector d` -> ["a", "b", "c", "d"] (each once, in that order)."""
    models = []
    if value is not None:
        models = [m.strip() for m in value.split(",")]
        if not all(models):
            raise CandidatesError(f"--models {value!r}: give model ids or directories separated by commas, none empty")
    for ref in detectors or []:
        if not ref.strip():
            raise CandidatesError("--detector is empty: give a hub id or a local directory")
        models.append(ref.strip())
    return list(dict.fromkeys(models))


# -- the prediction cache ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectParams:
    """How candidates run: `min_score` is the (low) box threshold that lets the PR curve cover the range."""

    min_score: float = 0.05
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_detections: int = 100

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def ontology(self, label: str, prompts: tuple[str, ...]) -> Ontology:
        return Ontology(labels=(LabelSpec(label, prompts, self.min_score),), text_threshold=self.text_threshold,
                        nms_iou=self.nms_iou, max_detections=self.max_detections)


class PredictionCache:
    """Boxes and scores of one detector run on one image for one prompt set, in SQLite at `DIR/predictions.sqlite`,
    keyed by image content hash, model key (id + fingerprint of its files), the prompts and the `DetectParams`."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "predictions.sqlite"
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS predictions (image TEXT, model TEXT, prompts TEXT, params TEXT, "
            "xyxy BLOB NOT NULL, scores BLOB NOT NULL, PRIMARY KEY (image, model, prompts, params))"
        )
        self.db.commit()

    @staticmethod
    def _key(image: str, model: str, prompts: tuple[str, ...], params: DetectParams) -> tuple[str, str, str, str]:
        return image, model, json.dumps(list(prompts)), params.key()

    def get(self, image: str, model: str, prompts: tuple[str, ...], params: DetectParams
            ) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT xyxy, scores FROM predictions WHERE image=? AND model=? AND prompts=? AND params=?",
                self._key(image, model, prompts, params)).fetchone()
        if row is None:
            return None
        return np.frombuffer(row[0], np.float32).reshape(-1, 4).copy(), np.frombuffer(row[1], np.float32).copy()

    def put(self, image: str, model: str, prompts: tuple[str, ...], params: DetectParams,
            xyxy: np.ndarray, scores: np.ndarray) -> None:
        xyxy = np.ascontiguousarray(xyxy, np.float32).reshape(-1, 4)
        scores = np.ascontiguousarray(scores, np.float32).reshape(-1)
        if len(xyxy) != len(scores):
            raise ValueError(f"{len(xyxy)} boxes but {len(scores)} scores")
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?, ?)",
                            (*self._key(image, model, prompts, params), xyxy.tobytes(), scores.tobytes()))
            self.db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def image_hash(array: np.ndarray) -> str:
    """Content hash of a decoded RGB image (so a re-encoded or renamed file with the same pixels hits the cache)."""
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def model_key(ref: str, model_dir: Path) -> str:
    """`name@fingerprint`: the model's files (names, sizes, modification times, config.json) change the key, so a
    re-trained or re-downloaded model is a new model for the cache."""
    from .models.loading import resolve_model

    path = resolve_model(ref, model_dir)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        if f.name == "config.json":
            digest.update(f.read_bytes())
    return f"{path.name}@{digest.hexdigest()[:16]}"  # not the ref: two refs to the same files share entries


# -- results ----------------------------------------------------------------------------------------------------


@dataclass
class CandidateResult:
    model: str
    label: str
    prompts: list[str]
    ap: float
    ap50: float
    truth: int
    predicted: int
    best: dict | None  # {"threshold", "precision", "recall", "f1"} at IoU 0.5, None when nothing is found
    curve: dict | None = field(default=None, repr=False)  # {"recall", "precision", "scores"} at IoU 0.5
    operating: OperatingPoint | None = None  # with --target: the threshold that meets it (see operating.py)

    @property
    def name(self) -> str:
        return " | ".join(self.prompts)

    def rank(self) -> tuple[float, ...]:
        """Better first: AP, then AP50, then the best F1. With a target, first whether it is met and what is
        left to win there (recall; for a recall target, precision), or, when not met, how close it comes."""
        base = (self.ap, self.ap50, (self.best or {}).get("f1", 0.0))
        op = self.operating
        if op is None or op.target is None:
            return base
        if op.met:
            return (1.0, (op.precision if op.target.metric == "recall" else op.recall) or 0.0, *base)
        return (0.0, (op.best or {}).get("value") or 0.0, *base)

    @property
    def meets(self) -> bool:
        return bool(self.operating is not None and self.operating.met)

    def summary(self) -> dict:
        return {"prompts": self.prompts, "ap": self.ap, "ap50": self.ap50, "best": self.best} | (
            {"operating_point": self.operating.as_dict()} if self.operating is not None else {})


@dataclass
class TeacherComparison:
    """One label under every detector: each one's best candidate (`CandidateResult.rank`), and the better
    teacher (the earlier model on a tie)."""

    label: str
    best: dict[str, CandidateResult]  # model -> its best candidate for the label
    better: str

    @classmethod
    def of(cls, label: str, models: list[str], results: list[CandidateResult]) -> TeacherComparison:
        best = {}
        for model in models:
            mine = [r for r in results if r.label == label and r.model == model]
            if mine:  # stable: the earlier candidate wins a tie
                best[model] = sorted(mine, key=lambda r: r.rank(), reverse=True)[0]
        better = max(best, key=lambda m: (best[m].rank(), -models.index(m)))
        return cls(label, best, better)

    def as_dict(self) -> dict:
        by = "ap, then ap50, then f1"
        if any(r.operating is not None and r.operating.target is not None for r in self.best.values()):
            by = "target met, then recall there (precision for a recall target) or how close it comes, then " + by
        return {"better": self.better, "by": by,
                "models": {m: r.summary() for m, r in self.best.items()}}


@dataclass
class WorkbenchReport:
    images: int  # annotated images: the ground truth
    models: list[str]
    params: DetectParams
    results: list[CandidateResult]
    detector: str  # the best model
    winners: dict[str, CandidateResult]  # label -> best candidate under `detector`
    computed: int = 0  # detector runs (one image, one prompt set) done in this run
    cached: int = 0  # ... answered by the cache
    calls: int = 0  # detector.detect calls
    outputs: dict[str, str] = field(default_factory=dict)
    unannotated: int = 0  # images left out: nobody annotated them
    targets: list[str] = field(default_factory=list)  # the --target options, when given

    def for_label(self, label: str) -> list[CandidateResult]:
        return [r for r in self.results if r.label == label]

    @property
    def teachers(self) -> dict[str, TeacherComparison]:
        """Per label: every detector's best candidate and the better teacher."""
        labels = dict.fromkeys(r.label for r in self.results)
        return {label: TeacherComparison.of(label, self.models, self.results) for label in labels}

    def model_scores(self) -> dict[str, float]:
        """Per model: mean over labels of its best candidate's AP."""
        labels = list(dict.fromkeys(r.label for r in self.results))
        return {m: round(float(np.mean([max((r.ap for r in self.results if r.model == m and r.label == lab),
                                            default=0.0) for lab in labels])), 4) for m in self.models}

    def targets_met(self) -> dict[str, int]:
        """Per model: the labels where one of its candidates meets the target (0 without targets)."""
        return {m: len({r.label for r in self.results if r.model == m and r.meets}) for m in self.models}

    def as_dict(self) -> dict:
        def one(r: CandidateResult) -> dict:
            d = {k: getattr(r, k) for k in ("model", "label", "prompts", "ap", "ap50", "truth", "predicted", "best")}
            if r.operating is not None:
                d["operating_point"] = r.operating.as_dict()
            if r.curve is not None:
                d["curve_iou50"] = {k: [round(float(x), 4) for x in v] for k, v in r.curve.items()}
            return d

        return {
            "images": self.images, "unannotated": self.unannotated, "models": self.models, "params": asdict(self.params),
            "model_scores": self.model_scores(), "detector": self.detector,
            **({"targets_met": self.targets_met()} if self.targets else {}),
            "winners": {label: r.summary() for label, r in self.winners.items()},
            "teachers": {label: t.as_dict() for label, t in self.teachers.items()},
            "results": [one(r) for r in self.results],
            "computed": self.computed, "cached": self.cached, "outputs": self.outputs,
        } | ({"targets": self.targets, "intervals": INTERVALS} if self.targets else {})


# -- running ----------------------------------------------------------------------------------------------------


class Workbench:
    """Runs candidates over the annotated records through the cache. `build_detector(ref)` and `key_of(ref)` default
    to the registry and `model_key` above; models are built only when something is not cached."""

    def __init__(self, records: list[LabeledImage], cache: PredictionCache, settings: Settings | None = None,
                 loader: ImageSource | None = None, params: DetectParams | None = None,
                 build_detector: Callable[[str], object] | None = None, key_of: Callable[[str], str] | None = None,
                 progress: bool = True, targets: Targets | None = None):
        self.settings = settings or Settings()
        # copies: a record without a size gets the decoded image's
        self.records = [replace(r) for r in records if r.annotations is not None]
        self.unannotated = len(records) - len(self.records)
        if not self.records:
            raise CandidatesError(f"none of the {len(records)} images is annotated: the workbench needs corrected "
                                  f"samples (human annotations are its ground truth)")
        self.cache = cache
        self.loader = loader
        self.params = params or DetectParams(max_detections=self.settings.max_detections)
        self._build = build_detector or self._registry_detector
        self._model_key = key_of or (lambda ref: model_key(ref, self.settings.model_dir))
        self.progress = progress
        self.targets = targets or Targets()  # operating points: each candidate's threshold that meets its target
        self.computed = self.cached = self.calls = 0
        self._keys: dict[str, str] = {}
        self._detectors: dict[str, object] = {}

    def _registry_detector(self, ref: str):
        from .models import build_detector, pick_device

        return build_detector(ref, self.settings.model_dir, pick_device(self.settings.device), self.settings.batch_size,
                              precision=self.settings.precision)

    @property
    def truth_labels(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.records:
            if len(r.annotations):
                names.update(dict.fromkeys(str(n) for n in r.annotations.data["class_name"]))
        return list(names)

    def key(self, ref: str) -> str:
        if ref not in self._keys:
            self._keys[ref] = self._model_key(ref)
        return self._keys[ref]

    def detector(self, ref: str):
        if ref not in self._detectors:
            self._detectors[ref] = self._build(ref)
        return self._detectors[ref]

    def detect(self, ref: str, items: list[MediaItem], ontology: Ontology) -> list[sv.Detections]:
        """The engine with detector `ref` on `items`; an image the model fails on is an error naming it."""
        engine = Engine(self.detector(ref), None, PromptsFile(), self.settings)
        results = engine.run(items, RequestSpec(ontology))
        for result in results:
            if result.error is not None:
                raise type(result.error)(f"{ref}: {result.error}")
        return [r.detections for r in results]

    def predict(self, models: list[str], jobs: list[tuple[str, tuple[str, ...]]]
                ) -> dict[tuple[str, str, tuple[str, ...]], list[sv.Detections]]:
        """(model, label, prompts) -> one Detections per record, in the record's pixel space; runs what the cache
        lacks, one detector call per chunk of images and prompt set."""
        from .runner import chunks, progress_bar

        out = {(m, label, prompts): [] for m in models for label, prompts in jobs}
        total = len(models) * len(jobs) * len(self.records)
        bar = progress_bar("prompt workbench") if self.progress else None
        try:
            if bar is not None:
                bar.start()
                task = bar.add_task("prompt workbench", total=total)
            for ref in models:
                mkey = self.key(ref)
                for chunk in chunks(self.records, max(1, self.settings.batch_size)):
                    arrays = [record_image(r, self.loader, self.settings.max_image_pixels) for r in chunk]
                    for record, array in zip(chunk, arrays):
                        if not record.width or not record.height:
                            record.height, record.width = array.shape[:2]
                    hashes = [image_hash(a) for a in arrays]
                    for label, prompts in jobs:
                        found = [self.cache.get(h, mkey, prompts, self.params) for h in hashes]
                        missing = [i for i, f in enumerate(found) if f is None]
                        self.cached += len(chunk) - len(missing)
                        if missing:
                            detections = self.detect(ref, [MediaItem(arrays[i], chunk[i].image) for i in missing],
                                                     self.params.ontology(label, prompts))
                            self.calls += 1
                            self.computed += len(missing)
                            for i, d in zip(missing, detections):
                                found[i] = (np.asarray(d.xyxy, np.float32), np.asarray(d.confidence, np.float32))
                                self.cache.put(hashes[i], mkey, prompts, self.params, *found[i])
                        for record, array, (xyxy, scores) in zip(chunk, arrays, found):
                            out[(ref, label, prompts)].append(_in_record_space(xyxy, scores, label, record, array))
                        if bar is not None:
                            bar.advance(task, len(chunk))
        finally:
            if bar is not None:
                bar.stop()
        return out

    def sizes(self) -> list[tuple[int, int]]:
        return [(int(r.width), int(r.height)) for r in self.records]

    def evaluate(self, label: str, ref: str, prompts: tuple[str, ...], predictions: list[sv.Detections]
                 ) -> CandidateResult:
        result: CocoResult = coco_evaluate([r.annotations for r in self.records], predictions, [label], self.sizes(),
                                           self.params.max_detections)
        stats = result.per_label[label]
        curve = pr_curve(result)
        operating = (operating_point(label, result.matches[label], self.targets.for_label(label)) if self.targets
                     else None)
        return CandidateResult(model=ref, label=label, prompts=list(prompts), ap=stats["ap"], ap50=stats["ap50"],
                               truth=stats["truth"], predicted=stats["predicted"], best=best_f1_threshold(result),
                               curve=curve, operating=operating)

    def run(self, candidates: CandidatesFile, models: list[str], synonyms: int = 0) -> WorkbenchReport:
        """Every candidate of every label under every model; with `synonyms` >= 2, also the union of each label's
        top `synonyms` candidates (per model) as one synonym set."""
        if not models:
            raise CandidatesError("no detector to evaluate: give --models or `models:` in the candidates file")
        candidates = candidates.matched(self.truth_labels)
        self.targets = self.targets.matched(list(candidates.labels))
        jobs = [(label, (p,)) for label, prompts in candidates.labels.items() for p in prompts]
        results: list[CandidateResult] = []
        for ref in models:  # one model in memory at a time
            found = self.predict([ref], jobs)
            mine = [self.evaluate(label, ref, prompts, found[(ref, label, prompts)]) for label, prompts in jobs]
            unions = []
            for label, prompts in candidates.labels.items():
                if synonyms >= 2 and len(prompts) >= 2:
                    ranked = sorted((r for r in mine if r.label == label), key=lambda r: r.rank(), reverse=True)
                    unions.append((label, tuple(r.prompts[0] for r in ranked[:synonyms])))
            if unions:
                found = self.predict([ref], unions)
                mine += [self.evaluate(label, ref, prompts, found[(ref, label, prompts)]) for label, prompts in unions]
            results += mine
            self._detectors.pop(ref, None)
        return self._report(candidates, models, results)

    def _report(self, candidates: CandidatesFile, models: list[str], results: list[CandidateResult]) -> WorkbenchReport:
        report = WorkbenchReport(images=len(self.records), models=models, params=self.params, results=results,
                                 detector=models[0], winners={}, computed=self.computed, cached=self.cached,
                                 calls=self.calls, unannotated=self.unannotated, targets=self.targets.as_list())
        scores, met = report.model_scores(), report.targets_met()
        report.detector = max(models, key=lambda m: (met[m], scores[m], -models.index(m)))
        used: set[str] = set()
        for label in candidates.labels:
            mine = [r for r in results if r.label == label and r.model == report.detector]
            # best first (with a target: met, then most recall there); the earlier candidate wins a tie (stable
            # sort). A prompt already won by another label
            # cannot be reused (an ontology gives each prompt to one label).
            ranked = sorted(mine, key=lambda r: r.rank(), reverse=True)
            winner = next((r for r in ranked if not used & set(r.prompts)), None)
            if winner is None:
                raise CandidatesError(f"every candidate of label {label!r} is a prompt another label already won; "
                                      f"give it a prompt of its own")
            used |= set(winner.prompts)
            report.winners[label] = winner
        return report


def _in_record_space(xyxy: np.ndarray, scores: np.ndarray, label: str, record: LabeledImage,
                     array: np.ndarray) -> sv.Detections:
    """Boxes found on the decoded image, scaled to the size the annotations were made on (they differ only when a
    tool stored another size)."""
    h, w = array.shape[:2]
    sx, sy = (record.width or w) / w, (record.height or h) / h
    xyxy = xyxy * np.array([sx, sy, sx, sy], np.float32) if (sx, sy) != (1, 1) else xyxy
    return make_detections(xyxy, scores, np.zeros(len(scores), int), [label] * len(scores))


# -- outputs ----------------------------------------------------------------------------------------------------


def winning_prompts(report: WorkbenchReport, source: str = "") -> str:
    """The winners as a prompts file (YAML text, valid for `PromptsFile`): the best detector, per label the best
    prompt(s) and the threshold that maximised F1, or with targets the operating point's (its precision, recall
    and F1 with their intervals in the comments)."""
    labels = {}
    for label, r in report.winners.items():
        entry: dict = {"prompts": r.prompts}
        op = r.operating
        if op is not None and op.threshold is not None:
            entry["threshold"] = float(min(max(op.threshold, 0.0), 1.0))
        elif r.best is not None:
            entry["threshold"] = float(min(max(r.best["threshold"], 0.0), 1.0))
        labels[label] = entry
    doc = {"detector": report.detector, "text_threshold": report.params.text_threshold,
           "nms_iou": report.params.nms_iou, "labels": labels}
    PromptsFile.model_validate(doc)  # what we write must load
    header = [
        f"# Written by `prelabel prompts eval` on {datetime.date.today().isoformat()}"
        + (f" from {source}" if source else "") + f" over {report.images} annotated images.",
        "# Per label the candidate with the best AP (mAP@[.5:.95]) under the best detector; threshold: the score",
        "# that maximised F1 at IoU 0.5. The numbers are in report.json beside this file.",
    ]
    if report.targets:
        header[1] = ("# Per label the candidate that meets its target with the most recall (else the closest), then "
                     "best AP; threshold: the score")
        header[2:] = ["# that meets the target (" + ", ".join(report.targets) + ") with the most recall at IoU 0.5, or",
                      "# says it is not reached; P/R/F1 there with " + INTERVALS + ".",
                      "# The numbers are in report.json beside this file."]
    teachers = report.teachers if len(report.models) > 1 else {}
    for label, r in report.winners.items():
        best, op = r.best or {}, r.operating
        if op is not None:
            header.append(f"#   {label}: AP {r.ap:.3f}, AP50 {r.ap50:.3f}; {op.note()}; at "
                          f"{'-' if op.threshold is None else f'{op.threshold:g}'}: P {cell(op.precision, op.precision_ci)} "
                          f"R {cell(op.recall, op.recall_ci)} F1 {cell(op.f1, op.f1_ci)} "
                          f"(TP {op.tp}, FP {op.fp}, FN {op.fn})")
        else:
            header.append(f"#   {label}: AP {r.ap:.3f}, AP50 {r.ap50:.3f}"
                          + (f", P {best['precision']:.2f} R {best['recall']:.2f} F1 {best['f1']:.2f}" if best else ""))
        other = teachers.get(label)
        if other is not None and other.better != report.detector:  # one detector per prompts file: say so
            theirs = other.best[other.better]
            header.append(f"#     (better teacher for {label}: {other.better}, AP {theirs.ap:.3f} with "
                          f"{theirs.name!r}; see teachers in report.json)")
    return "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "label"


def _short_model(ref: str, models: list[str] | None = None) -> str:
    """A model's directory or repo name; its full reference when another model of `models` has the same name."""
    short = Path(ref.rstrip("/")).name or ref
    if models and sum((Path(m.rstrip("/")).name or m) == short for m in models) > 1:
        return ref
    return short


def save_pr_curves(report: WorkbenchReport, directory: Path) -> list[Path]:
    """One PNG per label, one precision/recall curve (IoU 0.5) per candidate and model, AP in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    multi_model = len(report.models) > 1
    paths, names = [], set()
    for label in dict.fromkeys(r.label for r in report.results):
        figure = Figure(figsize=(6.4, 4.8), dpi=100)
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        for r in report.for_label(label):
            name = r.name + (f" [{_short_model(r.model, report.models)}]" if multi_model else "")
            legend = f"{name}: AP {r.ap:.3f}, AP50 {r.ap50:.3f}"
            if r.curve is None:
                ax.plot([], [], label=legend + (" (nothing found)" if not r.predicted else " (no match at IoU 0.5)"))
                continue
            line, = ax.plot(r.curve["recall"], r.curve["precision"], label=legend)
            if r.best is not None:
                ax.plot([r.best["recall"]], [r.best["precision"]], "o", color=line.get_color())
        ax.set(xlim=(0, 1.01), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
               title=f"{label}: precision/recall at IoU 0.5 (dot: best F1 threshold)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        name = _slug(label)
        while name in names:
            name += "_"
        names.add(name)
        path = directory / f"pr_{name}.png"
        figure.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def write_outputs(report: WorkbenchReport, out: Path, source: str = "") -> dict[str, str]:
    """`out/report.json`, `out/prompts.yaml` (the winners) and `out/curves/pr_<label>.png`."""
    out.mkdir(parents=True, exist_ok=True)
    curves = save_pr_curves(report, out / "curves")
    prompts = out / "prompts.yaml"
    prompts.write_text(winning_prompts(report, source), encoding="utf-8")
    report.outputs = {"report": str(out / "report.json"), "prompts": str(prompts), "curves": str(out / "curves")} | {
        f"curve:{p.stem.removeprefix('pr_')}": str(p) for p in curves}
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return report.outputs


def print_workbench(report: WorkbenchReport, console=None) -> None:
    """A rich table: per label and candidate (and model) AP, AP50 and the best threshold; winners marked."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 160))
    scores = report.model_scores()
    left_out = f" ({report.unannotated} unannotated left out)" if report.unannotated else ""
    table = Table(title=f"prompt workbench: {report.images} annotated images{left_out}, detector runs "
                        f"{report.computed} computed / {report.cached} cached"
                        + (f"; target {', '.join(report.targets)}" if report.targets else ""))
    targeted = bool(report.targets)
    for column in ("label", "candidate", *(["model"] if len(report.models) > 1 else []), "AP", "AP50",
                   "threshold", "P", "R", "F1", *(["target"] if targeted else []), "truth", "found"):
        table.add_column(column, justify="right" if column not in ("label", "candidate", "model", "target") else "left")
    for label in dict.fromkeys(r.label for r in report.results):
        for r in sorted(report.for_label(label), key=lambda r: r.rank(), reverse=True):
            won = report.winners.get(label) is r
            best, op = r.best or {}, r.operating
            if targeted and op is not None:
                point = [f"{op.threshold:g}" if op.threshold is not None else "-", cell(op.precision, op.precision_ci),
                         cell(op.recall, op.recall_ci), cell(op.f1, op.f1_ci), _target_cell(op)]
            elif targeted:
                point = ["-"] * 5
            else:
                point = ([f"{best['threshold']:.3f}", f"{best['precision']:.2f}", f"{best['recall']:.2f}",
                          f"{best['f1']:.2f}"] if best else ["-"] * 4)
            cells = [label, ("* " if won else "  ") + r.name, *([_short_model(r.model, report.models)] if len(report.models) > 1 else []),
                     f"{r.ap:.3f}", f"{r.ap50:.3f}", *point, str(r.truth), str(r.predicted)]
            table.add_row(*cells, style="bold green" if won else None)
        table.add_section()
    console.print(table)
    if targeted:
        console.print(f"operating points (P, R, F1 with {INTERVALS}):")
        for label, r in report.winners.items():
            op = r.operating
            line = f"  {label}: " + (op.note() if op is not None else "no ground truth here, no operating point")
            console.print(line, style="bold red" if op is not None and op.met is False else None, highlight=False)
    if len(report.models) > 1:
        print_teachers(report, console)
        console.print("models (mean best AP): " + ", ".join(f"{m} {s:.3f}" for m, s in scores.items())
                      + f"; best: {report.detector}")


def _target_cell(op: OperatingPoint) -> str:
    if op.target is None:
        return "- (best F1)"
    if op.met:
        return f"{op.target.describe()}: met"
    return f"{op.target.describe()}: NOT met, best {op.best['value']:.2f}" if op.best else f"{op.target.describe()}: NOT met"


def print_teachers(report: WorkbenchReport, console) -> None:
    """Per label, every detector with its best prompt; the better teacher marked."""
    from rich.table import Table

    table = Table(title="teachers per label: each detector with its best prompt (* the better teacher)")
    for column in ("label", "teacher", "best prompt", "AP", "AP50", "threshold", "P", "R", "F1"):
        table.add_column(column, justify="left" if column in ("label", "teacher", "best prompt") else "right")
    for label, comparison in report.teachers.items():
        for model, r in comparison.best.items():
            better = model == comparison.better
            best = r.best or {}
            table.add_row(label, ("* " if better else "  ") + _short_model(model, report.models), r.name,
                          f"{r.ap:.3f}", f"{r.ap50:.3f}",
                          *([f"{best['threshold']:.3f}", f"{best['precision']:.2f}", f"{best['recall']:.2f}",
                             f"{best['f1']:.2f}"] if best else ["-"] * 4),
                          style="bold green" if better else None)
        table.add_section()
    console.print(table)


def evaluate_prompts(records: list[LabeledImage], candidates_path: Path, out: Path, settings: Settings,
                     models: str | None = None, cache_dir: Path | None = None, loader: ImageSource | None = None,
                     params: DetectParams | None = None, synonyms: int = 0, progress: bool = True,
                     build_detector: Callable[[str], object] | None = None,
                     detectors: list[str] | None = None, targets: list[str] | None = None) -> WorkbenchReport:
    """What `prelabel prompts eval` does: load and check the candidates, run them (cached under `cache_dir`, default
    MODEL_DIR/cache/workbench), write the outputs into `out`. The detectors: `models` (comma-separated) and
    `detectors`, else the candidates file's, else the settings'. `targets`: `--target` options (operating points,
    see operating.py)."""
    wanted = Targets.parse(targets)
    candidates = CandidatesFile.load(candidates_path)
    chosen = parse_models(models, detectors) or candidates.models or [settings.detector]
    cache = PredictionCache(cache_dir or settings.model_dir / "cache" / "workbench")
    try:
        bench = Workbench(records, cache, settings, loader, params, build_detector=build_detector, progress=progress,
                          targets=wanted)
        # fail on unknown labels before loading any model
        wanted.matched(list(candidates.matched(bench.truth_labels).labels))
        report = bench.run(candidates, chosen, synonyms)
    finally:
        cache.close()
    write_outputs(report, out, str(candidates_path))
    return report


__all__ = [
    "CandidatesError", "CandidatesFile", "DetectParams", "PredictionCache", "Workbench", "WorkbenchReport",
    "CandidateResult", "TeacherComparison", "evaluate_prompts", "image_hash", "model_key", "print_teachers",
    "print_workbench", "save_pr_curves", "winning_prompts", "write_outputs", "parse_models",
]
