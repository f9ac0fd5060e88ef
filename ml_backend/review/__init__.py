"""Review adapter (FiftyOne): neutral records -> a persistent dataset with `prelabel` and `ground_truth`, embeddings
and their map, likely mistakes (evaluation, mistakenness, cleanlab), label statistics, saved views, and the list of
flagged samples with their links back to the labeling tool; `review_folder` runs it all into one folder
(`flagged.json`, plots, image cache), `review_embedder` picks the model that embeds. Consumes only `LabeledImage`
records; links back to a tool are followed by that tool's adapter (e.g. `labelstudio.views`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..media import ImageSource
from ..settings import Settings
from ..types import LabeledImage
from .dataset import GT, PRED, BuildReport, build_dataset, configure_fiftyone
from .stats import STATISTICS_FILE, LabelStats, label_stats, print_stats, save_plots, save_statistics

log = logging.getLogger(__name__)

VIEWS = ("likely mistakes", "missed by the model", "near duplicates")
APP_ADDRESS, APP_PORT = "127.0.0.1", 5151
FLAGGED_FILE = "flagged.json"
DUPLICATES_INFO = "near_duplicates"  # dataset.info key: the near-duplicate groups (sample keys) last found

__all__ = ["ReviewReport", "run_review", "review_folder", "review_embedder", "launch_app", "configure_fiftyone",
           "VIEWS"]


@dataclass
class Flagged:
    key: str
    link: str | None
    reasons: list[str]


@dataclass
class ReviewReport:
    dataset: str
    build: BuildReport
    stats: LabelStats
    evaluation: dict = field(default_factory=dict)  # per class precision/recall/f1/support
    flagged: list[Flagged] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of keys
    views: dict[str, int] = field(default_factory=dict)  # saved view -> samples
    visualization: str | None = None  # method used for the object map
    plots: list[Path] = field(default_factory=list)
    statistics: Path | None = None  # the label statistics as JSON, beside the plots


def _save_views(dataset, duplicate_ids: list[str]) -> dict[str, int]:
    from fiftyone import ViewField as F

    views = {
        "likely mistakes": dataset.match(F("label_issues") > 0).sort_by("label_quality"),
        "missed by the model": dataset.filter_labels(GT, F("eval") == "fn")
        if dataset.has_field(f"{GT}.detections.eval") else dataset.limit(0),
        "near duplicates": dataset.select(duplicate_ids),
    }
    if not dataset.has_field("label_issues"):
        views["likely mistakes"] = dataset.limit(0)
    counts = {}
    for name, view in views.items():
        if dataset.has_saved_view(name):
            dataset.delete_saved_view(name)
        dataset.save_view(name, view)
        counts[name] = len(view)
    return counts


def run_review(records: list[LabeledImage], name: str, cache_dir: Path, loader: ImageSource | None = None,
               embedder=None, plots_dir: Path | None = None, viz_method: str = "umap",
               overwrite: bool = False, prune: bool = False, console=None) -> ReviewReport:
    """Build or refresh dataset `name` from `records` and run every check. `embedder` (an `EncoderEmbedder`) enables
    the object map, uniqueness and near duplicates."""
    from . import mistakes

    dataset, build = build_dataset(records, name, cache_dir, loader, overwrite, prune)
    stats = label_stats(records)
    report = ReviewReport(dataset=name, build=build, stats=stats)
    if console is not False:
        print_stats(stats, console)
    if plots_dir is not None:
        report.plots = save_plots(stats, plots_dir)
        report.statistics = save_statistics(stats, plots_dir / STATISTICS_FILE)
    report.evaluation = mistakes.evaluate(dataset)
    mistakes.mistakenness(dataset)
    mistakes.store_label_issues(dataset)
    if embedder is not None:
        from .embeddings import compute_embeddings, image_level, visualize

        fields = tuple(f for f in (GT, PRED) if dataset.has_field(f))
        images, patches = compute_embeddings(dataset, embedder, fields)
        report.visualization = visualize(dataset, GT, patches[GT], viz_method) if GT in patches else None
        if PRED in patches:
            visualize(dataset, PRED, patches[PRED], viz_method)
        groups = image_level(dataset, images)
        key_of = dict(zip(dataset.values("id"), dataset.values("key")))
        report.duplicates = [[key_of[i] for i in g] for g in groups]
        dataset.info[DUPLICATES_INFO] = report.duplicates
        dataset.save()
    else:  # a refresh without embeddings keeps the groups an earlier run found (of the samples still there)
        keys = set(dataset.values("key"))
        report.duplicates = [g for g in ([k for k in g if k in keys] for g in dataset.info.get(DUPLICATES_INFO, []))
                             if len(g) > 1]
    id_of = dict(zip(dataset.values("key"), dataset.values("id")))
    duplicate_ids = sorted({id_of[k] for g in report.duplicates for k in g})
    report.views = _save_views(dataset, duplicate_ids)
    reasons: dict[str, list[str]] = {}
    for view_name in VIEWS:
        for key in dataset.load_saved_view(view_name).values("key"):
            reasons.setdefault(key, []).append(view_name)
    links = dict(zip(dataset.values("key"), dataset.values("task_link")))
    report.flagged = [Flagged(k, links.get(k), r) for k, r in sorted(reasons.items())]
    return report


def review_embedder(settings: Settings, model: str | None = None, engine=None):
    """What embeds images and objects: `model` when given (any registered image encoder: CLIP/SigLIP, SAM, SAM 3),
    else the engine's own encoder (`make_embedder`: SAM 3 when it is the detector, else the segmenter's SAM, else the
    detector's backbone), the models as the engine picks them (flags, then the prompts file). `engine`: models
    already loaded, used as they are (SAM 3 is never loaded twice)."""
    from ..engine import model_refs
    from ..models import ImageEncoder, UnloadedModel, build_detector, build_segmenter, model_id, pick_device
    from ..ontology import PromptsFile
    from .embeddings import ClipEmbedder, Embedder, make_embedder

    loaded = [m for m in (engine.detector, engine.segmenter) if m is not None and not isinstance(m, UnloadedModel)
              ] if engine is not None else []
    if model:
        wanted = model_id(model, settings.model_dir)
        same = next((m for m in loaded if m.model_id == wanted and isinstance(m, ImageEncoder)), None)
        if same is not None:
            return Embedder(same)
        return ClipEmbedder(model, settings.model_dir, pick_device(settings.device))
    if engine is not None:
        return make_embedder(segmenter=engine.segmenter, detector=engine.detector)
    detector, segmenter = model_refs(settings, PromptsFile.load(settings.prompts))
    device = pick_device(settings.device)
    options = dict(precision=settings.precision)
    if detector and (not segmenter or segmenter == detector or _segments(detector, settings.model_dir)):
        # SAM 3 (the teacher's own encoder, one load whether or not it is the segmenter too), or no SAM at all
        return make_embedder(detector=build_detector(detector, settings.model_dir, device, **options))
    if segmenter:
        return make_embedder(segmenter=build_segmenter(segmenter, settings.model_dir, device, **options))
    return make_embedder()  # no model at all: the error says what to give


def _segments(detector: str, model_dir: Path) -> bool:
    """Does `detector` make its own masks (SAM 3)? Asked of its files only where they are here already: nothing is
    downloaded for the question (a model not here is built by the role that needs it)."""
    from huggingface_hub import try_to_load_from_cache

    from ..models import model_kind
    from ..models.registry import DETECTOR

    local = (Path(detector).expanduser(), model_dir / detector, model_dir / detector.rstrip("/").split("/")[-1])
    if not any(p.exists() for p in local):
        try:
            if not isinstance(try_to_load_from_cache(detector, "config.json"), str):
                return False
        except ValueError:  # not a hub id (e.g. student:DIR): no masks of its own
            return False
    return bool(getattr(model_kind(detector, model_dir, DETECTOR), "gives_masks", False))


def review_folder(records: list[LabeledImage], name: str, out: Path, loader: ImageSource | None = None,
                  embedder=None, viz_method: str = "umap", prune: bool = False) -> ReviewReport:
    """`run_review` with its files under `out`: the image cache (`images/`), the plots and the label statistics
    (`plots/*.png`, `plots/statistics.json`), and `flagged.json` (the dataset, each flagged sample's key, link and
    reasons, and the near-duplicate groups)."""
    out.mkdir(parents=True, exist_ok=True)
    report = run_review(records, name, out / "images", loader, embedder, plots_dir=out / "plots",
                        viz_method=viz_method, prune=prune)
    flagged = [{"key": f.key, "link": f.link, "reasons": f.reasons} for f in report.flagged]
    (out / FLAGGED_FILE).write_text(json.dumps({"dataset": name, "flagged": flagged,
                                                "duplicates": report.duplicates}, indent=2) + "\n")
    return report


def print_report(report: ReviewReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if report.evaluation:
        table = Table(title="prelabel vs ground_truth (IoU 0.5)")
        for col in ("class", "precision", "recall", "f1", "support"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for cls, m in report.evaluation.items():
            if isinstance(m, dict) and "precision" in m:
                table.add_row(cls, f"{m['precision']:.2f}", f"{m['recall']:.2f}", f"{m['f1-score']:.2f}",
                              str(int(m["support"])))
        console.print(table)
    console.print("views: " + ", ".join(f"{n!r} {c}" for n, c in report.views.items()))
    for f in report.flagged:
        console.print(f"  {f.key}: {', '.join(f.reasons)}  {f.link or ''}")


def open_app(name: str, address: str = APP_ADDRESS, port: int = APP_PORT):
    """The FiftyOne App serving dataset `name` (with its saved views) on `address:port`; returns its session."""
    import fiftyone as fo

    return fo.launch_app(fo.load_dataset(name), address=address, port=port, remote=True)


def launch_app(name: str, address: str = APP_ADDRESS, port: int = APP_PORT) -> None:
    """Serve the FiftyOne App on `address:port` until interrupted."""
    open_app(name, address, port).wait(-1)
