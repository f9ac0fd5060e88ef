"""A Label Studio project as neutral records (`LabeledImage`): per task the latest prediction of the project's model
version and the latest non-cancelled annotation, rectangles, brush masks and polygons in pixels."""

from __future__ import annotations

import logging
from typing import Any

import supervision as sv

from ..errors import ConfigError
from ..types import LabeledImage, mask_box
from .annotate import ProjectError, open_project
from .config import parse_config
from .convert import percent_to_box, polygon_to_mask, rle_to_mask

log = logging.getLogger(__name__)

PAGE_SIZE = 200


def task_link(url: str, project_id: int, task_id: int) -> str:
    """The labeling page of a task (`/tasks/{id}` is 404 in Label Studio)."""
    return f"{url.rstrip('/')}/projects/{project_id}/data?task={task_id}"


def plain(obj: Any) -> Any:
    """SDK objects (pydantic) or dicts, as dicts."""
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


def result_objects(results: list[dict], where: str,
                   score: float | None = None) -> tuple[list[dict], int | None, int | None]:
    """Regions of one annotation or prediction as reader objects, plus the image size the regions carry.
    Other result types (keypoints, text) are skipped; an empty mask or polygon is an error naming `where`."""
    objects, width, height = [], None, None
    for r in results:
        kind, value = r.get("type"), r.get("value") or {}
        if kind not in ("rectanglelabels", "brushlabels", "polygonlabels"):
            continue
        labels = value.get(kind) or []
        if not labels:
            raise ConfigError(f"{where}: region {r.get('id')} ({kind}) has no label")
        try:
            width, height = int(r["original_width"]), int(r["original_height"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: region {r.get('id')} has no original_width/original_height") from None
        region_score = r.get("score", score)
        if kind == "rectanglelabels":
            obj = {"box": percent_to_box(value, width, height)}
        else:
            if kind == "brushlabels":
                if value.get("format") != "rle" or not value.get("rle"):
                    raise ConfigError(f"{where}: brush region {r.get('id')} is not RLE encoded")
                mask = rle_to_mask(value["rle"], width, height)
            else:
                mask = polygon_to_mask(value.get("points") or [], width, height)
            if not mask.any():
                raise ConfigError(f"{where}: {kind} region {r.get('id')} (label {labels[0]!r}) covers no pixel")
            obj = {"box": mask_box(mask), "mask": mask}
        objects.extend(obj | {"label": label, "score": region_score} for label in labels)
    return objects, width, height


def _latest(items: list[dict], keep) -> dict | None:
    """The most recently updated of `items` that `keep` accepts."""
    items = [i for i in items if keep(i)]
    if not items:
        return None
    return max(items, key=lambda i: (str(i.get("updated_at") or i.get("created_at") or ""), i.get("id") or 0))


def project_records(client, project_id: int, url: str, model_version: str | None = None) -> list[LabeledImage]:
    """Every task of a project as a `LabeledImage` keyed by task id. Predictions: the latest of `model_version`
    (default: the project's model version; when the project has none, the latest prediction of any version)."""
    project = open_project(client, project_id)
    config = parse_config(project.label_config)
    labels = list(config.labels)
    data_key = config.controls[0].data_key
    version = model_version or project.model_version or None
    records = []
    for task in client.tasks.list(project=project_id, fields="all", page_size=PAGE_SIZE):
        task = plain(task)
        tid, where = task["id"], f"project {project_id} task {task['id']}"
        image = (task.get("data") or {}).get(data_key)
        if not image:
            raise ProjectError(f"{where} has no image under data.{data_key}")
        prediction = _latest([plain(p) for p in task.get("predictions") or []],
                             lambda p: version is None or p.get("model_version") == version)
        annotation = _latest([plain(a) for a in task.get("annotations") or []],
                             lambda a: not a.get("was_cancelled"))
        pred_objects, pw, ph = result_objects(prediction["result"], f"{where} prediction {prediction.get('id')}",
                                              prediction.get("score")) if prediction else ([], None, None)
        ann_objects, aw, ah = result_objects(annotation["result"], f"{where} annotation {annotation.get('id')}") \
            if annotation else ([], None, None)
        width, height = aw or pw, ah or ph
        record = LabeledImage(
            key=str(tid), image=image, width=width, height=height,
            predictions=LabeledImage.detections(pred_objects, labels, width, height) if pred_objects else None,
            annotations=LabeledImage.detections(ann_objects, labels, width, height) if ann_objects else None,
            link=task_link(url, project_id, tid),
            model_version=prediction.get("model_version") if prediction else None,
            extra={"task_id": tid, "annotated": annotation is not None},
        )
        # a prediction or annotation saying "nothing here" is an empty one, not a missing one
        if prediction is not None and not pred_objects:
            record.predictions = sv.Detections.empty()
        if annotation is not None and not ann_objects:
            record.annotations = sv.Detections.empty()
        records.append(record)
    log.info("project %s: %d tasks exported (model version %s)", project_id, len(records), version or "any")
    return records
