"""A project's tasks hardest first: by the uncertainty of their predictions (`active.py`), with the project's model
version selected, so that the Data Manager sorts by the prediction score too."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..active import uncertainty_from_scores
from .annotate import PAGE_SIZE, ProjectError, open_project, select_model_version
from .records import plain, task_link


@dataclass
class Ranked:
    task: int
    prediction: int
    uncertainty: float
    boxes: int
    url: str


def rank_project(client, project_id: int, base_url: str, model_version: str | None = None,
                 thresholds: dict[str, float] | None = None, default_threshold: float = 0.35) -> tuple[str, list[Ranked]]:
    """Order a project's tasks hardest-first by the uncertainty of their predictions of `model_version` (default:
    the project's, else the newest present). A prediction's `score` is `1 - uncertainty` when prelabel made it;
    predictions without a score get one from their regions' confidences (see `active.py`), written back. The project's
    model version is set, so that the Data Manager's "prediction score" column sorts by it."""
    project = open_project(client, project_id)
    newest: dict[int, dict[str, dict]] = {}  # task -> model version -> its newest prediction
    for task in client.tasks.list(project=project_id, fields="all", include="id,predictions", page_size=PAGE_SIZE):
        for p in task.predictions or []:
            p = plain(p)
            by_version = newest.setdefault(task.id, {})
            v = p.get("model_version") or ""
            if v not in by_version or p["id"] > by_version[v]["id"]:
                by_version[v] = p
    versions = {v: p["id"] for by_version in newest.values() for v, p in by_version.items()}
    if not versions:
        raise ProjectError(f"project {project_id} has no predictions to rank: run prelabel annotate first")
    version = model_version or (project.model_version if project.model_version in versions else None)
    version = version or max(versions, key=versions.get)
    if version not in versions:
        raise ProjectError(f"project {project_id} has no predictions of model version {version!r}; it has {sorted(versions)}")
    thresholds = thresholds or {}
    ranked = []
    for task_id, by_version in newest.items():
        p = by_version.get(version)
        if p is None:
            continue
        result = p.get("result") or []
        boxes = [r for r in result if r.get("type") == "rectanglelabels"]
        if p.get("score") is None:  # made elsewhere: the confidence margin of its regions to their thresholds
            scored = [r for r in (boxes or result) if isinstance(r.get("score"), (int, float))]
            labels = [next((v[0] for k, v in r["value"].items() if k.endswith("labels") and v), None) for r in scored]
            uncertainty = uncertainty_from_scores(
                np.array([r["score"] for r in scored], float),
                np.array([thresholds.get(label, default_threshold) for label in labels], float),
            )
            client.predictions.update(id=p["id"], score=round(1 - uncertainty, 6))
        else:
            uncertainty = 1 - float(p["score"])
        ranked.append(Ranked(task_id, p["id"], round(uncertainty, 6), len(boxes),
                             task_link(base_url, project_id, task_id)))
    if project.model_version != version:
        select_model_version(client, project_id, version)
    ranked.sort(key=lambda r: (-r.uncertainty, r.task))
    return version, ranked


def print_ranking(project_id: int, version: str, ranked: list[Ranked], top: int, console=None) -> None:
    """The `top` hardest tasks as a table, with links."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"project {project_id}: {len(ranked)} tasks, hardest first ({version})")
    for column in ("#", "task", "uncertainty", "boxes", "open"):
        table.add_column(column)
    for i, r in enumerate(ranked[:top], 1):
        table.add_row(str(i), str(r.task), f"{r.uncertainty:.3f}", str(r.boxes), r.url)
    (console or Console(width=200)).print(table)


def write_ranking(path: Path, version: str, ranked: list[Ranked]) -> None:
    path.write_text(json.dumps({"model_version": version, "tasks": [asdict(r) for r in ranked]}, indent=2))
