"""The prediction engine: the one place that turns a batch of media items and a request spec into typed results.

`Engine.run(items, spec)` fills prompt templates from each item's task fields, groups items by their filled
ontology (one batched detector pass per group: one unless prompts name task fields), runs two-stage labels, embeds
every whole image and region crop that classifications ask for in one classifier batch, adds masks, and scores each
item's uncertainty. A model failure on a batch is retried item by item, so only the item that breaks the model gets
an error. Adapters (Label Studio, CVAT, folder mode, the workbench, distill, review) build a `RequestSpec` from their
request and turn `ItemResult`s into their format; none of them predicts.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import supervision as sv

from .active import classification_confidence, task_score
from .errors import ConfigError, InferenceError, ModelUnavailableError, PrelabelError
from .media import MediaItem
from .models import (
    DETECTOR, SEGMENTER, Detector, Segmenter, UnloadedModel, build_detector, build_segmenter, model_id, model_kind,
    pick_device,
)
from .models.base import Classifier, Tracker
from .models.loading import resolve_model
from .ontology import Classification, Ontology, PromptsFile
from .settings import Settings
from .types import CLASS_NAME, CLASS_PROBABILITY, RUNNER_UP, crop, image_regions, make_detections

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# -- what is asked, what comes back ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifyRequest:
    """Classify into `classification`'s choices: the whole image (`region_labels` None), or each detection whose
    label is in `region_labels` (two-stage per-region classes). `name` keys the result (e.g. a Choices control)."""

    name: str
    classification: Classification
    region_labels: frozenset[str] | None = None


@dataclass(frozen=True)
class RequestSpec:
    """What to predict for every item of a batch: detections of `ontology`'s labels (none when it is None or has
    no labels), `classify` requests, and masks (`True`: for every item with detections; a set of labels: for items
    where a detection has one of them)."""

    ontology: Ontology | None = None
    classify: tuple[ClassifyRequest, ...] = ()
    masks: bool | frozenset[str] = False

    @property
    def detects(self) -> bool:
        return self.ontology is not None and bool(self.ontology.labels)


@dataclass
class ClassScores:
    """One classify request's answer for an item: probabilities (rows: the image, or each detection, zeros where a
    detection was not classified; columns: choices) and the chosen choice indices per row."""

    request: ClassifyRequest
    classification: Classification  # filled from the item's fields
    probs: np.ndarray
    chosen: list[list[int]]

    @property
    def confidence(self) -> float:
        return classification_confidence(self.probs, self.chosen)


@dataclass
class ItemResult:
    """The engine's answer for one item: detections (labels, scores, named extras, full-size masks when asked),
    classifications, and `score` (the item's confidence, `1 - uncertainty`: low = worth a person's look first), or
    `error` (this item only; the batch's other items keep their results)."""

    detections: sv.Detections = field(default_factory=sv.Detections.empty)
    classes: list[ClassScores] = field(default_factory=list)
    ontology: Ontology | None = None  # filled from the item's fields
    score: float = 1.0
    error: PrelabelError | None = None

    @property
    def uncertainty(self) -> float:
        return round(1.0 - self.score, 6)


# -- model references --------------------------------------------------------------------------------------------
def _short(ref: str) -> str:
    name = Path(ref.rstrip("/")).name if ref else "none"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def model_refs(settings: Settings, prompts: PromptsFile) -> tuple[str, str | None]:
    """(detector, segmenter or None): flags/env first, then the prompts file's `detector`/`segmenter` (`segmenter: ""`
    there: none), then defaults. The default segmenter (SAM) is not used beside a detector known (from files here) to
    make its own masks and take clicks (SAM 3): it would never run."""
    fields = settings.model_fields_set
    detector = settings.detector if "detector" in fields or not prompts.detector else prompts.detector
    if "segmenter" in fields or prompts.segmenter is not None:
        segmenter = settings.segmenter if "segmenter" in fields else prompts.segmenter
    else:
        kind = model_kind(detector, settings.model_dir, DETECTOR) if detector else None
        segmenter = None if getattr(kind, "gives_masks", False) else settings.segmenter
    return detector, segmenter or None


def classifier_ref(settings: Settings, prompts: PromptsFile) -> str | None:
    """The classifier: flag/env (PRELABEL_CLASSIFIER, "" or "none" for none) first, then the prompts file's."""
    ref = settings.classifier if "classifier" in settings.model_fields_set else (prompts.classifier or settings.classifier)
    return None if not ref or ref.lower() == "none" else ref


def require_models(refs: dict[str, str | None], model_dir: Path) -> None:
    """Every model is here (or downloaded now) before any loads: one error names each missing one."""
    missing = []
    for kind, ref in refs.items():
        if ref:
            try:
                resolve_model(ref, model_dir)
            except ModelUnavailableError as exc:
                missing.append(f"{kind}: {exc}")
    if len(missing) == 1:
        raise ModelUnavailableError(missing[0])
    if missing:
        raise ModelUnavailableError(f"{len(missing)} models are missing (nothing was loaded):\n  " + "\n  ".join(missing))


class Engine:
    """The models (loaded once per process) and the prompts; every entrance predicts through `run`."""

    def __init__(
        self,
        detector: Detector | None,
        segmenter: Segmenter | None,
        prompts: PromptsFile,
        settings: Settings,
        classifier: Classifier | None = None,
        tracker: Tracker | None = None,
    ):
        self.detector = detector
        self.segmenter = segmenter
        self.prompts = prompts
        self.settings = settings
        self.classifier = classifier
        self._tracker = tracker
        self._tracker_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, load: bool = True, detector: bool = True) -> Engine:
        """Load models once (see `model_refs` for which). `load=False`: models known by id only (`UnloadedModel`),
        for a process that computes model versions while others run the models (the Ray driver).
        `detector=False`: no detector (interactive segmentation only)."""
        prompts = PromptsFile.load(settings.prompts)
        detector_ref, segmenter_ref = model_refs(settings, prompts)
        if not load:
            refs = (detector_ref, segmenter_ref, classifier_ref(settings, prompts))
            det, seg, clf = (UnloadedModel(model_id(r, settings.model_dir),
                                           model_kind(r, settings.model_dir, role) if role else None) if r else None
                             for r, role in zip(refs, (DETECTOR, SEGMENTER, None)))
            seg = det if det is not None and segmenter_ref == detector_ref else seg  # as loaded: one model
            return cls(det, seg, prompts, settings, clf)
        require_models({"detector": detector_ref if detector else None, "segmenter": segmenter_ref,
                        "classifier": classifier_ref(settings, prompts)}, settings.model_dir)
        device = pick_device(settings.device)
        options = dict(precision=settings.precision, cache_size=settings.embedding_cache_size)
        detector = (build_detector(detector_ref, settings.model_dir, device, settings.batch_size, **options)
                    if detector else None)
        if segmenter_ref and detector is not None and segmenter_ref == detector_ref:
            segmenter = detector  # one model serving both (SAM 3): one load
        elif segmenter_ref:
            segmenter = build_segmenter(segmenter_ref, settings.model_dir, device, **options)
        else:
            segmenter = None
        classifier = None
        if ref := classifier_ref(settings, prompts):
            from .models.classifier import build_classifier

            classifier = build_classifier(ref, settings.model_dir, device, settings.classifier_batch_size)
        return cls(detector, segmenter, prompts, settings, classifier)

    # -- versions and ontologies --------------------------------------------------------------------------------
    @property
    def base_version(self) -> str:
        """Names the models that answer: detector+segmenter, or the detector alone where it makes its own masks
        (SAM 3, also as its own segmenter)."""
        det = _short(self.detector.model_id) if self.detector else "nodetector"
        if self.segmenter is not None and self.segmenter is not self.detector:
            return f"{det}+{_short(self.segmenter.model_id)}"
        return det if self.detector_masks else f"{det}+nosam"

    def model_version(self, ontology: Ontology, classifications: list[Classification] | tuple = ()) -> str:
        """Changes whenever a model or a resolved prompt/template/threshold changes. With classifications (Choices,
        tags) the classifier's id and their digests join in; the text filled from task data never does."""
        if not classifications and not ontology.two_stage:
            return f"{self.base_version}-{ontology.digest()}"
        clf = _short(self.classifier.model_id) if self.classifier else "noclassifier"
        digest = hashlib.sha256(" ".join([ontology.digest(), *(c.digest() for c in classifications)]).encode())
        return f"{self.base_version}+{clf}-{digest.hexdigest()[:10]}"

    def ontology(self, labels: list[str] | None = None, predicted_values: dict | None = None) -> Ontology:
        return self.prompts.ontology(labels, predicted_values, self.settings.max_detections)

    # -- requirements -------------------------------------------------------------------------------------------
    def require_detector(self) -> Detector:
        if self.detector is None:
            raise ConfigError("boxes were asked for, but this engine runs without a detector (--detector)")
        return self.detector

    @staticmethod
    def _declares(model, name: str) -> bool:
        """What a model's class declares (for an UnloadedModel: the class it would be built as)."""
        kind = model.kind if isinstance(model, UnloadedModel) else type(model)
        return bool(getattr(kind, name, False))

    @property
    def detector_masks(self) -> bool:
        """Does the detector give each box its own mask (SAM 3), so that masks need no segmenter pass?"""
        return self._declares(self.detector, "gives_masks")

    @property
    def finds_exemplars(self) -> bool:
        """Can the detector find every instance like an exemplar box (SAM 3)?"""
        return self._declares(self.detector, "finds_exemplars")

    @property
    def clicker(self) -> Segmenter | None:
        """What turns clicks into a mask: the segmenter, else a detector that can (SAM 3 with its tracker)."""
        if self.segmenter is not None:
            return self.segmenter
        return self.detector if getattr(self.detector, "clicks", False) else None

    @property
    def gives_masks(self) -> bool:
        return self.segmenter is not None or self.detector_masks

    def require_segmenter(self) -> Segmenter:
        if self.segmenter is None:
            raise ConfigError("masks were asked for, but the server runs without a segmenter (--segmenter)")
        return self.segmenter

    def require_classifier(self, what: str = "classification") -> Classifier:
        if self.classifier is None:
            raise ConfigError(
                f"{what} needs a zero-shot classifier, but the server runs without one: set PRELABEL_CLASSIFIER "
                f"(or --classifier, or `classifier:` in the prompts file) to a CLIP/SigLIP model"
            )
        return self.classifier

    # -- the one entrance ---------------------------------------------------------------------------------------
    def run(self, items: list[MediaItem], spec: RequestSpec) -> list[ItemResult]:
        return list(self.iter_run(items, spec))

    def iter_run(self, items: list[MediaItem], spec: RequestSpec,
                 between: Callable[[], None] | None = None) -> Iterator[ItemResult]:
        """One `ItemResult` per item, in order. Masks are added one item at a time as results are taken, so a
        consumer that converts and drops each result never holds a batch's full-size masks at once. `between()`
        runs before each item's masks (where the server's batch thread yields to clicks)."""
        if spec.classify:
            self.require_classifier("the classifications " + ", ".join(repr(r.name) for r in spec.classify))
        if spec.masks and spec.detects and not self.detector_masks:
            self.require_segmenter()
        results = [ItemResult() for _ in items]
        self._fill(items, spec, results)
        self._predict_isolated(items, spec, results, [n for n, r in enumerate(results) if r.error is None])
        for item, result in zip(items, results):
            if result.error is None and not self._wants_masks(spec, result.detections):
                result.detections.mask = None  # a detector's own masks (SAM 3) where none were asked for
            elif result.error is None and result.detections.mask is None:
                if between is not None:
                    between()
                try:
                    self.add_masks(item.array, result.detections)
                except PrelabelError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the segmenter broke on this item only
                    result.error = self._model_failed(item, exc)
            yield result

    def _fill(self, items: list[MediaItem], spec: RequestSpec, results: list[ItemResult]) -> None:
        """Each item's ontology and classifications with `{field}`s filled from its task fields; an item whose
        fields lack one gets that error (naming the label and the field) and the others go on."""
        for item, result in zip(items, results):
            try:
                result.ontology = spec.ontology.fill(item.fields) if spec.ontology is not None else None
                result.classes = [ClassScores(r, r.classification.fill(item.fields), np.zeros((0, 0)), [])
                                  for r in spec.classify]
            except PrelabelError as exc:
                result.error = exc

    def _predict_isolated(self, items: list[MediaItem], spec: RequestSpec, results: list[ItemResult],
                          members: list[int]) -> None:
        """Detect and classify `members` in one batch; if a model fails, item by item."""
        if not members:
            return
        try:
            self._predict(items, spec, results, members)
        except PrelabelError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model failure: find the item that causes it
            if len(members) == 1:
                results[members[0]].error = self._model_failed(items[members[0]], exc)
                return
            log.warning("the model failed on a batch of %d images; retrying them one by one", len(members))
            for n in members:
                self._predict_isolated(items, spec, results, [n])

    @staticmethod
    def _model_failed(item: MediaItem, exc: Exception) -> InferenceError:
        log.error("the model failed on image %s", item.source, exc_info=exc)
        return InferenceError(f"the model failed on this image ({item.source}): {type(exc).__name__}: {exc}")

    def _predict(self, items: list[MediaItem], spec: RequestSpec, results: list[ItemResult], members: list[int]) -> None:
        if spec.detects:
            groups: dict[Ontology, list[int]] = {}
            for n in members:
                groups.setdefault(results[n].ontology, []).append(n)
            for onto, group in groups.items():
                # a detector's own masks (SAM 3) come with its boxes; a segmenter's are added per item as results
                # are taken (iter_run), so that a batch's full-size masks are never all held at once
                masks = bool(spec.masks) and self.detector_masks
                for n, det in zip(group, self.detect([items[n].array for n in group], onto, masks=masks)):
                    results[n].detections = det
        if spec.classify:
            self._classify(items, results, members)
        for n in members:
            r = results[n]
            scores = [c.confidence for c in r.classes if c.probs.size]
            if spec.detects:
                scores.append(task_score(r.detections, r.ontology))
            r.score = min(scores, default=1.0)

    def _classify(self, items: list[MediaItem], results: list[ItemResult], members: list[int]) -> None:
        """Every whole image and region crop the requests ask for, embedded in one classifier batch (a crop asked
        for twice is embedded once), then scored against each request's (cached) choice embeddings."""
        parts: dict[tuple, tuple[int, int]] = {}  # (item, rows or None) -> (start, count) in the batch
        crops: list[tuple[int, tuple[int, ...] | None]] = []
        wanted: list[tuple[int, ClassScores, tuple[int, ...] | None]] = []
        for n in members:
            names = [str(x) for x in results[n].detections.data.get(CLASS_NAME, [])]
            for scores in results[n].classes:
                labels = scores.request.region_labels
                rows = None if labels is None else tuple(r for r, name in enumerate(names) if name in labels)
                if rows == ():
                    continue
                if (n, rows) not in parts:
                    parts[(n, rows)] = (sum(count for _, count in parts.values()), 1 if rows is None else len(rows))
                    crops.append((n, rows))
                wanted.append((n, scores, rows))
        if not wanted:
            return
        embeddings = self.embed_crops([items[n].array for n, _ in crops],
                                      [None if rows is None else results[n].detections.xyxy[list(rows)] for n, rows in crops])
        classifier = self.require_classifier()
        for n, scores, rows in wanted:
            start, count = parts[(n, rows)]
            probs = classifier.probabilities(embeddings[start : start + count], scores.classification)
            chosen = classifier.decide(probs, scores.classification)
            if rows is not None:  # rows of the answer are the item's detections
                size = len(results[n].detections)
                full, picks = np.zeros((size, probs.shape[1]), np.float32), [[] for _ in range(size)]
                full[list(rows)] = probs
                for k, r in enumerate(rows):
                    picks[r] = chosen[k]
                probs, chosen = full, picks
            scores.probs, scores.chosen = probs, chosen

    @staticmethod
    def _wants_masks(spec: RequestSpec, detections: sv.Detections) -> bool:
        if not spec.masks or not spec.detects:
            return False
        if spec.masks is True:
            return True
        return bool(set(map(str, detections.data.get(CLASS_NAME, []))) & spec.masks)

    # -- building blocks (also for the workbench, distill and review) -------------------------------------------
    def detect(self, images: list[np.ndarray], ontology: Ontology, masks: bool = False) -> list[sv.Detections]:
        """Detections per image, labelled with `ontology`'s labels. Two-stage labels (`detect:` in the prompts
        file) are found by their group's detector prompts, then every such box of every image is classified in one
        classifier batch among its group's labels."""
        results = (self._two_stage(images, ontology) if ontology.two_stage
                   else self._regions(images, ontology, masks))
        if masks:
            for image, detections in zip(images, results):
                self.add_masks(image, detections)
        return results

    def _regions(self, images: list[np.ndarray], ontology: Ontology, masks: bool = False) -> list[sv.Detections]:
        """The detector's boxes, each clipped to its image; whatever a detector returns, a box with no area inside
        the image (zero width or height, off the image, NaN) goes no further. A detector that makes its own masks
        (SAM 3) makes them only when `masks`."""
        detector = self.require_detector()
        found = detector.detect(images, ontology, masks=masks) if self.detector_masks else detector.detect(images, ontology)
        where = f"detector {detector.model_id}"
        return [image_regions(det, image.shape[1], image.shape[0], where) for image, det in zip(images, found)]

    def embed_crops(self, images: list[np.ndarray], boxes: list[np.ndarray | None]) -> torch.Tensor:
        """Classifier embeddings of every crop: `boxes[i]` (M,4 xyxy) of `images[i]`, or the whole image where
        `boxes[i]` is None; all of them in one classifier batch (one forward per `classifier_batch_size` crops)."""
        crops = [
            image if b is None else crop(image, xyxy)
            for image, b in zip(images, boxes)
            for xyxy in ([None] if b is None else b)
        ]
        return self.require_classifier().embed_images(crops)

    def _two_stage(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        """Stage one: the detector on one-stage labels and group prompts. Stage two: each group box's crop gets the
        best of its group's labels; `confidence` stays the box score (the thresholds apply to it), RUNNER_UP is
        that score times the second-best label's probability over the chosen one's (`active.py` reads it as label
        confusion), CLASS_PROBABILITY the chosen label's probability."""
        classifier = self.require_classifier(f"two-stage labels ({', '.join(s.name for s in ontology.labels if s.detect)})")
        stage1, index, groups = ontology.stages()
        found = self._regions(images, stage1)
        rows = [np.flatnonzero(np.isin(det.class_id, list(groups))) for det in found]
        embeddings = self.embed_crops([im for im, r in zip(images, rows) if len(r)],
                                      [det.xyxy[r] for det, r in zip(found, rows) if len(r)])
        out, start = [], 0
        for det, picked in zip(found, rows):
            class_id = np.array([index[c] for c in det.class_id], int)
            confidence = det.confidence.astype(np.float32)
            runner_up = np.asarray(det.data.get(RUNNER_UP, np.zeros(len(det))), np.float32).copy()
            probability = np.ones(len(det), np.float32)
            emb = embeddings[start : start + len(picked)]
            start += len(picked)
            for g, (members, classification) in groups.items():
                mine = det.class_id[picked] == g
                if not mine.any():
                    continue
                probs = classifier.probabilities(emb[mine], classification)
                order = np.argsort(-probs, axis=1)
                best = probs[np.arange(len(probs)), order[:, 0]]
                second = probs[np.arange(len(probs)), order[:, 1]] if probs.shape[1] > 1 else np.zeros(len(probs))
                at = picked[mine]
                class_id[at] = [members[j] for j in order[:, 0]]
                probability[at] = best
                runner_up[at] = confidence[at] * second / np.maximum(best, 1e-6)
            names = np.array([ontology.labels[c].name for c in class_id], dtype=object)
            data = {k: v for k, v in det.data.items() if k != CLASS_NAME}
            data |= {RUNNER_UP: runner_up, CLASS_PROBABILITY: probability}
            result = make_detections(det.xyxy, confidence, class_id, names, **data)
            result.metadata = dict(det.metadata)
            out.append(result)
        return out

    def add_masks(self, image: np.ndarray, detections: sv.Detections) -> None:
        """Masks for `detections` from the segmenter, unless the detector gave them (SAM 3)."""
        if detections.mask is not None and len(detections.mask) == len(detections):
            return
        segmenter = self.clicker or self.require_segmenter()
        if len(detections):
            detections.mask = segmenter.segment(image, boxes=detections.xyxy)[0]
        else:
            detections.mask = np.zeros((0, *image.shape[:2]), bool)

    # -- video ----------------------------------------------------------------------------------------------------
    @property
    def tracker_ref(self) -> str | None:
        ref = self.settings.tracker
        return None if not ref or ref.lower() == "none" else ref

    def tracker(self) -> Tracker | None:
        """The video tracker, loaded on first use (image-only users never download it); None where
        PRELABEL_TRACKER is none (the detector then runs on every frame). A SAM 3 detector named as the tracker
        too is one model."""
        ref = self.tracker_ref
        if ref is None:
            return None
        with self._tracker_lock:
            if self._tracker is None:
                if ref == getattr(self.detector, "model_id", None) and hasattr(self.detector, "start"):
                    self._tracker = self.detector
                else:
                    from .models import build_tracker

                    self._tracker = build_tracker(ref, self.settings.model_dir, pick_device(self.settings.device),
                                                  precision=self.settings.precision)
            return self._tracker

    def video_version(self, ontology: Ontology) -> str:
        """The image version plus the tracker, the detection interval and the keyframe tolerance."""
        s = self.settings
        tracker = _short(self.tracker_ref) if self.tracker_ref else "notracker"
        knobs = f"{s.video_detect_every if self.tracker_ref else 1}/{s.video_track_fps:g}/{s.keyframe_tolerance:g}"
        digest = hashlib.sha256(f"{self.model_version(ontology)} {tracker} {knobs}".encode()).hexdigest()[:10]
        return f"{self.base_version}+{tracker}-{digest}"

    def track(self, frames, ontology: Ontology, progress=None, fps: float | None = None):
        """Tracks of `ontology`'s labels over decoded `frames` ((Frame, RGB) pairs): the detector every
        PRELABEL_VIDEO_DETECT_EVERY frames, the tracker between, on at most about PRELABEL_VIDEO_TRACK_FPS frames
        per second of a video of `fps` (see `video/track.py`). Returns (tracks, times)."""
        from .video.track import TrackOptions, track_frames

        if not ontology.labels:
            raise ConfigError("a video needs labels to track (the label config's <Labels> for the video)")
        tracker = self.tracker()

        def detect(image: np.ndarray) -> sv.Detections:
            return self.detect([image], ontology)[0]

        track_every = max(1, int(fps // self.settings.video_track_fps)) if fps else 1
        options = TrackOptions(every=self.settings.video_detect_every, track_every=track_every)
        return track_frames(frames, detect, tracker, options, progress)

    def require_clicker(self) -> Segmenter:
        if (clicker := self.clicker) is None:
            raise ConfigError("clicks were sent, but the server runs without a segmenter (--segmenter)")
        return clicker

    def find_like(self, image: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray, label: str,
                  ontology: Ontology | None = None, masks: bool = True) -> sv.Detections:
        """Every instance in `image` like the positive exemplar boxes (xyxy pixels, `box_labels` 1) and unlike the
        negative ones (0), as detections of `label`, scored at its threshold in `ontology` (else the prompts
        file's default box threshold)."""
        if not self.finds_exemplars:
            raise ConfigError(f"finding every object like a box needs SAM 3 as the detector (this server runs "
                              f"{self.detector.model_id if self.detector else 'no detector'})")
        ontology = ontology or self.ontology()
        spec = next((s for s in ontology.labels if s.name == label), None)
        threshold = spec.threshold if spec is not None else self.prompts.box_threshold
        found = self.detector.find_like(image, boxes, box_labels, threshold, ontology.max_detections,
                                        ontology.nms_iou, masks)
        names = np.array([label] * len(found), dtype=object)
        result = make_detections(found.xyxy, found.confidence, np.zeros(len(found), int), names, mask=found.mask)
        result.metadata = dict(found.metadata)
        return image_regions(result, image.shape[1], image.shape[0], f"detector {self.detector.model_id}")

    def segment(
        self, image: np.ndarray, points: np.ndarray | None, point_labels: np.ndarray | None, box: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        """Interactive: clicks (1 positive, 0 negative) and/or one xyxy box -> one full-size boolean mask and its
        score."""
        masks, scores = self.require_clicker().segment(
            image, boxes=None if box is None else np.asarray(box)[None], points=points, point_labels=point_labels
        )
        return masks[0], float(np.clip(scores[0], 0, 1))  # SAM's predicted IoU can stray just outside [0, 1]

    def prepare(self, image: np.ndarray) -> None:
        """Compute and cache the image embedding, so that the next `segment` on it costs only the mask decoder."""
        self.require_clicker().prepare(image)
