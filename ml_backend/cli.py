"""`prelabel` command line: thin calls into the library."""

from __future__ import annotations

import ipaddress
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from .errors import ConfigError, PrelabelError

# rich_markup_mode=None: click's plain help. Typer's rich help panel (0.29) prints every option's type, so flags
# and --help itself show a `<bool>` as if they took a value; the plain one shows types only where a value is taken.
app = typer.Typer(help="Open-vocabulary pre-annotation for Label Studio and CVAT.", no_args_is_help=True,
                  rich_markup_mode=None)
dev = typer.Typer(help="Developer tools.", no_args_is_help=True, rich_markup_mode=None)
cvat = typer.Typer(help="CVAT: nuclio functions and auto-annotation.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(dev, name="dev")
app.add_typer(cvat, name="cvat")

log = logging.getLogger("prelabel")
VERBOSE_HELP = "Debug logging."


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"prelabel {version('prelabel')}")
        except PackageNotFoundError:
            raise _fail(PrelabelError("prelabel is not installed, so it has no version: run `make install`")) from None
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
):
    pass


def _logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _settings(**overrides):
    from .settings import Settings

    if "label_studio_url" in overrides:
        overrides = _with_stack(overrides)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _with_stack(overrides: dict) -> dict:
    """Label Studio's address and key, where neither flags nor the environment give them, from the `prelabel up`
    running from MODEL_DIR (flags > environment > the running stack)."""
    from .labelstudio.access import RunningStack
    from .settings import Settings

    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    stack = RunningStack.find(settings.model_dir)
    if stack is None or settings.label_studio_url not in (None, stack.url):
        return overrides
    if settings.label_studio_api_key is None:
        typer.secho(f"Label Studio of `prelabel up`: {stack.url} (from {stack.path})", dim=True, err=True)
        return overrides | {"label_studio_url": stack.url, "label_studio_api_key": stack.api_key}
    return overrides | {"label_studio_url": stack.url}


def _segmenter_flag(value: str | None) -> str | None:
    return None if value is None else ("" if value.lower() == "none" else value)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg="red", err=True)
    return typer.Exit(2)


@contextmanager
def _failing():
    """A user's mistake, or Label Studio refusing or unreachable, ends the command with one red line and exit
    status 2."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from .labelstudio.access import refused_message
    from .net import redact

    try:
        yield
    except PrelabelError as exc:
        raise _fail(exc) from None
    except ApiError as exc:
        message = refused_message(exc.status_code, exc.body, None) or f"Label Studio answered {exc.status_code}: {exc.body}"
        raise _fail(PrelabelError(message)) from None
    except httpx.TransportError as exc:
        try:
            where = redact(str(exc.request.url))
        except RuntimeError:  # no request attached
            where = "Label Studio"
        raise _fail(PrelabelError(f"cannot reach {where} ({type(exc).__name__}: {exc}): is Label Studio running "
                                  f"there? Check --url / LABEL_STUDIO_URL")) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to accept other machines)."),
    port: int = typer.Option(9090, help="Port (Label Studio's ML backend default is 9090)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file (prompts/*.yaml)."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory."),
    segmenter: Optional[str] = typer.Option(None, help="Segmenter: hub id, local directory, sam_vit_*.pth, or 'none'."),
    classifier: Optional[str] = typer.Option(None, help="Zero-shot classifier for Choices (CLIP/SigLIP): hub id, local directory, or 'none'."),
    tracker: Optional[str] = typer.Option(None, help="Video tracker: SAM 2 video or SAM 3 hub id, local directory, or 'none'."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Run the Label Studio ML backend (models load once, at start)."""
    import uvicorn

    from .labelstudio.server import create_app
    from .engine import Engine

    _logging(verbose)
    settings = _settings(prompts=prompts, detector=detector, device=device, segmenter=_segmenter_flag(segmenter),
                         classifier=_segmenter_flag(classifier), tracker=_segmenter_flag(tracker))
    if not _is_loopback(host) and not settings.basic_auth_user:
        log.warning("serving on %s without BASIC_AUTH_USER/BASIC_AUTH_PASS: anyone who can reach it can use it", host)
    with _failing():
        engine = Engine.from_settings(settings)
    log.info("models ready: %s", engine.base_version)
    uvicorn.run(create_app(engine), host=host, port=port, log_level="debug" if verbose else "info")


@app.command()
def up(
    images: Path = typer.Argument(Path("images"), help="Folder of images (connected as local-files storage, not copied)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file: labels, synonyms, thresholds, models."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory (default: the prompts file's, else Grounding DINO tiny)."),
    segmenter: Optional[str] = typer.Option(None, help="Segmenter: hub id, local directory, sam_vit_*.pth, or 'none'."),
    classifier: Optional[str] = typer.Option(None, help="Zero-shot classifier for Choices (CLIP/SigLIP): hub id, local directory, or 'none'."),
    tracker: Optional[str] = typer.Option(None, help="Video tracker: SAM 2 video or SAM 3 hub id, local directory, or 'none'."),
    port: int = typer.Option(8080, help="Label Studio port."),
    backend_port: int = typer.Option(9090, help="Backend port."),
    data_dir: Optional[Path] = typer.Option(None, help="Label Studio's data (SQLite, uploads; default MODEL_DIR/label-studio)."),
    tiny_models: bool = typer.Option(False, "--tiny-models", help="Offline tiny random models (tests, demos)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Label Studio + this backend + a pre-annotated project for IMAGES, in one command (Ctrl-C stops both)."""
    import faulthandler
    import signal

    from .labelstudio.stack import run_up

    _logging(verbose)
    images = images.expanduser().resolve()
    if not images.is_dir():
        typer.secho(f"error: {images} is not a folder of images", fg="red", err=True)
        raise typer.Exit(2)
    # stop cleanly on Ctrl-C and SIGTERM, also when started in the background (where SIGINT starts out ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack on stderr
    overrides = dict(prompts=prompts, device=device, detector=detector, segmenter=_segmenter_flag(segmenter),
                     classifier=_segmenter_flag(classifier), tracker=_segmenter_flag(tracker))
    try:
        with _failing():
            run_up(images, data_dir and data_dir.expanduser().resolve(), port, backend_port, overrides, tiny_models,
                   echo=typer.echo, warn=lambda line: typer.secho(line, fg="yellow", err=True))
    except KeyboardInterrupt:
        typer.echo("stopping")


def _label_studio_client(url: str | None, api_key: str | None):
    from .labelstudio.annotate import label_studio_client

    settings = _settings(label_studio_url=url, label_studio_api_key=api_key)
    return settings, label_studio_client(settings)


@app.command()
def annotate(
    folder: Optional[Path] = typer.Argument(None, help="Folder mode: images to pre-annotate into --out (no Label Studio needed)."),
    project: Optional[int] = typer.Option(None, help="Label Studio project id: pre-annotate its tasks in place."),
    url: Optional[str] = typer.Option(None, help="Label Studio address (LABEL_STUDIO_URL)."),
    api_key: Optional[str] = typer.Option(None, help="Label Studio API key: legacy token or personal access token (LABEL_STUDIO_API_KEY)."),
    out: Optional[Path] = typer.Option(None, help="Folder mode: where tasks.json, coco.json, label_config.xml go."),
    url_prefix: Optional[str] = typer.Option(None, help="Folder mode: address images in tasks.json as PREFIX/<relative path> instead of local-files storage."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model batch (PRELABEL_BATCH_SIZE)."),
    only_unlabeled: bool = typer.Option(False, "--only-unlabeled", help="Skip tasks that already have annotations."),
    limit: Optional[int] = typer.Option(None, help="Do at most N tasks in this run."),
    report: Optional[Path] = typer.Option(None, help="Where the JSON report goes (default: MODEL_DIR/reports/, or OUT/report.json)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file (prompts/*.yaml)."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory."),
    segmenter: Optional[str] = typer.Option(None, help="Segmenter: hub id, local directory, or 'none'."),
    classifier: Optional[str] = typer.Option(None, help="Zero-shot classifier for Choices (CLIP/SigLIP): hub id, local directory, or 'none'."),
    tracker: Optional[str] = typer.Option(None, help="Video tracker: SAM 2 video or SAM 3 hub id, local directory, or 'none'."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    engine: str = typer.Option("local", help="local, or ray (the extra prelabel[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster: 'auto' on a cluster node, or ray://HEAD:10001 (default: a local Ray)."),
    ray_actors: int = typer.Option(1, help="Ray: model actors (one per GPU, or per N CPUs)."),
    cpus_per_actor: float = typer.Option(1, help="Ray: CPUs per actor (also its torch threads)."),
    gpus_per_actor: float = typer.Option(0, help="Ray: GPUs per actor."),
    follow: bool = typer.Option(False, "--follow", help="Keep running: pre-annotate what is added later, until Ctrl-C (FOLDER: images added to the folder)."),
    poll: float = typer.Option(2.0, help="--follow: seconds between looks for new data."),
    incomplete_tries: int = typer.Option(5, envvar="PRELABEL_FOLLOW_INCOMPLETE_TRIES", help="--follow FOLDER: polls without a change on which a file still does not decode before it is reported (PRELABEL_FOLLOW_INCOMPLETE_TRIES)."),
    incomplete_seconds: float = typer.Option(60.0, envvar="PRELABEL_FOLLOW_INCOMPLETE_SECONDS", help="--follow FOLDER: seconds without a change after which a file that does not decode is reported (PRELABEL_FOLLOW_INCOMPLETE_SECONDS)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Pre-annotate a whole Label Studio project (--project) or a folder of images (FOLDER --out DIR): batched,
    with progress, resumable (run it again to finish), failures reported per task. Exit status 1 if any task failed.
    --follow keeps running and pre-annotates what arrives later."""
    from .labelstudio.annotate import run_annotate

    _logging(verbose)
    overrides = dict(prompts=prompts, detector=detector, device=device, segmenter=_segmenter_flag(segmenter),
                     classifier=_segmenter_flag(classifier), tracker=_segmenter_flag(tracker), batch_size=batch_size,
                     label_studio_url=url,
                     label_studio_api_key=api_key)
    ray = dict(actors=ray_actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, address=ray_address)
    if folder is not None and follow:
        return _follow_folder(folder, out, overrides, url_prefix, poll, incomplete_tries, incomplete_seconds, report)
    with _failing():
        if project is not None:
            overrides = _with_stack(overrides)
        if follow and (limit is not None or engine != "local"):
            raise ConfigError("--follow runs locally on every new task: leave out --limit and --engine ray")
        result, report = run_annotate(folder, project, out, overrides, url_prefix, only_unlabeled, limit, report,
                                      engine, ray, follow_poll=poll if follow else None)
    result.write(report)
    for entry in result.failed:
        typer.secho(entry["error"]["message"], fg="yellow", err=True)
    typer.echo(f"{result.summary()}; model version {result.model_version}; report {report}")
    for name, path in result.outputs.items():
        if name != "journal":
            typer.echo(f"{name}: {path}")
    raise typer.Exit(0 if result.ok else 1)


def _follow_folder(folder: Path, out: Path | None, overrides: dict, url_prefix: str | None, poll: float,
                   incomplete_tries: int, incomplete_seconds: float, report: Path | None) -> None:
    """`annotate FOLDER --out DIR --follow`: a live status line, each failure as it happens, the report at the end
    (Ctrl-C)."""
    from .follow_folder import LiveLine, run_follow_folder

    line = LiveLine()
    try:
        with _failing():
            result, where = run_follow_folder(folder, out, overrides, url_prefix, poll, incomplete_tries,
                                              incomplete_seconds, status=lambda s: line(s.line(), (s.done, s.queued, s.failed)),
                                              failure=line.message)
    finally:
        line.close()
    where = report or where
    result.write(where)
    typer.echo(f"{result.summary()}; model version {result.model_version}; report {where}")
    for name, path in result.outputs.items():
        if name != "journal":
            typer.echo(f"{name}: {path}")
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def rank(
    project: int = typer.Option(..., help="Label Studio project id."),
    url: Optional[str] = typer.Option(None, help="Label Studio address (LABEL_STUDIO_URL)."),
    api_key: Optional[str] = typer.Option(None, help="Label Studio API key (LABEL_STUDIO_API_KEY)."),
    model_version: Optional[str] = typer.Option(None, help="Rank predictions of this version (default: the project's, else the newest)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file: thresholds for predictions made without a score."),
    top: int = typer.Option(20, help="How many of the hardest tasks to print."),
    out: Optional[Path] = typer.Option(None, help="Write the whole order as JSON here."),
):
    """Order a project's tasks hardest-first by prediction uncertainty; the Data Manager then sorts by it
    (column "Prediction score", ascending)."""
    from .labelstudio.rank import print_ranking, rank_project, write_ranking
    from .ontology import PromptsFile

    with _failing():
        settings, client = _label_studio_client(url, api_key)
        prompts_file = PromptsFile.load(prompts or settings.prompts)
        thresholds = {s.name: s.threshold for s in prompts_file.ontology().labels}
        version, ranked = rank_project(client, project, settings.label_studio_url, model_version, thresholds,
                                       prompts_file.box_threshold)
    print_ranking(project, version, ranked, top)
    if out is not None:
        write_ranking(out, version, ranked)
        typer.echo(f"order written to {out}")


@app.command()
def review(
    project: Optional[int] = typer.Option(None, help="Label Studio project id: review its tasks."),
    coco: Optional[Path] = typer.Option(None, help="A COCO file of human annotations (any tool's, CVAT's 'COCO 1.0')."),
    cvat: Optional[Path] = typer.Option(None, help="A CVAT export: 'CVAT for images 1.1' XML or 'COCO 1.0' JSON."),
    images: Optional[Path] = typer.Option(None, help="--coco/--cvat: the folder holding the images."),
    predictions: Optional[Path] = typer.Option(None, help="--coco/--cvat: predictions as COCO (e.g. annotate's coco.json) or a results list."),
    url: Optional[str] = typer.Option(None, help="Label Studio address (LABEL_STUDIO_URL)."),
    api_key: Optional[str] = typer.Option(None, help="Label Studio API key (LABEL_STUDIO_API_KEY)."),
    model_version: Optional[str] = typer.Option(None, help="--project: predictions of this model version (default: the project's)."),
    name: Optional[str] = typer.Option(None, help="FiftyOne dataset (default: prelabel-project-ID or prelabel-FILE)."),
    out: Optional[Path] = typer.Option(None, help="Plots, flagged.json and the image cache (default: MODEL_DIR/review/NAME)."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Object map, uniqueness and near duplicates from the engine's image encoder."),
    embedding_model: Optional[str] = typer.Option(None, help="An image encoder (hub id or local directory: CLIP/SigLIP, SAM, SAM 3) to embed images and objects with, instead of the engine's encoder."),
    segmenter: Optional[str] = typer.Option(None, help="The SAM whose image encoder gives embeddings: hub id, local directory or 'none'."),
    detector: Optional[str] = typer.Option(None, help="The detector (teacher): SAM 3 (e.g. facebook/sam3) embeds with its own encoder, SAM or no SAM; another's backbone embeds with --segmenter none."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    viz: str = typer.Option("umap", help="Object map method: umap, tsne or pca."),
    prune: bool = typer.Option(False, "--prune", help="Remove samples whose task or image is no longer in the source."),
    tab: bool = typer.Option(True, "--tab/--no-tab", help="--project: a Data Manager tab of the flagged tasks."),
    launch: bool = typer.Option(False, "--app/--no-app", help="Then serve the FiftyOne App on 127.0.0.1:5151 (Ctrl-C stops)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Review labels in FiftyOne: a persistent dataset (refreshed by task id or file name, never duplicated) with
    `prelabel` and `ground_truth`, likely mistakes, label statistics and plots, and the flagged tasks' links."""
    from .cli_sources import Source, open_source
    from .review import FLAGGED_FILE, launch_app, print_report, review_embedder, review_folder
    from .review.dataset import configure_fiftyone

    _logging(verbose)
    with _failing():
        source = Source(project, coco, cvat, images, predictions, model_version).check()
    configure_fiftyone()
    with _failing():
        settings = _settings(segmenter=_segmenter_flag(segmenter), detector=detector, device=device,
                             label_studio_url=url, label_studio_api_key=api_key)
        with open_source(source, settings) as opened:
            name = name or f"prelabel-{source.name}"
            out = out or settings.model_dir / "review" / name
            embedder = review_embedder(settings, embedding_model) if embeddings else None
            report = review_folder(opened.records, name, out, opened.images, embedder, viz, prune)
        print_report(report)
        typer.echo(f"dataset {name}: {report.build.added} added, {report.build.updated} refreshed, "
                   f"{report.build.removed} removed; "
                   f"{len(report.flagged)} flagged samples in {out / FLAGGED_FILE}; plots in {out / 'plots'}")
        if project is not None and tab and report.flagged:
            from .labelstudio.views import create_review_tab, tab_link

            tab_id = create_review_tab(opened.client, project, [int(f.key) for f in report.flagged], "prelabel review")
            typer.echo(f"Label Studio tab 'prelabel review' ({tab_id}): "
                       f"{tab_link(settings.label_studio_url, project, tab_id)}")
    if launch:
        typer.echo("FiftyOne App on http://127.0.0.1:5151 (Ctrl-C stops)")
        launch_app(name)


@app.command()
def effort(
    project: int = typer.Option(..., help="Label Studio project id."),
    url: Optional[str] = typer.Option(None, help="Label Studio address (LABEL_STUDIO_URL)."),
    api_key: Optional[str] = typer.Option(None, help="Label Studio API key (LABEL_STUDIO_API_KEY)."),
    model_version: Optional[str] = typer.Option(None, help="Predictions of this model version (default: the project's, else the newest)."),
    iou: float = typer.Option(0.9, help="IoU at or above which a matched box counts as not moved."),
    weight: Optional[list[str]] = typer.Option(None, help="Edit cost KIND=VALUE (add, move, relabel, delete, keep), repeatable; defaults add=1 move=0.5 relabel=0.2 delete=0.1 keep=0."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON here."),
):
    """Effort saved by pre-annotation: per task, the edits from the stored predictions to the final annotation
    (kept, relabelled, moved, deleted, added) against drawing every box from scratch; per label and overall."""
    import json

    from rich.console import Console

    from .cli_sources import Source, open_source
    from .effort import EffortError, EffortWeights, print_effort, records_effort

    with _failing():
        weights = EffortWeights.parse(weight)
        if not 0 < iou <= 1:
            raise EffortError(f"--iou {iou}: use a number in (0, 1]")
        settings = _settings(label_studio_url=url, label_studio_api_key=api_key)
        with open_source(Source(project=project, model_version=model_version), settings) as opened:
            report = records_effort(opened.records, iou, weights)
    versions = report.model_versions
    print_effort(report, Console(width=160), title=f"project {project} ({', '.join(versions) or 'no predictions'})")
    saved = report.saved
    typer.echo(f"effort saved: {'n/a' if saved is None else f'{100 * saved:.1f} %'}")
    if json_path is not None:
        doc = {"project": project, "model_versions": versions} | report.as_dict()
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        typer.echo(f"numbers written to {json_path}")


@app.command()
def frames(
    source: Path = typer.Argument(..., help="A video, or a folder of videos (mp4, mov, mkv, webm, avi, m4v; subfolders too)."),
    out: Path = typer.Option(..., help="Folder for the kept frames (JPEG), frames.csv and videos.csv; `prelabel up OUT` labels them."),
    every: Optional[int] = typer.Option(None, help="Sample every N-th frame (default 1: every frame)."),
    fps: Optional[float] = typer.Option(None, help="Sample at most F frames per second of video time (instead of --every)."),
    method: str = typer.Option("phash", help="Near-duplicate measure: phash (perceptual hash) or embedding (the image encoder's)."),
    threshold: Optional[float] = typer.Option(None, help="Drop a frame this close to the last kept one: phash Hamming bits <= T (default 10 of 64), embedding cosine >= T (default 0.95)."),
    embedder: Optional[str] = typer.Option(None, help="--method embedding: the image encoder (hub id or directory: SAM, SAM 3, CLIP/SigLIP; default the segmenter)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Keep the frames worth labeling: sample a video's frames, drop near-duplicates and static stretches (each
    frame against the last one kept), write the kept ones as JPEG with frames.csv (video, frame, timestamp), ready
    for `prelabel up OUT`. Videos finished before are skipped; a bad video is reported and the others done."""
    from .video.decode import VideoLimits
    from .video.frames import EmbeddingSimilarity, PHash, Sampling, check_threshold, extract_frames, print_report

    _logging(verbose)
    with _failing():
        if every is not None and fps is not None:
            raise PrelabelError("--every and --fps both given: sample by frame count or by time, not both")
        sampling = Sampling(every if every is not None else 1, fps)
        threshold = check_threshold(method, threshold)
        settings = _settings(device=device)
        if method == "phash":
            measure = PHash(threshold)
        else:
            from .models import build_embedder, pick_device

            ref = embedder or settings.segmenter or settings.detector
            if not ref:
                raise PrelabelError("--method embedding needs an image encoder: pass --embedder (SAM, SAM 3, CLIP ...)")
            measure = EmbeddingSimilarity(build_embedder(ref, settings.model_dir, pick_device(settings.device)),
                                          threshold)
        report = extract_frames(source, out, measure, sampling, VideoLimits.from_settings(settings),
                                settings.max_video_bytes)
    print_report(report)
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def distill(
    project: Optional[int] = typer.Option(None, help="Label Studio project id: train on its annotated tasks."),
    coco: Optional[Path] = typer.Option(None, help="A COCO file of human annotations to train on."),
    images: Optional[Path] = typer.Option(None, help="--coco: the folder holding the images."),
    predictions: Optional[Path] = typer.Option(None, help="--coco: the teacher's predictions (COCO file or results list), evaluated beside the student."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: MODEL_DIR/students/project-ID or FILE); running again resumes there."),
    architecture: str = typer.Option("fcos-resnet18", help="Student architecture: fcos-resnet18 (torchvision FCOS, BSD-3-Clause)."),
    target: list[str] = typer.Option(None, "--target", help="Operating point of the student on the held-out images: precision=0.95, recall=0.8 or f1=0.9, or LABEL:precision=0.95 for one label (repeatable; a label's own wins); the model card states each threshold with P/R/F1 and 95% intervals. (A name without '=' is the old spelling of --architecture.)"),
    epochs: int = typer.Option(40, min=1, help="Epochs at most (early stop may end sooner)."),
    image_size: int = typer.Option(512, min=64, help="Square input size the student sees (images are letterboxed)."),
    batch_size: int = typer.Option(8, min=1, help="Images per step (small batches: more steps per epoch on CPU)."),
    lr: float = typer.Option(2e-3, min=0, help="Peak learning rate (AdamW, warm-up then cosine)."),
    patience: int = typer.Option(10, min=1, help="Stop after this many epochs without a better validation mAP."),
    time_limit: Optional[float] = typer.Option(None, min=0, help="Minutes: stop before an epoch would run past this."),
    seed: int = typer.Option(0, help="Seed of the split and of training."),
    val_fraction: float = typer.Option(0.2, min=0.01, max=0.99, help="Share of annotated images held out for validation."),
    accept_predictions: Optional[float] = typer.Option(None, min=0, max=1, help="Also train on predictions scoring at least this on images nobody annotated."),
    pretrained: str = typer.Option("auto", help="Backbone start: auto (ImageNet if cached or downloadable), imagenet, scratch."),
    export: bool = typer.Option(True, "--export/--no-export", help="Export ONNX (checked with ONNX Runtime) and time it."),
    restart: bool = typer.Option(False, "--restart", help="Ignore an earlier run's checkpoint in --out and start over."),
    model_version: Optional[str] = typer.Option(None, help="--project: the teacher's predictions of this model version (default: the project's)."),
    teacher: Optional[str] = typer.Option(None, help="Evaluate this detector (hub id or directory, e.g. Grounding DINO, OWLv2 or SAM 3) as the teacher on the held-out images, instead of stored predictions."),
    prompts: Optional[Path] = typer.Option(None, help="--teacher: its prompts file (labels without an entry are their own prompt)."),
    url: Optional[str] = typer.Option(None, help="Label Studio address (LABEL_STUDIO_URL)."),
    api_key: Optional[str] = typer.Option(None, help="Label Studio API key (LABEL_STUDIO_API_KEY)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for training (default: one per physical core)."),
    min_map: float = typer.Option(0.2, min=0, max=1, help="Quality gate: exit 3 when the student's validation mAP@0.5 is below this (0: off)."),
    min_vs_teacher: float = typer.Option(0.5, min=0, max=1, help="Quality gate: exit 3 when the student's validation mAP@0.5 is below this share of the teacher's (0: off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Train a small detector (the student) on the corrected labels, evaluate it and the teacher (its stored
    pre-annotations, or --teacher run now) on the same held-out images (COCO mAP), export ONNX and a model card;
    serve it with --detector student:OUT. Exit status 3: the student is kept but failed the quality gate."""
    from .distill import wait_passively

    wait_passively()  # before torch loads: its threads then sleep, not spin, when another program is busy
    from .cli_sources import Source, open_source
    from .distill.run import DistillOptions, TrainOptions, distill as run_distill, print_distill

    _logging(verbose)
    with _failing():
        source = Source(project, coco, None, images, predictions, model_version).check(("project", "coco"))
    for value in target or []:  # --target NAME: the architecture, as before --architecture
        if "=" not in value and value != "fcos-resnet18":
            raise _fail(PrelabelError(f"--target {value!r} is neither an operating point (e.g. precision=0.95) nor an "
                                      f"available student architecture; supported: fcos-resnet18"))
    if architecture != "fcos-resnet18":
        raise _fail(PrelabelError(f"--architecture {architecture!r} is not available; supported: fcos-resnet18"))
    targets = [value for value in target or [] if "=" in value]
    with _failing():
        from .operating import Targets

        Targets.parse(targets)  # a mistake fails before any data is read
    if pretrained not in ("auto", "imagenet", "scratch"):
        raise _fail(PrelabelError(f"--pretrained {pretrained!r}: use auto, imagenet or scratch"))
    train_options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed,
                                 time_limit_s=None if time_limit is None else time_limit * 60, threads=threads)
    options = DistillOptions(image_size=image_size, val_fraction=val_fraction, accept_predictions=accept_predictions,
                             pretrained=pretrained, export=export, resume=not restart, device=device or "auto",
                             min_map=min_map, min_vs_teacher=min_vs_teacher, train=train_options, targets=targets)
    with _failing():
        settings = _settings(label_studio_url=url, label_studio_api_key=api_key)
        teacher_engine = None
        if teacher is not None:  # boxes only: the student learns boxes
            from .engine import Engine

            teacher_engine = Engine.from_settings(_settings(detector=teacher, segmenter="", prompts=prompts, device=device))
        with open_source(source, settings) as opened:
            out = out or settings.model_dir / "students" / source.name
            report = run_distill(opened.records, opened.labels, opened.load, out, options, source.description,
                                 teacher=teacher_engine)
    print_distill(report)
    passed = report["quality"]["passed"]
    typer.echo(f"student, ONNX and model card in {out}" + (f"; serve it with: prelabel serve --detector student:{out}"
                                                            if passed else ""))
    if report["training"]["stopped"] == "interrupted":
        typer.secho("training was interrupted: the best epoch so far is exported; run the same command again to "
                    "resume", fg="yellow", err=True)
        raise typer.Exit(1)
    if not passed:
        typer.secho(report["quality"]["message"], fg="red", err=True)
        raise typer.Exit(3)


@app.command()
def fetch(
    prompts: Optional[Path] = typer.Option(None, help="Prompts file: its detector/segmenter/classifier are fetched."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory, or 'none'."),
    segmenter: Optional[str] = typer.Option(None, help="Segmenter: hub id, local directory, or 'none'."),
    classifier: Optional[str] = typer.Option(None, help="Classifier: hub id, local directory, or 'none'."),
    tracker: Optional[str] = typer.Option(None, help="Video tracker (fetched only when named): hub id, local directory, or 'none'."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Download the models once (into the hub cache, HF_HOME) so that later starts work offline."""
    from .models.loading import resolve_model
    from .ontology import PromptsFile
    from .engine import classifier_ref, model_refs

    _logging(verbose)
    with _failing():
        settings = _settings(prompts=prompts, detector=_segmenter_flag(detector), segmenter=_segmenter_flag(segmenter),
                             classifier=_segmenter_flag(classifier), tracker=_segmenter_flag(tracker))
        prompts_file = PromptsFile.load(settings.prompts)
        detector = model_refs(settings, prompts_file)[0]
        if detector:  # first: whether a default segmenter is wanted depends on what the detector is (SAM 3: none)
            typer.echo(f"detector: {detector} -> {resolve_model(detector, settings.model_dir)}")
        refs = {"segmenter": model_refs(settings, prompts_file)[1], "classifier": classifier_ref(settings, prompts_file),
                "tracker": tracker and settings.tracker}  # video only: not fetched unless named
        for kind, ref in refs.items():
            if ref:
                typer.echo(f"{kind}: {ref} -> {resolve_model(ref, settings.model_dir)}")


@cvat.command("spec")
def cvat_spec(
    prompts: Path = typer.Option(..., help="Prompts file whose labels the detector offers."),
    function_dir: Path = typer.Option(Path("cvat_nuclio/grounding_dino"), help="The detector function's folder."),
    shape: str = typer.Option("rectangle", help="What every label gets: rectangle, mask or polygon (masks by SAM)."),
):
    """Write the prompts file's labels into function.yaml / function-gpu.yaml and copy it beside them."""
    from .cvat.functions import write_function_spec

    with _failing():
        for path in write_function_spec(function_dir, prompts, shape):
            typer.echo(f"wrote {path}")


@cvat.command("track")
def cvat_track(
    task_id: int = typer.Argument(..., help="CVAT task id: a video, or a sequence of images."),
    url: str = typer.Option(..., envvar="CVAT_URL", help="CVAT address, e.g. http://localhost:8080 (CVAT_URL)."),
    token: Optional[str] = typer.Option(None, envvar="CVAT_ACCESS_TOKEN", help="CVAT personal access token (CVAT_ACCESS_TOKEN)."),
    user: Optional[str] = typer.Option(None, envvar="CVAT_USER", help="CVAT user name, with --password (CVAT_USER)."),
    password: Optional[str] = typer.Option(None, envvar="CVAT_PASSWORD", help="CVAT password (CVAT_PASSWORD)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file: labels (matched to the task's by name) and prompts."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory."),
    tracker: Optional[str] = typer.Option(None, help="Video tracker between detection frames: hub id, local directory, or 'none' (detector on every frame)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    replace: bool = typer.Option(False, "--replace", help="Replace the task's annotations (default: add the tracks to them)."),
    allow_unmatched_labels: bool = typer.Option(False, "--allow-unmatched-labels", help="Skip prompts labels the task lacks (default: an error)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Pre-annotate a CVAT video or frame-sequence task with tracks: one rectangle track per object (keyframes
    only where CVAT's interpolation needs them), uploaded in one request."""
    from .cvat.tracks import connect, cvat_errors, frames_bar, open_task, track_task
    from .engine import Engine
    from .ontology import PromptsFile

    _logging(verbose)
    warn = lambda line: typer.secho(line, fg="yellow", err=True)  # noqa: E731
    with _failing():
        settings = _settings(prompts=prompts, detector=detector, tracker=tracker, device=device, segmenter="")
        names = list(PromptsFile.load(settings.prompts).ontology().names)
        with cvat_errors(url, task_id), connect(url, token, user, password) as client:
            opened = open_task(client, task_id, names, allow_unmatched_labels, warn)  # before models load
            engine = Engine.from_settings(settings)
            with frames_bar(task_id) as bar:
                summary = track_task(opened, engine, settings.keyframe_tolerance, replace, bar)
    for line in summary.lines():
        typer.echo(line)


@cvat.command("follow")
def cvat_follow(
    url: str = typer.Option(..., envvar="CVAT_URL", help="CVAT address, e.g. http://localhost:8080 (CVAT_URL)."),
    token: Optional[str] = typer.Option(None, envvar="CVAT_ACCESS_TOKEN", help="CVAT personal access token (CVAT_ACCESS_TOKEN)."),
    user: Optional[str] = typer.Option(None, envvar="CVAT_USER", help="CVAT user name, with --password (CVAT_USER)."),
    password: Optional[str] = typer.Option(None, envvar="CVAT_PASSWORD", help="CVAT password (CVAT_PASSWORD)."),
    project: Optional[int] = typer.Option(None, help="Only the tasks of this CVAT project (default: every task the user sees)."),
    poll: float = typer.Option(10.0, help="Seconds between looks for new tasks."),
    no_poll: bool = typer.Option(False, "--no-poll", help="Take tasks from webhooks only (--listen): no task list is read."),
    listen: Optional[int] = typer.Option(None, help="Also take CVAT webhooks (create:task) on this port: POST /webhook."),
    host: str = typer.Option("127.0.0.1", help="--listen: the address to listen on (off loopback a --secret is required)."),
    secret: Optional[str] = typer.Option(None, envvar="CVAT_WEBHOOK_SECRET", help="The webhook's secret: X-Signature-256 is checked with it (CVAT_WEBHOOK_SECRET)."),
    force: bool = typer.Option(False, "--force", help="Pre-annotate new tasks that already have annotations too (added to them)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file: labels (matched to the task's by name) and prompts."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory."),
    tracker: Optional[str] = typer.Option(None, help="Video tasks: tracker between detection frames, or 'none'."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    shape: str = typer.Option("rectangle", help="Image tasks: rectangle, mask, polygon, or per label Car=mask,Person=rectangle."),
    allow_unmatched_labels: bool = typer.Option(False, "--allow-unmatched-labels", help="Skip prompts labels a task lacks (default: the task fails)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Pre-annotate new CVAT tasks as they are created, once each, until Ctrl-C: image tasks with the detector,
    video tasks as tracks. Done task ids are kept in MODEL_DIR/follow/, so a restart redoes nothing."""
    import threading

    from .cvat.follow import CvatAnnotator, Follower, TaskQueue, connector, follow_cvat, queue_path
    from .cvat.tracks import cvat_errors

    _logging(verbose)
    if not verbose:  # cvat-sdk's per-task steps (fetching, chunks, uploading): one line per task is printed instead
        logging.getLogger("cvat_sdk").setLevel(logging.WARNING)
    if poll <= 0:
        raise _fail(PrelabelError(f"--poll {poll}: give a positive number of seconds"))
    if no_poll and listen is None:
        raise _fail(PrelabelError("--no-poll takes tasks from webhooks only: give --listen PORT"))
    settings = _settings()
    warn = lambda line: typer.secho(line, fg="yellow", err=True)  # noqa: E731
    colours = {"done": "green", "skipped": None, "failed": "red"}
    report = lambda task_id, state, note: typer.secho(f"task {task_id}: {state}: {note}", fg=colours[state])  # noqa: E731
    stop = threading.Event()
    with _failing(), cvat_errors(url, "(any)"):
        queue = TaskQueue(queue_path(settings.model_dir, url))
        if retried := queue.retry_failed():
            typer.echo(f"{retried} tasks that failed before are queued again")
        annotate = CvatAnnotator(None if prompts is None else str(prompts), detector, _segmenter_flag(tracker), device,
                                 shape, allow_unmatched_labels, warn)
        follower = Follower(connector(url, token, user, password, settings.model_dir / "cache" / "cvat-sdk"), queue,
                            annotate, project, force, poll, discover=not no_poll, report=report)
        scope = f"project {project}" if project is not None else "every task this user sees"
        typer.echo(f"following {scope} at {url} (queue {queue.path}); Ctrl-C stops")
        try:
            follow_cvat(follower, stop, listen, host, secret, started=lambda at: typer.echo(f"webhooks: POST {at}"))
        except KeyboardInterrupt:
            stop.set()
        finally:
            queue.close()


prompts_app = typer.Typer(help="Prompt workbench: compare candidate prompts and detectors on corrected samples.",
                          no_args_is_help=True, rich_markup_mode=None)
app.add_typer(prompts_app, name="prompts")


@prompts_app.command("eval")
def prompts_eval(
    candidates: Path = typer.Option(..., help="Candidates file: labels -> candidate prompts, optional models (see prompts/candidates.example.yaml)."),
    project: Optional[int] = typer.Option(None, help="Label Studio project id: its annotated tasks are the ground truth."),
    coco: Optional[Path] = typer.Option(None, help="A COCO file of human annotations (the ground truth)."),
    images: Optional[Path] = typer.Option(None, help="--coco: the folder holding the images."),
    models: Optional[str] = typer.Option(None, help="Detectors to compare, comma-separated hub ids or directories (overrides the file's models:)."),
    detector: list[str] = typer.Option(None, "--detector", help="A detector (teacher) to compare, e.g. Grounding DINO and SAM 3: repeat it for each (with --models: added to them)."),
    out: Optional[Path] = typer.Option(None, help="report.json, prompts.yaml (the winners), curves/*.png (default: MODEL_DIR/workbench/NAME)."),
    cache: Optional[Path] = typer.Option(None, help="Prediction cache folder (default: MODEL_DIR/cache/workbench)."),
    min_score: float = typer.Option(0.05, min=0, max=1, help="Box threshold candidates run at (low, so the PR curve covers the range)."),
    text_threshold: float = typer.Option(0.25, min=0, max=1, help="Mean token score a prompt must reach (written into the winners' file)."),
    synonyms: int = typer.Option(0, min=0, help="Also evaluate each label's top N candidates together as synonyms (N >= 2)."),
    target: list[str] = typer.Option(None, "--target", help="Operating point: precision=0.95, recall=0.8 or f1=0.9 for every label, or LABEL:precision=0.95 for one (repeatable; a label's own wins). Thresholds then meet it with the most recall (or say it is not reached), with 95% intervals."),
    url: Optional[str] = typer.Option(None, help="Label Studio address (LABEL_STUDIO_URL)."),
    api_key: Optional[str] = typer.Option(None, help="Label Studio API key (LABEL_STUDIO_API_KEY)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model batch (PRELABEL_BATCH_SIZE)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Run every candidate prompt (and detector) on the annotated samples: per label AP, AP50 and the best score
    threshold, PR curves, a JSON report and the winning prompts file; with several detectors, per label the better
    teacher and its best prompt. Outputs are cached: a re-run computes nothing."""
    from .cli_sources import Source, open_source
    from .workbench import DetectParams, evaluate_prompts, print_workbench

    _logging(verbose)
    with _failing():
        source = Source(project, coco, None, images).check(("project", "coco"))
        settings = _settings(device=device, batch_size=batch_size, label_studio_url=url, label_studio_api_key=api_key)
        with open_source(source, settings) as opened:
            out = out or settings.model_dir / "workbench" / source.name
            params = DetectParams(min_score, text_threshold, max_detections=settings.max_detections)
            report = evaluate_prompts(opened.records, candidates, out, settings, models, cache, opened.images, params,
                                      synonyms, detectors=detector, targets=target)
    print_workbench(report)
    typer.echo(f"detector runs: {report.computed} computed, {report.cached} from the cache")
    typer.echo(f"winning prompts: {report.outputs['prompts']}; report: {report.outputs['report']}; "
               f"PR curves: {report.outputs['curves']}")


@dev.command("tiny-models")
def tiny_models(
    out_dir: Path = typer.Argument(..., help="Writes OUT_DIR/detector, OUT_DIR/segmenter and OUT_DIR/<kind>."),
    kind: list[str] = typer.Option(None, "--kind", help="Only these kinds (repeatable); default: every registered one."),
):
    """Write tiny randomly initialised models (offline) for tests and CI: the default detector and segmenter, and one
    of every registered model kind (grounding-dino, owlv2, sam, clip, student, ...)."""
    from .models.tiny import write_tiny_kinds, write_tiny_models

    try:
        refs = write_tiny_kinds(out_dir, kind or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kind") from None
    if not kind:
        refs = {**{k: str(p) for k, p in write_tiny_models(out_dir).items()}, **refs}
    for name, ref in refs.items():
        typer.echo(f"{name}: {ref}")


if __name__ == "__main__":
    app()
