"""Label statistics of the human annotations: objects and images per class, imbalance, box sizes, labels per image;
printed as a rich table and saved as PNG plots."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..types import LabeledImage

log = logging.getLogger(__name__)

STATISTICS_FILE = "statistics.json"


@dataclass
class LabelStats:
    images: int = 0
    annotated: int = 0
    objects: Counter = field(default_factory=Counter)  # class -> objects
    images_per_class: Counter = field(default_factory=Counter)  # class -> images holding it
    box_areas: dict[str, list[float]] = field(default_factory=dict)  # class -> sqrt(relative area) per box
    labels_per_image: list[int] = field(default_factory=list)  # annotated images only
    rare: list[str] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        """Most common class's object count over the rarest's (1.0 when balanced)."""
        counts = [c for c in self.objects.values() if c]
        return max(counts) / min(counts) if counts else 1.0


def label_stats(records: list[LabeledImage], rare_fraction: float = 0.05, rare_count: int = 10) -> LabelStats:
    """Stats of the annotations. A class is rare with under `rare_fraction` of the objects or under `rare_count`."""
    stats = LabelStats(images=len(records))
    for r in records:
        if r.annotations is None:
            continue
        stats.annotated += 1
        names = [str(n) for n in r.annotations.data.get("class_name", [])]
        stats.labels_per_image.append(len(names))
        stats.objects.update(names)
        stats.images_per_class.update(set(names))
        if r.width and r.height and len(names):
            wh = r.annotations.xyxy[:, 2:] - r.annotations.xyxy[:, :2]
            for name, (w, h) in zip(names, wh):
                stats.box_areas.setdefault(name, []).append(float(np.sqrt(max(w * h, 0) / (r.width * r.height))))
    total = sum(stats.objects.values())
    stats.rare = sorted(c for c, n in stats.objects.items() if n < rare_count or n < rare_fraction * total)
    return stats


def print_stats(stats: LabelStats, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Label statistics (human annotations)")
    for col in ("class", "objects", "images", "median box size", "rare"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, n in stats.objects.most_common():
        areas = stats.box_areas.get(name) or [np.nan]
        table.add_row(name, str(n), str(stats.images_per_class[name]), f"{np.median(areas):.1%}",
                      "yes" if name in stats.rare else "")
    console.print(table)
    console.print(f"{stats.annotated} of {stats.images} images annotated, {sum(stats.objects.values())} objects, "
                  f"imbalance {stats.imbalance:.1f}x (most / least common class)")
    if stats.labels_per_image:
        lpi = np.array(stats.labels_per_image)
        console.print(f"labels per image: min {lpi.min()}, median {np.median(lpi):g}, max {lpi.max()}")
    for name in stats.rare:
        console.print(f"[yellow]warning:[/yellow] class {name!r} is rare ({stats.objects[name]} objects): "
                      "label more examples or expect a weak model on it")


def save_plots(stats: LabelStats, out_dir: Path) -> list[Path]:
    """objects_per_class.png, images_per_class.png, box_sizes.png, labels_per_image.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in stats.objects.most_common()]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    for counter, name, title in ((stats.objects, "objects_per_class.png", "Objects per class"),
                                 (stats.images_per_class, "images_per_class.png", "Images per class")):
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5))
        ax.bar(names, [counter[n] for n in names], color=["tab:red" if n in stats.rare else "tab:blue" for n in names])
        ax.set_title(f"{title} (imbalance {stats.imbalance:.1f}x; red = rare)")
        ax.tick_params(axis="x", rotation=45)
        save(fig, name)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5))
    if names:
        ax.boxplot([stats.box_areas.get(n) or [0.0] for n in names])
        ax.set_xticks(range(1, len(names) + 1), names, rotation=45)
    ax.set_ylabel("sqrt(box area / image area)")
    ax.set_title("Box size per class")
    save(fig, "box_sizes.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lpi = stats.labels_per_image or [0]
    ax.hist(lpi, bins=np.arange(0, max(lpi) + 2) - 0.5)
    ax.set_xlabel("labels per image")
    ax.set_ylabel("images")
    ax.set_title("Labels per image")
    save(fig, "labels_per_image.png")
    return written


def statistics_dict(stats: LabelStats) -> dict:
    """What the plots show, as numbers: per class objects, images, rare, box sizes (sqrt of the relative area:
    min, median, max); imbalance; labels per image (min, median, max and the count of images per number)."""
    def summary(values) -> dict:
        return {k: round(float(f(values)), 4) for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}

    lpi = stats.labels_per_image
    return {
        "images": stats.images, "annotated": stats.annotated, "objects": sum(stats.objects.values()),
        "imbalance": stats.imbalance, "rare": stats.rare,
        "classes": {name: {"objects": n, "images": stats.images_per_class[name], "rare": name in stats.rare,
                           "box_size": summary(stats.box_areas[name]) if stats.box_areas.get(name) else None}
                    for name, n in stats.objects.most_common()},
        "labels_per_image": summary(lpi) | {"histogram": {str(k): v for k, v in sorted(Counter(lpi).items())}}
        if lpi else None,
    }


def save_statistics(stats: LabelStats, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(statistics_dict(stats), indent=2) + "\n")
    return path
