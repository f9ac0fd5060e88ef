"""`prelabel up`: a local Label Studio plus this backend, a project for a folder of images, pre-annotated."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from xml.sax.saxutils import quoteattr

import httpx
from pydantic import SecretStr

from ..errors import PrelabelError
from ..ontology import Ontology
from .access import STACK_FILE, RunningStack
from .config import EXCLUDE, is_exclude

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = r".*\.(jpe?g|png|bmp|gif|webp|tiff?)$"


class StackError(PrelabelError):
    kind = "stack"


def label_config(ontology: Ontology, masks: bool = True, clicks: bool | None = None, exemplars: bool = False) -> str:
    """One row of every label per tool, under a header naming the tool (Label Studio shows the rows unnamed):
    rectangles; with `masks` brush masks; with `clicks` (default: `masks`) smart keypoints and smart rectangles
    (SAM masks what they mark); with `exemplars` (SAM 3) smart rectangles that find every object like the box,
    with an Exclude label for what not to find."""
    clicks = masks if clicks is None else clicks
    labels = "".join(f"<Label value={quoteattr(name)}/>" for name in ontology.names)
    box_labels = labels
    if exemplars and not any(is_exclude(name) for name in ontology.names):
        box_labels += f'<Label value="{EXCLUDE}" background="#808080"/>'
    if exemplars:
        box_header = (f"Boxes: drag a rectangle (Auto-Annotation on: a box on one object finds all like it; an "
                      f"{EXCLUDE} box on a look-alike leaves those out)")
    else:
        box_header = "Boxes: drag a rectangle" + (" (smart rectangle: SAM masks what it covers)" if clicks else "")
    rows = [("box", "RectangleLabels", box_header, box_labels, clicks or exemplars)]
    if masks:
        rows.append(("mask", "BrushLabels", "Masks: paint with the brush", labels, False))
    if clicks:
        rows.append(("point", "KeyPointLabels", "Smart points: click an object and SAM masks it", labels, True))
    parts = ['<View>', '  <Image name="image" value="$image" zoom="true"/>']
    for name, tag, header, row_labels, smart in rows:
        attrs = ' smart="true"' if smart else ""
        parts += [f'  <Header value={quoteattr(header)} size="6"/>',
                  f'  <{tag} name="{name}" toName="image"{attrs}>{row_labels}</{tag}>']
    return "\n".join(parts + ["</View>"])


def engine_label_config(engine: Engine) -> str:
    """The label config for what `engine` can do: masks from a segmenter or SAM 3, clicks from whichever masks
    them, "find all like this" with SAM 3 as the detector."""
    return label_config(engine.ontology(), masks=engine.gives_masks, clicks=engine.clicker is not None,
                        exemplars=engine.finds_exemplars)


@dataclass
class Credentials:
    email: str
    password: str
    token: str

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        if path.exists():
            return cls(**json.loads(path.read_text()))
        creds = cls("admin@prelabel.local", secrets.token_urlsafe(12), secrets.token_hex(20))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(creds.__dict__))
        path.chmod(0o600)
        return creds


def label_studio_executable() -> str:
    """The `label-studio` of this Python's environment (which need not be on PATH), else the one on PATH."""
    beside = Path(sys.executable).with_name("label-studio")
    found = str(beside) if beside.exists() else shutil.which("label-studio")
    if not found:
        raise StackError("Label Studio is not installed: pip install 'prelabel[studio]'")
    return found


class LabelStudioProcess:
    """Label Studio (SQLite) in a child process, data in `data_dir`, serving local files from `document_root`."""

    def __init__(self, data_dir: Path, port: int, document_root: Path, creds: Credentials):
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = data_dir
        executable = label_studio_executable()
        env = os.environ | {
            "LABEL_STUDIO_USERNAME": creds.email,
            "LABEL_STUDIO_PASSWORD": creds.password,
            "LABEL_STUDIO_USER_TOKEN": creds.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "ML_BLOCK_LOCAL_IP": "false",  # the backend runs beside it on 127.0.0.1
            "USE_DEFAULT_BANNED_SUBNETS": "false",  # ...and so does the webhook Label Studio adds for it
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "label-studio.log"
        self._log = self.log_path.open("a")
        command = [executable, "start", "--no-browser", "--host", "127.0.0.1", "--internal-host", "127.0.0.1",
                   "--port", str(port), "--data-dir", str(data_dir)]
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=data_dir)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"Label Studio exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "UP":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise StackError(f"Label Studio did not start within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class BackendThread:
    """The FastAPI backend under uvicorn in this process (models already loaded)."""

    def __init__(self, app, port: int):
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30) -> None:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise StackError(f"the backend could not start on {self.url} (port in use?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def ensure_project(client, title: str, config: str, images: Path, backend_url: str) -> tuple[int, int]:
    """Create or reuse the project for `images`: its config, local-files storage (synced, never copied) and
    interactive ML backend. Returns (project id, ML backend id)."""
    project = next((p for p in client.projects.list() if p.title == title), None)
    if project is None:
        project = client.projects.create(title=title, label_config=config)
    elif project.label_config != config:
        client.projects.update(id=project.id, label_config=config)
    storages = client.import_storage.local.list(project=project.id)
    storage = next((s for s in storages if Path(s.path) == images), None)
    if storage is None:
        storage = client.import_storage.local.create(
            project=project.id, path=str(images), use_blob_urls=True, regex_filter=IMAGE_SUFFIXES, title=images.name
        )
    client.import_storage.local.sync(id=storage.id)
    backends = client.ml.list(project=project.id)
    ml = next((m for m in backends if m.url.rstrip("/") == backend_url), None)
    if ml is None:
        ml = client.ml.create(url=backend_url, project=project.id, is_interactive=True, title="prelabel")
    return project.id, ml.id


def ensure_default_tab(client, project_id: int) -> None:
    """A project without Data Manager tabs gets a "Default" one that shows the "Prediction score" column and sorts
    by it ascending (the least certain pre-annotations first); tabs people made are left alone."""
    if list(client.views.list(project=project_id)):
        return
    columns = client._client_wrapper.httpx_client.request("api/dm/columns", method="GET",
                                                          params={"project": project_id}).json()["columns"]
    hidden: dict[str, list[str]] = {"explore": [], "labeling": []}
    for column in columns:
        if column.get("children") or column.get("target") != "tasks" or column.get("parent"):
            continue
        for surface, shown in (column.get("visibility_defaults") or {}).items():
            if not shown and surface in hidden and column["id"] != "predictions_score":
                hidden[surface].append(f"tasks:{column['id']}")
    client.views.create(project=project_id, data={"title": "Default", "ordering": ["tasks:predictions_score"],
                                                  "hiddenColumns": hidden})


def model_settings(overrides: dict, tiny_models: bool):
    """The settings `up` serves with: flags over the environment (MODEL_DIR included); `tiny_models` writes (once)
    and serves the tiny random models below MODEL_DIR."""
    from ..settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**given)
    if tiny_models:
        from ..models.tiny import write_tiny_models

        tiny = settings.model_dir / "tiny-models"
        paths = {k: tiny / k for k in ("detector", "segmenter")}
        if not all((p / "config.json").exists() for p in paths.values()):
            paths = write_tiny_models(tiny)
        settings = Settings(**given | {"detector": str(paths["detector"]), "segmenter": str(paths["segmenter"])})
    return settings


def run_up(images: Path, data_dir: Path | None, port: int, backend_port: int, overrides: dict,
           tiny_models: bool = False, echo: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> None:
    """`prelabel up`: Label Studio and the backend on loopback, a project for the `images` folder (local-files
    storage below its parent), every image pre-annotated, then serve until Label Studio stops or the caller
    interrupts (KeyboardInterrupt); both are stopped on the way out. `overrides`: settings given on the command
    line (None = not given). `data_dir`: Label Studio's data (default MODEL_DIR/label-studio)."""
    from label_studio_sdk.client import LabelStudio

    from ..engine import Engine
    from ..ontology import PromptsFile
    from .annotate import annotate_project
    from .server import create_app

    settings = model_settings(overrides, tiny_models)
    data_dir = data_dir or (settings.model_dir / "label-studio").resolve()
    creds = Credentials.load_or_create(data_dir / "prelabel-credentials.json")
    url = f"http://127.0.0.1:{port}"
    settings = settings.model_copy(update=dict(label_studio_url=url, label_studio_api_key=SecretStr(creds.token),
                                               local_files_document_root=images.parent))
    studio = backend = stack = None
    try:
        if not PromptsFile.load(settings.prompts).labels:  # before any model download
            raise PrelabelError("prelabel up needs labels: pass --prompts FILE (see prompts/example.yaml)")
        engine = Engine.from_settings(settings)
        # Label Studio serves local files below a document root that must be a parent of the storage folder
        first_start = not (data_dir / "label_studio.sqlite3").exists()
        studio = LabelStudioProcess(data_dir, port, images.parent, creds)
        backend = BackendThread(create_app(engine), backend_port)
        backend.start()
        log.info("starting Label Studio on %s%s", studio.url,
                 " (its first start sets up its database: ~40 s)" if first_start else "")
        studio.wait_ready()
        stack = RunningStack(studio.url, creds.token, os.getpid(), settings.model_dir.resolve() / STACK_FILE)
        stack.write()
        client = LabelStudio(base_url=studio.url, api_key=creds.token)
        config = engine_label_config(engine)
        project_id, _ = ensure_project(client, f"prelabel: {images.name}", config, images, backend.url)
        ensure_default_tab(client, project_id)
        report = annotate_project(client, project_id, backend.server.config.app.state.backend, settings.batch_size)
        if report.interrupted:
            raise KeyboardInterrupt
        for error in report.failed:
            warn(error["error"]["message"])
        if "failed tasks" in report.outputs:
            warn(f"failed tasks (Data Manager tab): {report.outputs['failed tasks']}")
        echo(f"API key {creds.token} (Label Studio at {studio.url}); `rank`, `annotate --project`, `review` and "
             f"`effort` run from here find both by themselves while this runs; for other tools: "
             f"set -a; . {stack.path}; set +a")
        echo(f"ready: {studio.url}/projects/{project_id}/data  login {creds.email} / {creds.password}  "
             f"({report.done} pre-annotated, {report.skipped['already predicted']} already had {report.model_version}, "
             f"{len(report.failed)} failed); backend {backend.url}; Ctrl-C stops both")
        while True:
            time.sleep(1)
            if studio.process.poll() is not None:
                raise StackError(f"Label Studio stopped unexpectedly; see {studio.log_path}")
    finally:
        if stack is not None:
            stack.remove()
        if backend is not None:
            backend.stop()
        if studio is not None:
            studio.stop()
