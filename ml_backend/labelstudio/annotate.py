"""Whole-project pre-annotation against Label Studio's API, and folder mode (Label Studio import JSON +
COCO for images not yet in any tool).

Resumable by construction: the source of truth is Label Studio itself. Tasks already holding a prediction of the
current model version are skipped, and predictions are pushed in bulk after each batch, so a run stopped anywhere
is finished by running the same command again, with no duplicate and no gap. Folder mode keeps the same promise with
a JSON-lines journal in the output folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import quote

from .. import coco
from ..errors import ConfigError, PrelabelError
from ..media import MediaItem
from ..runner import Report, chunks, listed_after_the_run, run_batches
from ..settings import Settings
from .config import parse_config
from .stack import engine_label_config

RUN_LOGGERS = ("ml_backend.engine", "ml_backend.labelstudio.backend")  # what names a failed image as it happens

if TYPE_CHECKING:  # the engine (torch, the models) is imported where a run needs it: rank, effort and records don't
    from .backend import LabelStudioBackend

log = logging.getLogger(__name__)

TASK_FIELDS = "id,data,predictions_model_versions,total_annotations"
ERROR_KEY = "prelabel_error"  # task data key: why the last run could not pre-annotate the task
FAILED_TAB = "prelabel: failed"
FAILED_FILTER = {"conjunction": "and", "items": [
    {"filter": f"filter:tasks:data.{ERROR_KEY}", "operator": "empty", "type": "String", "value": False}]}
PAGE_SIZE = 500
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ProjectError(PrelabelError):
    kind = "project"


def label_studio_client(settings: Settings):
    """A Label Studio client from the settings' address and API key (flags or environment)."""
    from label_studio_sdk.client import LabelStudio

    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ConfigError("give Label Studio's address and an API key: --url/--api-key or "
                          "LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY")
    return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key.get_secret_value())


def open_project(client, project_id: int):
    from label_studio_sdk.core.api_error import ApiError

    from .access import refused_message

    try:
        return client.projects.get(id=project_id)
    except ApiError as exc:
        if exc.status_code == 404:
            raise ProjectError(f"Label Studio has no project {project_id} (or this API key cannot see it)") from None
        if refused := refused_message(exc.status_code, exc.body, None):
            raise ProjectError(refused) from None
        raise


def pending_tasks(client, project_id: int, version: str, only_unlabeled: bool, limit: int | None,
                  settled: list[dict] | None = None, after_id: int | None = None,
                  seen: list[int] | None = None) -> tuple[list[dict], dict]:
    """Tasks (id, data) without a prediction of `version` (and, with `only_unlabeled`, without annotations), with
    ids above `after_id` when given. `settled` collects the tasks that have one but still carry an error of an earlier
    run; `seen` every id listed."""
    todo, skipped = [], {"already predicted": 0, "labeled": 0}
    query = None
    if after_id is not None:
        newer = {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after_id}
        query = json.dumps({"filters": {"conjunction": "and", "items": [newer]}})
    for task in client.tasks.list(project=project_id, fields="all", include=TASK_FIELDS, page_size=PAGE_SIZE,
                                  query=query):
        if seen is not None:
            seen.append(task.id)
        if version in (task.predictions_model_versions or "").split(","):
            skipped["already predicted"] += 1
            if settled is not None and (task.data or {}).get(ERROR_KEY):
                settled.append({"id": task.id, "data": task.data})
        elif only_unlabeled and task.total_annotations:
            skipped["labeled"] += 1
        elif limit is not None and len(todo) >= limit:  # --limit 0 does nothing
            break
        else:
            todo.append({"id": task.id, "data": task.data})
    return todo, skipped


def select_model_version(client, project_id: int, version: str) -> bool:
    """Make `version` the project's model version: the Data Manager shows, and sorts by the score of, that
    version's predictions. Label Studio accepts it only once predictions of it exist."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        client.projects.update(id=project_id, model_version=version)
        return True
    except ApiError as exc:
        log.warning("could not select model version %s in project %s: %s", version, project_id, exc.body)
        return False


def prediction_rows(tasks: list[dict], entries: list[dict], version: str) -> list[dict]:
    """What Label Studio's bulk prediction import takes, for the tasks that did not fail."""
    return [{"task": task["id"], "result": entry["result"], "score": entry["score"], "model_version": version}
            for task, entry in zip(tasks, entries) if "error" not in entry]


def push_predictions(client, project_id: int, tasks: list[dict], entries: list[dict], version: str) -> None:
    """One bulk request per batch; failed tasks push nothing (the next run retries them)."""
    predictions = prediction_rows(tasks, entries, version)
    if predictions:
        client.projects.import_predictions(id=project_id, request=predictions)


def record_errors(client, project_id: int, tasks: list[dict], entries: list[dict]) -> None:
    """Each failed task's cause in its data under ERROR_KEY (a Data Manager column); a task that succeeded loses an
    earlier run's. The data is read back unresolved (as imported, not as presigned URLs) and written whole; read
    from the task list, as reading one task asks a connected ML backend for its predictions."""
    changes = {}
    for task, entry in zip(tasks, entries):
        error = entry["error"]["message"].removeprefix(f"task {task['id']}: ") if "error" in entry else None
        if error != (task.get("data") or {}).get(ERROR_KEY):
            changes[task["id"]] = error
    if not changes:
        return
    ids = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": t} for t in changes]
    query = json.dumps({"filters": {"conjunction": "or", "items": ids}})
    for task in client.tasks.list(project=project_id, query=query, resolve_uri=False, fields="all", include="id,data"):
        error = changes[task.id]
        data = {k: v for k, v in (task.data or {}).items() if k != ERROR_KEY} | ({ERROR_KEY: error} if error else {})
        client.tasks.update(id=task.id, data=data)


def refresh_failed_tab(client, project_id: int, url: str | None) -> str | None:
    """The Data Manager tab FAILED_TAB of the tasks that carry an error, with its column; removed once none does.
    Returns its link (or its id, without Label Studio's address)."""
    from .views import find_tab, save_tab, tab_link  # views -> records -> this module

    tab = find_tab(client, project_id, FAILED_TAB)
    failed = next(iter(client.tasks.list(project=project_id, query=json.dumps({"filters": FAILED_FILTER}),
                                         fields="all", include="id", page_size=1)), None)
    if failed is None:
        if tab is not None:
            client.views.delete(id=tab)
        return None
    tab = save_tab(client, project_id, FAILED_TAB, FAILED_FILTER, tab)
    return tab_link(url, project_id, tab) if url else f"tab {tab} of project {project_id}"


class TaskPredictor:
    """Label Studio tasks of one label config through the engine, where the engine runs elsewhere (a Ray actor):
    `functools.partial(TaskPredictor, settings)` is what `engines.ray_engine` builds in each actor."""

    def __init__(self, settings: Settings, config_xml: str):
        from ..engine import Engine
        from .backend import LabelStudioBackend

        self.backend = LabelStudioBackend.for_batch(Engine.from_settings(settings))
        self.config = parse_config(config_xml)
        self.ontology = self.backend.ontology_for(self.config)
        self.version = self.backend.version_for(self.config, self.ontology)

    def __call__(self, tasks: list[dict]) -> list[dict]:
        return self.backend.predict_tasks(tasks, self.config, self.ontology, self.version)


def annotate_project(
    client,
    project_id: int,
    backend: LabelStudioBackend,
    batch_size: int = 4,
    only_unlabeled: bool = False,
    limit: int | None = None,
    engine: Callable | None = None,
    after_id: int | None = None,
) -> Report:
    """Pre-annotate every pending task of a project. `engine(todo, config_xml, sink, report)` runs the batches
    elsewhere (Ray actors, each with a `TaskPredictor` of the config); by default they run here, images of the next
    batches fetched while the model runs."""
    project = open_project(client, project_id)
    config = parse_config(project.label_config)
    ontology = backend.ontology_for(config)
    version = backend.version_for(config, ontology)
    settled: list[dict] = []
    seen: list[int] = []
    todo, skipped = pending_tasks(client, project_id, version, only_unlabeled, limit, settled, after_id, seen)
    record_errors(client, project_id, settled, [{} for _ in settled])
    report = Report(total=len(todo), skipped=skipped, model_version=version)
    report.last_task_id = max(seen, default=after_id or 0)
    if after_id is not None and not todo:  # following: nothing new since the last look
        return report
    log.info("project %s: %d tasks to pre-annotate with %s (%s)", project_id, len(todo), version,
             ", ".join(f"{n} {why}" for why, n in skipped.items()))
    selected = project.model_version == version
    if skipped["already predicted"] and not selected:
        selected = select_model_version(client, project_id, version)

    def sink(tasks: list[dict], entries: list[dict]) -> None:
        nonlocal selected
        push_predictions(client, project_id, tasks, entries, version)
        record_errors(client, project_id, tasks, entries)
        if not selected and any("error" not in e for e in entries):
            selected = select_model_version(client, project_id, version)

    with listed_after_the_run(*RUN_LOGGERS):
        if config.videos:
            from .video import annotate_videos

            if engine is not None:
                log.warning("video projects run here, one video at a time (--engine ray splits image batches)")
            annotate_videos(backend, todo, backend.filled(config), ontology, version, sink, report)
        elif engine is not None:
            engine(todo, project.label_config, sink, report)
        else:
            run_batches(chunks(todo, batch_size), load=lambda tasks: backend.load_tasks(tasks, config),
                        infer=lambda loaded: backend.infer(loaded, config, ontology, version), sink=sink, report=report)
    if tab := refresh_failed_tab(client, project_id, backend.settings.label_studio_url):
        report.outputs["failed tasks"] = tab
    return report


# -- folder mode -------------------------------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def local_files_ref(path: Path, document_root: Path) -> str:
    """How Label Studio's local-files storage addresses a file below its document root."""
    return "/data/local-files/?d=" + quote(path.relative_to(document_root).as_posix())


@dataclass
class FolderOutput:
    tasks: Path  # Label Studio import JSON: tasks with predictions
    coco: Path
    label_config: Path
    journal: Path  # one line per finished image: what a rerun skips


def folder_output(out_dir: Path) -> FolderOutput:
    return FolderOutput(out_dir / "tasks.json", out_dir / "coco.json", out_dir / "label_config.xml",
                        out_dir / "predictions.jsonl")


def _read_journal(path: Path, version: str) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a crash: that image is simply done again
                continue
            if record.get("model_version") == version:
                done[record["file"]] = record
    return done


def by_file(entry: dict, task: dict, name: str) -> dict:
    """A folder-mode failure named by its file `name` (as the user knows it), not by task id and local-files URL."""
    message = entry["error"]["message"].removeprefix(f"task {task['id']}: ").replace(task["data"]["image"], name)
    return {"task": name, "error": entry["error"] | {"message": message if name in message else f"{name}: {message}"}}


def start_folder_run(folder: Path, out_dir: Path, backend: LabelStudioBackend):
    """Folder mode's checks and outputs' start: (folder, LOCAL_FILES_DOCUMENT_ROOT, outputs, config, ontology,
    model version), with `label_config.xml` written."""
    root = backend.settings.local_files_document_root
    if root is None:
        raise ConfigError("folder mode reads images as local files: set LOCAL_FILES_DOCUMENT_ROOT (a parent of the folder)")
    folder, root = folder.resolve(), Path(root).resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise ConfigError(f"{folder} is not strictly below LOCAL_FILES_DOCUMENT_ROOT {root} (as Label Studio requires)")
    out = folder_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = engine_label_config(backend.engine)
    out.label_config.write_text(xml + "\n")
    config = parse_config(xml)
    ontology = backend.ontology_for(config)
    return folder, root, out, config, ontology, backend.version_for(config, ontology)


def annotate_folder(
    folder: Path,
    out_dir: Path,
    backend: LabelStudioBackend,
    batch_size: int = 4,
    limit: int | None = None,
    url_prefix: str | None = None,
) -> Report:
    """Pre-annotate the images below `folder` into `out_dir`: `tasks.json` (import it into a project whose config
    is `label_config.xml`; images addressed as local-files storage below LOCAL_FILES_DOCUMENT_ROOT, or as
    `url_prefix` + relative path) and `coco.json`."""
    folder, root, out, config, ontology, version = start_folder_run(folder, out_dir, backend)
    files = image_files(folder)
    if not files:
        raise ConfigError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    done = _read_journal(out.journal, version)
    todo = [{"id": i, "data": {"image": local_files_ref(p, root)}} for i, p in enumerate(files)
            if p.relative_to(root).as_posix() not in done]
    todo = todo if limit is None else todo[:limit]
    report = Report(total=len(todo), skipped={"already predicted": len(done)}, model_version=version)
    annotations: dict[int, tuple[int, int, list[dict]]] = {}

    def on_image(i: int, key: str, image: MediaItem, detections) -> None:
        annotations[i] = (image.width, image.height,
                          coco.annotations(detections, 0, ontology.names, width=image.width, height=image.height))

    def infer(loaded):
        annotations.clear()
        entries = backend.infer(loaded, config, ontology, version, on_image=on_image)
        return [by_file(e, t, files[t["id"]].relative_to(folder).as_posix()) if "error" in e else e
                for t, e in zip(loaded.tasks, entries)]

    with out.journal.open("a") as journal:

        def sink(tasks: list[dict], entries: list[dict]) -> None:
            for i, (task, entry) in enumerate(zip(tasks, entries)):
                if "error" in entry:
                    continue
                width, height, anns = annotations[i]
                rel = files[task["id"]].relative_to(root).as_posix()
                journal.write(json.dumps({"file": rel, "model_version": version, "width": width, "height": height,
                                          "prediction": entry, "coco": anns}) + "\n")
            journal.flush()

        with listed_after_the_run(*RUN_LOGGERS):
            run_batches(chunks(todo, batch_size), lambda tasks: backend.load_tasks(tasks, config), infer, sink, report)
    _assemble(out, _read_journal(out.journal, version), files, root, ontology.names, url_prefix)
    report.outputs = {k: str(v) for k, v in vars(out).items()}
    return report


def _assemble(out: FolderOutput, records: dict[str, dict], files: list[Path], root: Path, names: list[str],
              url_prefix: str | None) -> None:
    tasks, images, anns = [], [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        record = records.get(rel)
        if record is None:
            continue
        ref = url_prefix.rstrip("/") + "/" + quote(rel) if url_prefix else local_files_ref(path, root)
        tasks.append({"data": {"image": ref}, "predictions": [record["prediction"]]})
        image_id = len(images) + 1
        images.append(coco.image(image_id, rel, record["width"], record["height"]))
        anns += [a | {"image_id": image_id} for a in record["coco"]]
    out.tasks.write_text(json.dumps(tasks))
    coco.write(out.coco, coco.document(images, anns, names))


def _config_and_ontology(client, project: int, backend: LabelStudioBackend):
    config = parse_config(open_project(client, project).label_config)
    return config, backend.ontology_for(config)


def run_annotate(folder: Path | None, project: int | None, out: Path | None, overrides: dict,
                 url_prefix: str | None = None, only_unlabeled: bool = False, limit: int | None = None,
                 report: Path | None = None, engine: str = "local", ray: dict | None = None,
                 follow_poll: float | None = None) -> tuple[Report, Path]:
    """`prelabel annotate`: a Label Studio project in place (`project`), or the images below `folder` into `out`;
    `engine` "ray" runs a project's batches on Ray actors (`ray`: the keyword arguments of `ray_engine`).
    `overrides`: settings given on the command line (None = not given). Returns the report and where it goes."""
    import datetime
    from functools import partial

    from ..engine import Engine
    from .backend import LabelStudioBackend

    if (folder is None) == (project is None):
        raise ProjectError("give either --project ID (Label Studio) or FOLDER --out DIR (folder mode)")
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine!r}: use local or ray")
    if engine == "ray" and project is None:
        raise ConfigError("--engine ray works on Label Studio projects (--project)")
    given = {k: v for k, v in overrides.items() if v is not None}
    if project is not None:
        client = label_studio_client(Settings(**given))
        needs_masks = parse_config(open_project(client, project).label_config).needs_masks
        if not needs_masks or Engine.from_settings(Settings(**given), load=False).detector_masks:
            given["segmenter"] = ""  # boxes only, or masks from the detector itself (SAM 3): SAM is not loaded
    else:
        if out is None:
            raise ConfigError("folder mode needs --out DIR")
        given.setdefault("local_files_document_root",
                         Settings().local_files_document_root or folder.expanduser().resolve().parent)
    settings = Settings(**given)
    # with Ray the actors load the models; here only their ids are needed (for the model version)
    backend = LabelStudioBackend.for_batch(Engine.from_settings(settings, load=engine != "ray"))
    if project is None:
        return (annotate_folder(folder.expanduser(), out, backend, settings.batch_size, limit, url_prefix),
                report or out / "report.json")
    run_batches_on = None
    if engine == "ray":
        from ..engines.ray_engine import ray_engine

        run_batches_on = ray_engine(partial(TaskPredictor, settings), batch_size=settings.batch_size, **(ray or {}))
    if follow_poll is not None:  # --follow: the project, then its new tasks every follow_poll seconds until Ctrl-C
        from .follow import poll_project

        rounds = poll_project(client, project, backend, settings.batch_size, follow_poll, only_unlabeled,
                              on_round=lambda r: log.warning("%s", r.summary()))
        result = Report(model_version=backend.version_for(*_config_and_ontology(client, project, backend)))
        for r in rounds:
            result.total, result.done, result.seconds = result.total + r.total, result.done + r.done, result.seconds + r.seconds
            result.failed += r.failed
            result.skipped = {k: result.skipped.get(k, 0) + v for k, v in r.skipped.items()}
    else:
        result = annotate_project(client, project, backend, settings.batch_size, only_unlabeled, limit, run_batches_on)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return result, report or settings.model_dir / "reports" / f"annotate-project-{project}-{stamp}.json"
