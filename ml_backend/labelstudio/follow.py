"""Follow Label Studio projects: tasks created while the server runs are pre-annotated without anyone pressing a
button.

Label Studio sends `TASKS_CREATED` to `<backend>/webhook` (it adds that webhook itself when a backend is connected;
`ensure_webhook` adds one for task creation where none reaches us, and `remove_webhooks` takes ours away on
shutdown, also those a run killed before its shutdown left: they are noted in the queue's database). The ids go
into the durable queue (`follow.WorkQueue`) before the webhook is answered; a follower thread takes them in
batches, reads the tasks from Label Studio (data, and which model versions have predicted them: a task that
already has this version's prediction is not predicted again), runs them through the same batch path as `prelabel
annotate` in the server's batch lane (clicks run first; `PRELABEL_FOLLOW_RATE` caps tasks per second) and pushes
the predictions in one bulk request. Label Studio unreachable: the batch waits and is retried with backoff;
nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Callable

import httpx

from ..errors import PrelabelError, RequestError
from ..follow import Item, RateLimit, WorkQueue
from ..priority import lower_this_thread
from .annotate import prediction_rows, record_errors
from .config import parse_config

if TYPE_CHECKING:
    from .backend import LabelStudioBackend, LoadedTasks

log = logging.getLogger(__name__)

SOURCE = "label-studio"
TASK_FIELDS = "id,data,predictions_model_versions"


def created_task_ids(payload: dict) -> list[int]:
    """The task ids of a TASKS_CREATED webhook (`tasks`: task objects, or ids)."""
    tasks = payload.get("tasks")
    if not isinstance(tasks, list):
        raise RequestError("TASKS_CREATED webhook has no list of tasks")
    ids = [t.get("id") if isinstance(t, dict) else t for t in tasks]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RequestError("TASKS_CREATED webhook has a task without an integer id")
    return ids


def predicted_versions(task: dict) -> set[str]:
    """The model versions that have predicted a task, from the task list's `predictions_model_versions`: "a,b" from
    Label Studio on SQLite, "a, b" on PostgreSQL."""
    return {v.strip() for v in (task.get("predictions_model_versions") or "").split(",")} - {""}


class ProjectFollower:
    """The queue and the thread that empties it. `predict(loaded, config, ontology, version)` runs image tasks in
    the server's batch lane; `run_job(fn)` runs a video job there."""

    def __init__(self, backend: LabelStudioBackend, queue: WorkQueue,
                 predict: Callable[[LoadedTasks, object, object, str], list[dict]],
                 run_job: Callable[[Callable], list[dict]]):
        self.backend, self.queue = backend, queue
        self.predict, self.run_job = predict, run_job
        self.settings = backend.settings
        self.rate = RateLimit(self.settings.follow_rate)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow", daemon=True)
        self._start_lock = threading.Lock()
        self._told: set[str] = set()
        self._client, self._client_lock = None, threading.Lock()

    # -- in ----------------------------------------------------------------------------------------------------
    def created(self, project: int, payload: dict) -> dict:
        ids = created_task_ids(payload)
        added = self.queue.enqueue(SOURCE, project, ids)
        self.backend.metrics.count("follow_tasks_received", len(ids))
        self.start()
        return {"status": "queued", "project": project, "tasks": len(ids), "new": added}

    # -- the thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the thread once (at the first new task, or at start-up when a backlog waits from before)."""
        with self._start_lock:
            if self._thread.ident is None and not self._stop.is_set():
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.wake()
        if self._thread.is_alive():
            self._thread.join(30)
        self.remove_webhooks()

    def _run(self) -> None:
        lower_this_thread(self.settings.background_nice)  # reading and pushing tasks: background work too
        while not self._stop.is_set():
            items = self.queue.claim(self.settings.batch_size, wait_s=5.0, stop=self._stop)
            if not items:
                continue
            self.rate.take(len(items), self._stop)
            try:
                self.process(items)
            except Exception as exc:  # noqa: BLE001 - Label Studio unreachable, or a bug: the batch waits, the loop goes on
                delay = self.queue.retry(items, f"{type(exc).__name__}: {exc}")
                self._tell(f"{type(exc).__name__}", "project %s: %d new tasks wait %.0f s to be retried: %s",
                           items[0].project, len(items), delay, exc)

    def _tell(self, key: str, message: str, *args) -> None:
        """Log a repeated trouble once at WARNING (then at DEBUG)."""
        level = logging.DEBUG if key in self._told else logging.WARNING
        self._told.add(key)
        log.log(level, message, *args)

    def client(self):
        from label_studio_sdk.client import LabelStudio

        url, key = self.backend.loader.label_studio_url, self.backend.loader.label_studio_key
        if not url or not key:
            raise PrelabelError("new tasks are queued, but Label Studio's address and an API key are unknown: set "
                                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or connect the backend with an access token)")
        with self._client_lock:  # one client while the address and key stay (a new one costs ~45 ms: its SSL context)
            if self._client is None or self._client[0] != (url, key):
                self._client = ((url, key), LabelStudio(base_url=url, api_key=key, timeout=self.settings.download_timeout))
            return self._client[1]

    def process(self, items: list[Item]) -> None:
        """One batch of one project: read, skip what this version has predicted, predict, push, mark done."""
        from label_studio_sdk.core.api_error import ApiError

        client, project = self.client(), items[0].project
        try:
            config_xml = client.projects.get(id=project).label_config
        except ApiError as exc:
            if exc.status_code == 404:  # the project is gone: its tasks with it
                self.queue.done(items, {i.task: f"project {project} no longer exists" for i in items})
                return
            raise
        backend = self.backend
        config = backend.filled(parse_config(config_xml))
        ontology = backend.ontology_for(config)
        version = backend.version_for(config, ontology)
        found = {t["id"]: t for t in self._tasks(client, project, [i.task for i in items])}
        errors = {i.task: "the task no longer exists" for i in items if i.task not in found}
        todo = [{"id": t["id"], "data": t["data"]} for t in found.values() if version not in predicted_versions(t)]
        if todo:
            if config.videos:
                entries = self.run_job(lambda between: backend.predict_tasks(
                    todo, config, ontology, version, progress=lambda _n: between()))
            else:
                entries = self.predict(backend.load_tasks(todo, config), config, ontology, version,
                                       self.settings.follow_batch_images)
            self.push(project, todo, entries, version)
            record_errors(client, project, todo, entries)
            errors |= {t["id"]: e["error"]["message"] for t, e in zip(todo, entries) if "error" in e}
            backend.metrics.count("follow_tasks_predicted", sum("error" not in e for e in entries))
        self.queue.done(items, errors)

    def push(self, project: int, tasks: list[dict], entries: list[dict], version: str) -> None:
        """`push_predictions`, encoded by the C JSON encoder in this thread (the SDK encodes a page of brush RLE
        element by element in Python, holding the GIL the model thread needs for clicks)."""
        rows = prediction_rows(tasks, entries, version)
        if not rows:
            return
        loader = self.backend.loader
        url = f"{loader.label_studio_url}/api/projects/{project}/import/predictions"
        headers = loader.headers_for(url) | {"Content-Type": "application/json"}
        response = loader.client.post(url, content=json.dumps(rows).encode(), headers=headers,
                                      timeout=self.settings.download_timeout)
        if response.status_code >= 400:
            raise httpx.HTTPStatusError(f"Label Studio refused the predictions of project {project}: "
                                        f"{response.status_code} {response.text[:200]}", request=response.request,
                                        response=response)

    @staticmethod
    def _tasks(client, project: int, ids: list[int]) -> list[dict]:
        items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": t} for t in ids]
        query = json.dumps({"filters": {"conjunction": "or", "items": items}})
        return [{"id": t.id, "data": t.data, "predictions_model_versions": t.predictions_model_versions}
                for t in client.tasks.list(project=project, query=query, fields="all", include=TASK_FIELDS)]

    # -- webhooks -----------------------------------------------------------------------------------------------
    def ensure_webhook(self, project: int) -> str:
        """Task creation reaches this server's /webhook for `project`: Label Studio's own webhook for a connected
        backend (all actions), or one we add (TASKS_CREATED) at PRELABEL_PUBLIC_URL, else at the address Label
        Studio has for the project's one backend. Returns what was done."""
        client = self.client()
        base = self.settings.public_url
        if not base:
            backends = [b.url for b in client.ml.list(project=project)]
            if len(backends) != 1:
                return (f"project {project} has {len(backends)} ML backends: set PRELABEL_PUBLIC_URL (this server's "
                        f"address as Label Studio reaches it) to follow its new tasks")
            base = backends[0]
        url = base.rstrip("/") + "/webhook"
        for hook in client.webhooks.list(project=project):
            if hook.url.rstrip("/") == url and hook.is_active is not False and (
                    hook.send_for_all_actions or "TASKS_CREATED" in (hook.actions or [])):
                return f"project {project}: Label Studio sends new tasks to {url}"
        hook = client.webhooks.create(project=project, url=url, send_payload=True, send_for_all_actions=False,
                                      actions=["TASKS_CREATED"], is_active=True)
        self.queue.note_webhook(SOURCE, self._tool(), project, hook.id, url)
        return f"project {project}: added a webhook for new tasks to {url}"

    def _tool(self) -> str:
        return (self.backend.loader.label_studio_url or "").rstrip("/")

    @property
    def webhooks(self) -> dict[int, int]:
        """project -> id of the webhook this server added to it (in this run or one that crashed)."""
        return {project: hook for hook, (project, _url) in self.queue.webhooks(SOURCE, self._tool()).items()}

    def remove_webhooks(self) -> None:
        """Takes away the webhooks this server added, also those a crashed run left: each only while it still
        sends to the address we gave it (one already gone is fine)."""
        from label_studio_sdk.core.api_error import ApiError

        tool = self._tool()
        for hook, (project, url) in self.queue.webhooks(SOURCE, tool).items():
            try:
                client = self.client()
                if client.webhooks.get(id=hook).url.rstrip("/") == url:  # (else someone changed it: theirs now)
                    client.webhooks.delete(id=hook)
            except ApiError as exc:
                if exc.status_code != 404:
                    log.warning("could not remove webhook %s of project %s: %s", hook, project, exc.body)
                    continue
            except (httpx.HTTPError, PrelabelError) as exc:
                log.warning("could not remove webhook %s of project %s: %s", hook, project, exc)
                continue
            self.queue.forget_webhook(SOURCE, tool, hook)


def poll_project(client, project_id: int, backend: LabelStudioBackend, batch_size: int, poll_s: float,
                 only_unlabeled: bool = False, stop: threading.Event | None = None,
                 on_round: Callable | None = None) -> list:
    """`prelabel annotate --project ID --follow`, where Label Studio's webhooks cannot reach a server: the whole
    project once, then every `poll_s` seconds the tasks created since (ids above the highest seen), until `stop` is
    set (or Ctrl-C). Label Studio unreachable: retried with backoff (up to 5 minutes). Returns the reports of the
    rounds that did something."""
    from label_studio_sdk.core.api_error import ApiError

    from .annotate import annotate_project

    stop = stop or threading.Event()
    reports, after, delay = [], None, poll_s
    while not stop.is_set():
        try:
            report = annotate_project(client, project_id, backend, batch_size, only_unlabeled, after_id=after)
        except (httpx.HTTPError, OSError) as exc:
            delay = min(max(delay, 1.0) * 2, 300.0)
            log.warning("project %s: Label Studio unreachable (%s); trying again in %.0f s", project_id, exc, delay)
        except ApiError as exc:
            if exc.status_code is not None and exc.status_code < 500:
                raise
            delay = min(max(delay, 1.0) * 2, 300.0)
            log.warning("project %s: Label Studio answered %s; trying again in %.0f s", project_id, exc.status_code, delay)
        else:
            delay = poll_s
            after = report.last_task_id if after is None else max(after, report.last_task_id)
            if report.total or report.interrupted:
                reports.append(report)
                if on_round is not None:
                    on_round(report)
            if report.interrupted:
                break
        try:
            stop.wait(delay)
        except KeyboardInterrupt:
            break
    return reports
