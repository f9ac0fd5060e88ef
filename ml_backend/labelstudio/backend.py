"""The Label Studio ML-backend protocol, independent of the web framework: setup, predict (batch and
interactive), webhook, versions."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import supervision as sv
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, PrelabelError, RequestError
from .images import LabelStudioImageSource
from ..media import MediaItem
from ..metrics import Metrics
from ..ontology import Classification, LabelSpec, Ontology, normalize_prompt
from ..engine import ClassifyRequest, Engine, RequestSpec
from ..types import make_detections
from .config import EXCLUDE, MASK_TYPES, Control, ProjectConfig, Selection, is_exclude, parse_config
from .convert import (
    choices_result,
    detections_to_results,
    percent_to_box,
    percent_to_point,
)
from .store import EventStore

log = logging.getLogger(__name__)

EXEMPLAR_MEMORY = 256  # task images whose smart rectangles are remembered (least recently used go first)
DUPLICATE_IOU = 0.7  # a found box this close to a drawn exemplar is that exemplar: it gets no second rectangle
TRAIN_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_DELETED", "START_TRAINING"}


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    project: str | int | None = None
    label_config: str | None = Field(None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tasks: list[Any]
    project: str | int | None = None
    label_config: str | None = None
    params: dict | None = None


class PredictResponse(BaseModel):
    """Exactly one entry per task: a prediction `{"result", "score", "model_version"}`, or for a task that failed
    `{"task", "error": {"kind", "message"}}` (no `result`, so Label Studio stores nothing and retries later)."""

    results: list[dict]


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: str
    project: dict | int | None = None


def project_id(project: str | int | dict | None) -> int | None:
    """Label Studio sends "<id>.<timestamp>" to /setup and /predict, and a project dict to /webhook."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None:
        return None
    head = str(project).split(".", 1)[0]
    return int(head) if head.isdigit() else None


def is_interactive(req: PredictRequest) -> bool:
    """Smart tools send their regions as `params.context.result` (an empty list when the last of them was
    deleted); batch predictions send no context."""
    context = (req.params or {}).get("context")
    return isinstance(context, dict) and isinstance(context.get("result"), list)


def context_regions(context: dict) -> list[dict]:
    return [r for r in context.get("result", []) if isinstance(r, dict)]


def task_error(task_id, exc: PrelabelError) -> dict:
    where = f"task {task_id}" if task_id is not None else "task without id"
    return {"task": task_id, "error": {"kind": exc.kind, "message": f"{where}: {exc}"}}


@dataclass
class PreparedPredict:
    """A checked /predict request: its tasks, config, ontology and model version; `context` for interactive ones."""

    tasks: list
    config: ProjectConfig
    ontology: Ontology
    version: str
    context: dict | None
    project: int | None = None


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


@dataclass
class Exemplars:
    """A task image's smart rectangles as last sent: the positive boxes (xyxy pixels) of `label`, and the Exclude
    boxes, negative exemplars for every later query on the image."""

    label: str | None = None
    positives: np.ndarray = field(default_factory=_no_boxes)
    negatives: np.ndarray = field(default_factory=_no_boxes)


class ExemplarMemory:
    """`Exemplars` by (project, task id, image name), for the `size` task images used last."""

    def __init__(self, size: int = EXEMPLAR_MEMORY):
        self.size = size
        self._items: OrderedDict[tuple, Exemplars] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Exemplars:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return replace(self._items[key])
        return Exemplars()

    def put(self, key: tuple, exemplars: Exemplars) -> None:
        with self._lock:
            self._items[key] = exemplars
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def forget_negatives(self, project: int | None, task: int | None) -> None:
        """The task's Exclude boxes are gone (Label Studio sent no smart region: it says no more than that)."""
        with self._lock:
            for key, exemplars in self._items.items():
                if key[:2] == (project, task):
                    exemplars.negatives = _no_boxes()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class LoadedTasks:
    """Tasks with their images fetched: `entries[i]` holds task i's error if it already failed."""

    tasks: list
    entries: list[dict | None]
    images: list[tuple[int, str, MediaItem]]  # (task index, data key, image)


class LabelStudioBackend:
    def __init__(self, engine: Engine, loader: LabelStudioImageSource, store: EventStore | None, metrics: Metrics):
        self.engine = engine
        self.loader = loader
        self.store = store
        self.metrics = metrics
        self.settings = engine.settings
        self.configs: dict[int | None, str] = {}
        self.versions: dict[int | None, str] = {}
        self.skipped: dict[int, list[dict]] = {}  # per project: the controls it does not fill, and why (/health)
        self._noted: set[tuple] = set()  # (project, config) whose skipped controls the log has told
        self.exemplars = ExemplarMemory()  # "find all like this" (SAM 3): the smart rectangles of each task image
        self._lock = threading.Lock()

    @classmethod
    def for_batch(cls, engine: Engine) -> LabelStudioBackend:
        """For batch runs outside the server (`prelabel annotate`, Ray actors): no webhook store."""
        return cls(engine, LabelStudioImageSource(engine.settings), None, Metrics())

    # -- /setup, /versions --------------------------------------------------------------------------------------
    def setup(self, req: SetupRequest) -> dict:
        """The model version for the project's config, and the controls it skips (Label Studio reads only
        `model_version`); a ConfigError (422: Label Studio refuses the backend) only when nothing can be filled."""
        pid = project_id(req.project)
        if req.hostname and not self.loader.label_studio_url:
            self.loader.configure_label_studio(req.hostname, req.access_token)
            log.info("images relative to Label Studio resolve against %s (from /setup)", req.hostname)
        version = self.engine.model_version(self.engine.ontology())
        answer: dict = {"skipped": [], "warnings": []}
        if req.label_config:
            selection = self.select(parse_config(req.label_config), pid)
            version = self.version_for(selection.config, self.ontology_for(selection.config))
            answer = {"skipped": [asdict(s) for s in selection.skipped], "warnings": selection.warnings}
            with self._lock:
                self.configs[pid] = req.label_config
        with self._lock:
            self.versions[pid] = version
        return {"model_version": version} | answer

    def known_versions(self) -> dict:
        with self._lock:
            versions = set(self.versions.values())
        return {"versions": sorted(versions) or [self.engine.model_version(self.engine.ontology())]}

    def select(self, config: ProjectConfig, project: int | None = None) -> Selection:
        """The controls of `config` this server fills (`ProjectConfig.select`: its models and the prompts file's
        `controls:`); what it skips goes to the log once per project and config, and to /health."""
        e = self.engine
        selection = config.select(e.detector is not None, e.gives_masks, e.classifier is not None,
                                  e.prompts.controls)
        with self._lock:
            if project is not None:
                self.skipped[project] = [asdict(s) for s in selection.skipped]
            tell = bool(selection.skipped or selection.warnings) and (key := (project, repr(config))) not in self._noted
            if tell:
                self._noted.add(key)
        if tell:
            where = f"project {project}" if project is not None else "label config"
            for s in selection.skipped:
                log.warning("%s: control %r is not pre-annotated: %s", where, s.control, s.reason)
            for warning in selection.warnings:
                log.warning("%s: %s", where, warning)
        return selection

    def filled(self, config: ProjectConfig) -> ProjectConfig:
        """`config` with only the controls this server fills (itself when it fills them all)."""
        return self.select(config).config

    def ontology_for(self, config: ProjectConfig) -> Ontology:
        """The labels of the region controls this server fills."""
        return self.filled(config).ontology(self.engine.prompts, self.settings.max_detections)

    def classifications_for(self, config: ProjectConfig) -> dict[str, Classification]:
        """Per Choices control this server fills, what to classify into."""
        return self.filled(config).classifications(self.engine.prompts)

    def version_for(self, config: ProjectConfig, ontology: Ontology) -> str:
        """Model ids + digests of the prompts and templates of what is filled (never of text filled from task
        data): a skipped control leaves no trace, and a server that starts filling it has a new version. Video
        configs: also the tracker and its settings."""
        if config.videos:
            return self.engine.video_version(ontology)
        return self.engine.model_version(ontology, list(self.classifications_for(config).values()))

    # -- /predict -----------------------------------------------------------------------------------------------
    def prepare(self, req: PredictRequest) -> PreparedPredict:
        """Checks a /predict request and resolves its config; raises for request-level mistakes."""
        limit = self.settings.max_tasks_per_request
        if len(req.tasks) > limit:
            raise RequestError(f"{len(req.tasks)} tasks in one request, over the limit of {limit} (PRELABEL_MAX_TASKS_PER_REQUEST)")
        pid = project_id(req.project)
        xml = req.label_config or self.configs.get(pid)
        if not xml:
            raise RequestError("no label_config in the request, and no /setup has given one for this project")
        config = parse_config(xml)
        filled = self.select(config, pid).config
        ontology = self.ontology_for(filled)
        version = self.version_for(filled, ontology)
        context = req.params["context"] if is_interactive(req) else None
        if context is None:
            return PreparedPredict(req.tasks, filled, ontology, version, None, pid)
        if len(req.tasks) != 1:
            raise RequestError(f"interactive annotation takes exactly one task, got {len(req.tasks)}")
        # a click or a text prompt asks for itself: every region control of the config may take its answer
        return PreparedPredict(req.tasks, config, config.ontology(self.engine.prompts, self.settings.max_detections),
                               version, context, pid)

    def predict(self, req: PredictRequest) -> dict:
        p = self.prepare(req)
        if p.context is not None:
            return {"results": [self.interactive_task(p)]}
        return {"results": self.predict_tasks(p.tasks, p.config, p.ontology, p.version)}

    def interactive_task(self, p: PreparedPredict, image: MediaItem | None = None) -> dict:
        """The one interactive result; errors name the task, as batch errors do. No smart region left (the last
        one was deleted): an empty result, and the task's Exclude boxes are forgotten."""
        with self._named(p.tasks[0]):
            if not context_regions(p.context):
                tid, _ = self._task_fields(p.tasks[0])
                self.exemplars.forget_negatives(p.project, tid)
                return {"result": [], "score": 0.0, "model_version": p.version}
            return self.interactive(p.tasks[0], p.config, p.ontology, p.context, p.version, image, p.project)

    def interactive_image(self, p: PreparedPredict) -> MediaItem | None:
        """Fetches the interactive task's image (so that a model worker need not wait on the network); None when
        the context holds no region."""
        if not context_regions(p.context):
            return None
        with self._named(p.tasks[0]):
            tid, data, key = self._interactive_source(p.tasks[0], p.config, p.context)
            return self.loader.load(data[key], tid)

    @staticmethod
    @contextmanager
    def _named(task: Any):
        try:
            yield
        except PrelabelError as exc:
            tid = task.get("id") if isinstance(task, dict) else None
            raise type(exc)(task_error(tid, exc)["error"]["message"]) from None

    def predict_tasks(self, tasks: list, config: ProjectConfig, ontology: Ontology, version: str,
                      progress: Callable[[int], None] | None = None) -> list[dict]:
        """Images: fetched, then one batch; videos (`progress(frames)` as they are tracked): one task after another."""
        if config.videos:
            from .video import video_entries

            return video_entries(self, tasks, self.filled(config), ontology, version, progress)
        return self.infer(self.load_tasks(tasks, config), config, ontology, version)

    def load_tasks(self, tasks: list, config: ProjectConfig) -> LoadedTasks:
        """Check each task and fetch its images concurrently; a task that fails keeps its error in place."""
        entries: list[dict | None] = [None] * len(tasks)
        units: list[tuple[int, str]] = []  # (task index, data key): one image each
        refs: list[tuple[str, int | None]] = []
        keys = self.filled(config).data_keys
        for i, task in enumerate(tasks):
            try:
                tid, data = self._task_fields(task)
                for key in keys:
                    if key not in data:
                        raise RequestError(f"task data has no {key!r} field (the label config reads ${key})")
                    units.append((i, key))
                    refs.append((data[key], tid))
            except PrelabelError as exc:
                entries[i] = task_error(task.get("id") if isinstance(task, dict) else None, exc)
        loaded = self.loader.load_many(refs)
        for (i, _), img in zip(units, loaded):
            if not isinstance(img, MediaItem) and entries[i] is None:
                entries[i] = task_error(tasks[i].get("id"), img)
        images = [(i, key, img) for (i, key), img in zip(units, loaded) if entries[i] is None]
        return LoadedTasks(tasks, entries, images)

    def spec_for(self, config: ProjectConfig, ontology: Ontology, key: str) -> RequestSpec:
        """What the config asks of the image at task data `key`: its region controls' labels (and masks for brush
        and polygon controls), and its Choices, per region where `perRegion` says so; only controls this server
        fills."""
        config = self.filled(config)
        regions = [c for c in config.controls if c.data_key == key]
        classifications = self.classifications_for(config)
        classify = []
        for control in (c for c in config.choices if c.data_key == key):
            labels = None
            if control.per_region:
                labels = frozenset(label for c in regions for label in c.labels if control.applies_to(c, label))
            classify.append(ClassifyRequest(control.from_name, classifications[control.from_name], labels))
        return RequestSpec(ontology if regions else None, tuple(classify), config.needs_masks and bool(regions))

    def infer(
        self,
        batch: LoadedTasks,
        config: ProjectConfig,
        ontology: Ontology,
        version: str,
        on_image: Callable[[int, str, MediaItem, sv.Detections], None] | None = None,
        between: Callable[[], None] | None = None,
    ) -> list[dict]:
        """The engine over the loaded images (one call per image key of the config: one unless the config labels
        several images per task), then Label Studio results one image at a time. `on_image(task index, data key,
        image, detections)` sees each image's detections (masks included) before they are dropped; `between()` runs
        between images and before each image's masks (the server's batch thread yields to clicks there). Exactly
        one entry per task: a prediction or `{"task", "error"}`. Skipped controls get no results."""
        config = self.filled(config)
        tasks, entries = batch.tasks, list(batch.entries)
        self.metrics.batch(len(batch.images))
        by_key: dict[str, list[tuple[int, MediaItem]]] = {}
        for i, key, img in batch.images:
            if entries[i] is None:
                by_key.setdefault(key, []).append((i, replace(img, fields=tasks[i].get("data"))))
        choices = {c.from_name: c for c in config.choices}
        for key, images in by_key.items():
            controls = [c for c in config.controls if c.data_key == key]
            results = self.engine.iter_run([img for _, img in images], self.spec_for(config, ontology, key), between)
            for (i, img), result in zip(images, results):
                if between is not None:
                    between()
                if entries[i] is not None and "error" in entries[i]:
                    continue
                if result.error is not None:
                    entries[i] = task_error(tasks[i].get("id"), result.error)
                    continue
                if on_image is not None:
                    on_image(i, key, img, result.detections)
                scores = [(choices[c.request.name], c) for c in result.classes if c.probs.size]
                entry = entries[i] or {"result": [], "score": 1.0, "model_version": version}
                per_region = [(control, c) for control, c in scores if control.per_region]
                entry["result"] += detections_to_results(result.detections, controls, img.width, img.height, per_region)
                for control, c in scores:
                    if not control.per_region and (choice := choices_result(control, c, 0, img.width, img.height)):
                        entry["result"].append(choice)
                entry["score"] = min(entry["score"], result.score)
                entries[i] = entry
        failed = [e for e in entries if e and "error" in e]
        for e in failed:
            self.metrics.error(e["error"]["kind"])
            log.warning("%s", e["error"]["message"])
        self.metrics.count("tasks_predicted", len(tasks) - len(failed))
        return entries

    @staticmethod
    def _task_fields(task: Any) -> tuple[int | None, dict]:
        if not isinstance(task, dict):
            raise RequestError(f"a task must be a JSON object, got {type(task).__name__}")
        data = task.get("data")
        if not isinstance(data, dict):
            raise RequestError("task has no 'data' object")
        tid = task.get("id")
        if tid is not None and not isinstance(tid, int):
            raise RequestError(f"task id {tid!r} is not an integer")
        return tid, data

    # -- interactive --------------------------------------------------------------------------------------------
    def _interactive_source(self, task: Any, config: ProjectConfig, context: dict) -> tuple[int | None, dict, str]:
        """(task id, task data, data key of the image the context's regions point at)."""
        regions = context_regions(context)
        if not regions:
            raise RequestError("interactive context holds no regions")
        if not config.controls:
            raise ConfigError("interactive annotation needs a RectangleLabels, BrushLabels or PolygonLabels control")
        tid, data = self._task_fields(task)
        to_name = next((r["to_name"] for r in regions if r.get("to_name")), config.controls[0].to_name)
        key = next((c.data_key for c in config.controls if c.to_name == to_name), config.controls[0].data_key)
        if key not in data:
            raise RequestError(f"task data has no {key!r} field")
        return tid, data, key

    def interactive(
        self, task: Any, config: ProjectConfig, ontology: Ontology, context: dict, version: str,
        image: MediaItem | None = None, project: int | None = None,
    ) -> dict:
        """A TextArea prompt runs the detector; smart rectangles with SAM 3 as the detector find every object
        like them; clicks, and smart rectangles otherwise, give one mask."""
        regions = context_regions(context)
        tid, data, key = self._interactive_source(task, config, context)
        texts = [r for r in regions if r.get("type") == "textarea"]
        to_name = next((r["to_name"] for r in regions if r.get("to_name")), config.controls[0].to_name)
        image = image or self.loader.load(data[key], tid)
        if texts:
            return self._text_prompt(image, texts[0], config, ontology, key, version)
        if self.engine.finds_exemplars and all(r.get("type") == "rectanglelabels" for r in regions):
            return self._find_like(image, regions, config, ontology, to_name, version, (project, tid, to_name))
        return self._click(image, regions, config, to_name, version)

    def _find_like(self, image: MediaItem, regions: list[dict], config: ProjectConfig, ontology: Ontology,
                   to_name: str, version: str, key: tuple) -> dict:
        """Find all like this (SAM 3 exemplars): every object in the image like the smart rectangles of one label
        (Label Studio sends all of that label's) and unlike the Exclude boxes, as rectangles of the drawn boxes'
        control (less those that repeat a drawn box) and masks of the image's brush and polygon controls that have
        the label. Exclude boxes alone re-run the last query on the image with them as negatives; the Exclude boxes
        stay remembered for later queries on the image."""
        w, h = image.width, image.height
        positives, negatives, label = [], [], None
        control = self._rectangle_control(config, to_name, regions[0].get("from_name"))
        for r in regions:
            value = r.get("value") or {}
            try:
                box = percent_to_box(value, w, h)
            except (KeyError, TypeError, ValueError):
                raise RequestError(f"smart rectangle has no usable x/y/width/height: {value}") from None
            name = (value.get("rectanglelabels") or [None])[0]
            if is_exclude(name):
                negatives.append(box)
                continue
            if positives and name != label:
                raise RequestError(f"smart rectangles of several labels in one request ({label!r}, {name!r}): "
                                   f"each label is found on its own")
            positives.append(box)
            label = name
        remembered = self.exemplars.get(key)
        if positives:
            label = label or (control.labels[0] if len(control.labels) == 1 else None)
            if label not in control.labels:
                raise RequestError(f"label {label!r} is not a label of <RectangleLabels name={control.from_name!r}>: "
                                   f"{[n for n in control.labels if not is_exclude(n)]}")
            remembered = Exemplars(label, np.array(positives), remembered.negatives)
        elif remembered.label is None:
            raise RequestError(f"an {EXCLUDE} box marks what not to find among the objects like a box you drew: "
                               f"first draw a smart rectangle with an object's label on one object of this image")
        if negatives:
            remembered = replace(remembered, negatives=np.array(negatives))
        masks = [c for c in config.controls if c.type in MASK_TYPES and c.to_name == to_name and remembered.label in c.labels]
        boxes = np.concatenate([remembered.positives, remembered.negatives])
        box_labels = np.array([1] * len(remembered.positives) + [0] * len(remembered.negatives))
        try:
            found = self.engine.find_like(image.array, boxes, box_labels, remembered.label, ontology, masks=bool(masks))
        except RequestError as exc:
            raise RequestError(f"finding every {remembered.label!r} like the smart rectangles: {exc}") from None
        self.exemplars.put(key, remembered)
        new = np.ones(len(found), bool)  # found boxes that are not a drawn box again
        if len(found):
            new = sv.box_iou_batch(found.xyxy, remembered.positives).max(axis=1) < DUPLICATE_IOU
        result = detections_to_results(found[new], [control], w, h) + detections_to_results(found, masks, w, h)
        self.metrics.count("exemplar_queries")
        score = float(found.confidence.max()) if len(found) else 0.0
        return {"result": result, "score": round(score, 6), "model_version": version}

    @staticmethod
    def _rectangle_control(config: ProjectConfig, to_name: str, from_name: str | None) -> Control:
        """The RectangleLabels control the smart rectangles were drawn with (by name, else the image's first)."""
        boxes = [c for c in config.controls if c.type == "rectanglelabels" and c.to_name == to_name]
        if not boxes:
            raise ConfigError(f"smart rectangles need a RectangleLabels control on <Image name={to_name!r}>")
        return next((c for c in boxes if c.from_name == from_name), boxes[0])

    def _click(self, image: MediaItem, regions: list[dict], config: ProjectConfig, to_name: str, version: str) -> dict:
        control = config.mask_control(to_name)
        if control is None:
            raise ConfigError("smart keypoints and rectangles need a BrushLabels or PolygonLabels control for the mask")
        w, h = image.width, image.height
        points, labels, box, label = [], [], None, None
        for r in regions:
            value = r.get("value") or {}
            kind = r.get("type")
            try:
                if kind == "keypointlabels":
                    points.append(percent_to_point(value, w, h))
                    labels.append(1 if r.get("is_positive", True) else 0)
                    label = label or (value.get("keypointlabels") or [None])[0]
                elif kind == "rectanglelabels":
                    box = percent_to_box(value, w, h)
                    label = (value.get("rectanglelabels") or [label])[0]
            except (KeyError, TypeError, ValueError):
                raise RequestError(f"context region of type {kind!r} has no usable x/y/width/height: {value}") from None
        if not points and box is None:
            raise RequestError("context has no keypoint, rectangle or text region to prompt with")
        if is_exclude(label):
            raise ConfigError(f"{EXCLUDE} boxes mark what not to find when finding every object like a box, which "
                              f"needs SAM 3 as the detector (this server runs {self.engine.base_version})")
        label = label or (control.labels[0] if len(control.labels) == 1 else None)
        if label not in control.labels:
            raise RequestError(f"label {label!r} is not a label of <{control.type} name={control.from_name!r}>: {list(control.labels)}")
        mask, score = self.engine.segment(
            image.array,
            np.array(points) if points else None,
            np.array(labels) if labels else None,
            box,
        )
        xyxy = sv.mask_to_xyxy(mask[None]).astype(np.float32) if mask.any() else np.zeros((1, 4), np.float32)
        det = make_detections(xyxy, [score], [0], [label], mask=mask[None])
        self.metrics.count("interactive_masks")
        return {"result": detections_to_results(det, [control], w, h), "score": round(score, 6), "model_version": version}

    def _text_prompt(self, image: MediaItem, region: dict, config: ProjectConfig, ontology: Ontology, key: str, version: str) -> dict:
        text = " ".join(str(t) for t in (region.get("value") or {}).get("text", [])).strip()
        if not text:
            raise RequestError("the TextArea prompt is empty")
        spec = self._label_for_text(text, config, ontology)
        prompt = normalize_prompt(text.split(":", 1)[1] if ":" in text and self._names(config, text) else text)
        one = Ontology((LabelSpec(spec.name, (prompt,), spec.threshold),), ontology.text_threshold, ontology.nms_iou, ontology.max_detections)
        result = self.engine.run([replace(image, fields=None)], RequestSpec(one, masks=config.needs_masks))[0]
        if result.error is not None:
            raise result.error
        controls = [c for c in config.controls if c.data_key == key]
        self.metrics.count("text_prompts")
        return {"result": detections_to_results(result.detections, controls, image.width, image.height),
                "score": result.score, "model_version": version}

    @staticmethod
    def _names(config: ProjectConfig, text: str) -> str | None:
        head = text.split(":", 1)[0].strip().casefold()
        return next((n for n in config.labels if n.casefold() == head), None)

    def _label_for_text(self, text: str, config: ProjectConfig, ontology: Ontology) -> LabelSpec:
        """'Label: prompt' names the label; otherwise a label whose name or synonym is the text; otherwise the
        only label there is."""
        by_name = {s.name: s for s in ontology.labels}
        named = self._names(config, text) if ":" in text else None
        if named:
            return by_name[named]
        wanted = normalize_prompt(text)
        for spec in ontology.labels:
            if wanted == normalize_prompt(spec.name) or wanted in spec.prompts:
                return spec
        if len(ontology.labels) == 1:
            return ontology.labels[0]
        raise RequestError(
            f"text prompt {text!r} names none of the labels {config.labels}; write it as 'Label: what to look for'"
        )

    # -- /webhook -----------------------------------------------------------------------------------------------
    def webhook(self, body: WebhookRequest) -> tuple[int, dict]:
        action = body.action
        if action not in TRAIN_EVENTS:
            return 200, {"status": "Unknown event", "action": action}
        payload = body.model_dump()
        pid = project_id(body.project)
        if pid is None:
            raise RequestError(f"{action} webhook has no project id")
        ids = []
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"):
            annotation, task = payload.get("annotation"), payload.get("task")
            if not isinstance(annotation, dict) or not isinstance(annotation.get("id"), int):
                raise RequestError(f"{action} webhook has no annotation with an integer id")
            task_id = task.get("id") if isinstance(task, dict) else annotation.get("task")
            ids.append(self.store.record(action, pid, task_id, annotation["id"], payload))
        elif action == "ANNOTATIONS_DELETED":
            annotations = payload.get("annotations")
            if not isinstance(annotations, list) or not all(isinstance(a, dict) and "id" in a for a in annotations):
                raise RequestError("ANNOTATIONS_DELETED webhook needs a list of annotations with ids")
            ids += [self.store.record(action, pid, a.get("task"), a["id"], payload) for a in annotations]
        else:
            ids.append(self.store.record(action, pid, None, None, payload))
        self.metrics.count(f"webhook_{action.lower()}")
        return 201, {"status": "recorded", "action": action, "project": pid, "event_ids": ids}
