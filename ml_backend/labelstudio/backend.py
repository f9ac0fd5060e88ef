"""The Label Studio ML-backend protocol, independent of the web framework: setup, predict (batch and
interactive), webhook, versions."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import supervision as sv
from pydantic import BaseModel, ConfigDict, Field

from ..active import task_score
from ..errors import ConfigError, PrelabelError, RequestError
from ..images import ImageLoader, LoadedImage
from ..metrics import Metrics
from ..ontology import Classification, LabelSpec, Ontology, normalize_prompt
from ..pipeline import Pipeline
from ..types import make_detections
from .config import ProjectConfig, parse_config
from .convert import (
    ChoiceScores,
    choices_result,
    choices_score,
    detections_to_results,
    percent_to_box,
    percent_to_point,
)
from .store import EventStore

log = logging.getLogger(__name__)

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
    """Smart tools send their regions as `params.context.result`; batch predictions send none."""
    context = (req.params or {}).get("context")
    return isinstance(context, dict) and bool(context.get("result"))


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


@dataclass
class LoadedTasks:
    """Tasks with their images fetched: `entries[i]` holds task i's error if it already failed."""

    tasks: list
    entries: list[dict | None]
    images: list[tuple[int, str, LoadedImage]]  # (task index, data key, image)


class LabelStudioBackend:
    def __init__(self, pipeline: Pipeline, loader: ImageLoader, store: EventStore | None, metrics: Metrics):
        self.pipeline = pipeline
        self.loader = loader
        self.store = store
        self.metrics = metrics
        self.settings = pipeline.settings
        self.configs: dict[int | None, str] = {}
        self.versions: dict[int | None, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_batch(cls, pipeline: Pipeline) -> LabelStudioBackend:
        """For batch runs outside the server (`prelabel annotate`, Ray actors): no webhook store."""
        return cls(pipeline, ImageLoader(pipeline.settings), None, Metrics())

    # -- /setup, /versions --------------------------------------------------------------------------------------
    def setup(self, req: SetupRequest) -> dict:
        pid = project_id(req.project)
        if req.hostname and not self.loader.label_studio_url:
            self.loader.configure_label_studio(req.hostname, req.access_token)
            log.info("images relative to Label Studio resolve against %s (from /setup)", req.hostname)
        version = self.pipeline.model_version(self.pipeline.ontology())
        if req.label_config:
            config = parse_config(req.label_config)
            version = self.version_for(config, self.ontology_for(config))
            with self._lock:
                self.configs[pid] = req.label_config
        with self._lock:
            self.versions[pid] = version
        return {"model_version": version}

    def known_versions(self) -> dict:
        with self._lock:
            versions = set(self.versions.values())
        return {"versions": sorted(versions) or [self.pipeline.model_version(self.pipeline.ontology())]}

    def ontology_for(self, config: ProjectConfig) -> Ontology:
        return config.ontology(self.pipeline.prompts, self.settings.max_detections)

    def classifications_for(self, config: ProjectConfig) -> dict[str, Classification]:
        """Per Choices control, what to classify into; a ConfigError when Choices meet a server without classifier."""
        if not config.choices:
            return {}
        self.pipeline.require_classifier(f"the label config's <Choices name={config.choices[0].from_name!r}>")
        return config.classifications(self.pipeline.prompts)

    def version_for(self, config: ProjectConfig, ontology: Ontology) -> str:
        """Model ids + digests of the prompts and templates (never of text filled from task data)."""
        return self.pipeline.model_version(ontology, list(self.classifications_for(config).values()))

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
        ontology = self.ontology_for(config)
        version = self.version_for(config, ontology)
        context = req.params["context"] if is_interactive(req) else None
        if context is not None and len(req.tasks) != 1:
            raise RequestError(f"interactive annotation takes exactly one task, got {len(req.tasks)}")
        return PreparedPredict(req.tasks, config, ontology, version, context)

    def predict(self, req: PredictRequest) -> dict:
        p = self.prepare(req)
        if p.context is not None:
            return {"results": [self.interactive_task(p)]}
        return {"results": self.predict_tasks(p.tasks, p.config, p.ontology, p.version)}

    def interactive_task(self, p: PreparedPredict, image: LoadedImage | None = None) -> dict:
        """The one interactive result; errors name the task, as batch errors do."""
        with self._named(p.tasks[0]):
            return self.interactive(p.tasks[0], p.config, p.ontology, p.context, p.version, image)

    def interactive_image(self, p: PreparedPredict) -> LoadedImage:
        """Fetches the interactive task's image (so that a model worker need not wait on the network)."""
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

    def predict_tasks(self, tasks: list, config: ProjectConfig, ontology: Ontology, version: str) -> list[dict]:
        return self.infer(self.load_tasks(tasks, config), config, ontology, version)

    def load_tasks(self, tasks: list, config: ProjectConfig) -> LoadedTasks:
        """Check each task and fetch its images concurrently; a task that fails keeps its error in place."""
        entries: list[dict | None] = [None] * len(tasks)
        units: list[tuple[int, str]] = []  # (task index, data key): one image each
        refs: list[tuple[str, int | None]] = []
        keys = config.data_keys
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
            if not isinstance(img, LoadedImage) and entries[i] is None:
                entries[i] = task_error(tasks[i].get("id"), img)
        images = [(i, key, img) for (i, key), img in zip(units, loaded) if entries[i] is None]
        return LoadedTasks(tasks, entries, images)

    def infer(
        self,
        batch: LoadedTasks,
        config: ProjectConfig,
        ontology: Ontology,
        version: str,
        on_image: Callable[[int, str, LoadedImage, sv.Detections], None] | None = None,
    ) -> list[dict]:
        """Batched detector passes over the loaded images (one per distinct set of prompts: one unless prompts name
        task data fields), then one classifier batch for every whole image and region crop that Choices ask for,
        then masks and Label Studio results one image at a time. `on_image(task index, data key, image, detections)`
        sees each image's detections (masks included) before they are dropped. Exactly one entry per task: a
        prediction or `{"task", "error"}`."""
        tasks, entries = batch.tasks, list(batch.entries)
        self.metrics.batch(len(batch.images))
        classifications = self.classifications_for(config)
        ontologies, filled = self._fill(batch, entries, ontology, classifications)
        images = [(i, key, img) for i, key, img in batch.images if entries[i] is None]
        detections = self._detect(images, config, ontologies)
        choice_scores = self._classify(images, config, detections, filled)
        region_keys = config.region_keys
        for n, ((i, key, img), det) in enumerate(zip(images, detections)):
            if config.needs_masks and key in region_keys:  # one image's full-size masks at a time, converted and dropped
                self.pipeline.add_masks(img.array, det)
            if on_image is not None:
                on_image(i, key, img, det)
            controls = [c for c in config.controls if c.data_key == key]
            entry = entries[i] or {"result": [], "score": 1.0, "model_version": version}
            scores = choice_scores.get(n, [])
            per_region = [s for s in scores if s.control.per_region]
            entry["result"] += detections_to_results(det, controls, img.width, img.height, per_region)
            for s in scores:
                if not s.control.per_region and (result := choices_result(s, 0, img.width, img.height)):
                    entry["result"].append(result)
                entry["score"] = min(entry["score"], choices_score(s))
            if key in region_keys and ontology.labels:
                entry["score"] = min(entry["score"], task_score(det, ontologies[i]))
            entries[i] = entry
        failed = [e for e in entries if e and "error" in e]
        for e in failed:
            self.metrics.error(e["error"]["kind"])
            log.warning("%s", e["error"]["message"])
        self.metrics.count("tasks_predicted", len(tasks) - len(failed))
        return entries

    @staticmethod
    def _fill(
        batch: LoadedTasks, entries: list, ontology: Ontology, classifications: dict[str, Classification]
    ) -> tuple[dict[int, Ontology], dict[int, dict[str, Classification]]]:
        """Per task, the ontology and classifications with `{field}`s filled from its data; a task whose data
        lacks a field gets its error entry (naming the task and the field) and the others go on."""
        ontologies, filled = {}, {}
        for i in dict.fromkeys(i for i, _, _ in batch.images):
            task = batch.tasks[i]
            data = task.get("data") if isinstance(task, dict) else None
            try:
                ontologies[i] = ontology.fill(data)
                filled[i] = {name: c.fill(data) for name, c in classifications.items()}
            except PrelabelError as exc:
                entries[i] = task_error(task.get("id") if isinstance(task, dict) else None, exc)
        return ontologies, filled

    def _detect(self, images: list, config: ProjectConfig, ontologies: dict[int, Ontology]) -> list[sv.Detections]:
        """Detections per image; images no region control labels (Choices only) never reach the detector."""
        out = [sv.Detections.empty() for _ in images]
        region_keys = config.region_keys
        groups: dict[Ontology, list[int]] = {}
        for n, (i, key, _) in enumerate(images):
            if key in region_keys and ontologies[i].labels:
                groups.setdefault(ontologies[i], []).append(n)
        for onto, members in groups.items():
            for n, det in zip(members, self.pipeline.detect([images[n][2].array for n in members], onto)):
                out[n] = det
        return out

    def _classify(
        self, images: list, config: ProjectConfig, detections: list[sv.Detections], filled: dict
    ) -> dict[int, list[ChoiceScores]]:
        """Every whole image and region crop the Choices controls ask for, embedded in one classifier batch, then
        scored against each task's (cached) choice embeddings. Keys: positions in `images`."""
        if not config.choices:
            return {}
        parts: dict[tuple, tuple[int, int]] = {}  # (image position, rows or None) -> (start, count) in the batch
        crops: list[tuple[int, list[int] | None]] = []
        wanted = []  # (image position, control, rows or None)
        for n, (_, key, _) in enumerate(images):
            det = detections[n]
            names = [str(x) for x in det.data.get("class_name", [])]
            for control in (c for c in config.choices if c.data_key == key):
                rows = None
                if control.per_region:
                    regions = [c for c in config.controls if c.data_key == key]
                    rows = [r for r, label in enumerate(names)
                            if any(label in c.labels and control.applies_to(c, label) for c in regions)]
                    if not rows:
                        continue
                part = (n, None if rows is None else tuple(rows))
                if part not in parts:
                    start = sum(count for _, count in parts.values())
                    parts[part] = (start, 1 if rows is None else len(rows))
                    crops.append((n, rows))
                wanted.append((n, control, rows))
        if not wanted:
            return {}
        arrays = [images[n][2].array for n, _ in crops]
        boxes = [None if rows is None else detections[n].xyxy[rows] for n, rows in crops]
        embeddings = self.pipeline.embed_crops(arrays, boxes)
        self.metrics.count("classified_crops", len(embeddings))
        classifier = self.pipeline.require_classifier()
        out: dict[int, list[ChoiceScores]] = {}
        for n, control, rows in wanted:
            start, count = parts[(n, None if rows is None else tuple(rows))]
            classification = filled[images[n][0]][control.from_name]
            probs = classifier.probabilities(embeddings[start : start + count], classification)
            chosen = classifier.decide(probs, classification)
            if rows is not None:  # rows of the result are the image's detections
                full = np.zeros((len(detections[n]), len(classification.choices)), np.float32)
                picks: list[list[int]] = [[] for _ in range(len(detections[n]))]
                full[rows] = probs
                for k, r in enumerate(rows):
                    picks[r] = chosen[k]
                probs, chosen = full, picks
            out.setdefault(n, []).append(ChoiceScores(control, classification, probs, chosen))
        return out

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
        regions = [r for r in context.get("result", []) if isinstance(r, dict)]
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
        self, task: Any, config: ProjectConfig, ontology: Ontology, context: dict, version: str, image: LoadedImage | None = None
    ) -> dict:
        regions = [r for r in context.get("result", []) if isinstance(r, dict)]
        tid, data, key = self._interactive_source(task, config, context)
        texts = [r for r in regions if r.get("type") == "textarea"]
        to_name = next((r["to_name"] for r in regions if r.get("to_name")), config.controls[0].to_name)
        image = image or self.loader.load(data[key], tid)
        if texts:
            return self._text_prompt(image, texts[0], config, ontology, key, version)
        return self._click(image, regions, config, to_name, version)

    def _click(self, image: LoadedImage, regions: list[dict], config: ProjectConfig, to_name: str, version: str) -> dict:
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
        label = label or (control.labels[0] if len(control.labels) == 1 else None)
        if label not in control.labels:
            raise RequestError(f"label {label!r} is not a label of <{control.type} name={control.from_name!r}>: {list(control.labels)}")
        mask, score = self.pipeline.segment_interactive(
            image.array,
            np.array(points) if points else None,
            np.array(labels) if labels else None,
            box,
        )
        xyxy = sv.mask_to_xyxy(mask[None]).astype(np.float32) if mask.any() else np.zeros((1, 4), np.float32)
        det = make_detections(xyxy, [score], [0], [label], mask=mask[None])
        self.metrics.count("interactive_masks")
        return {"result": detections_to_results(det, [control], w, h), "score": round(score, 6), "model_version": version}

    def _text_prompt(self, image: LoadedImage, region: dict, config: ProjectConfig, ontology: Ontology, key: str, version: str) -> dict:
        text = " ".join(str(t) for t in (region.get("value") or {}).get("text", [])).strip()
        if not text:
            raise RequestError("the TextArea prompt is empty")
        spec = self._label_for_text(text, config, ontology)
        prompt = normalize_prompt(text.split(":", 1)[1] if ":" in text and self._names(config, text) else text)
        one = Ontology((LabelSpec(spec.name, (prompt,), spec.threshold),), ontology.text_threshold, ontology.nms_iou, ontology.max_detections)
        det = self.pipeline.detect([image.array], one, masks=config.needs_masks)[0]
        controls = [c for c in config.controls if c.data_key == key]
        self.metrics.count("text_prompts")
        return {"result": detections_to_results(det, controls, image.width, image.height), "score": task_score(det, one), "model_version": version}

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
