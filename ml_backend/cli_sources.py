"""The command line's one way to name where labelled records come from, `--project ID` (Label Studio),
`--coco FILE --images DIR [--predictions FILE]` or `--cvat FILE --images DIR` (CVAT XML or CVAT's COCO), and to
open it as neutral records. It composes the adapters (Label Studio, CVAT) with the core's COCO reader, so it is
part of the CLI: the core never imports it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import coco
from .errors import PrelabelError
from .media import ImageSource, record_image
from .settings import Settings
from .types import LabeledImage

KINDS = {"project": "--project ID", "coco": "--coco FILE --images DIR", "cvat": "--cvat FILE --images DIR"}


def _either(options: list[str]) -> str:
    """'a or b', 'a, b, or c'."""
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + ("," if len(options) > 2 else "") + \
        " or " + options[-1]


@dataclass(frozen=True)
class Source:
    """Where records come from, as the flags name it; `model_version` picks a project's predictions."""

    project: int | None = None
    coco: Path | None = None
    cvat: Path | None = None
    images: Path | None = None
    predictions: Path | None = None
    model_version: str | None = None

    def check(self, kinds: tuple[str, ...] = tuple(KINDS)) -> Source:
        """Exactly one of `kinds` given, and the image folder a file needs; else an error naming the choices."""
        if sum(getattr(self, k) is not None for k in KINDS) != 1 or all(getattr(self, k) is None for k in kinds):
            raise PrelabelError(f"give one source: {_either([KINDS[k] for k in kinds])}")
        if self.project is None and self.images is None:
            files = [f"--{k}" for k in kinds if k != "project"]
            verb = "need" if len(files) > 1 else "needs"
            raise PrelabelError(f"{' and '.join(files)} {verb} --images DIR (the folder holding the images)")
        return self

    @property
    def file(self) -> Path | None:
        return self.coco or self.cvat

    @property
    def name(self) -> str:
        """A default name for what is made from it: `project-ID`, else the file's stem."""
        return f"project-{self.project}" if self.project is not None else self.file.stem

    @property
    def description(self) -> str:
        if self.project is not None:
            return f"Label Studio project {self.project}"
        return f"COCO file {self.coco}" if self.coco is not None else f"CVAT export {self.cvat}"


@dataclass
class Opened:
    """An opened source: its records, the image source that resolves their references (Label Studio's; None when
    the records name local files) and, for a project, the Label Studio client."""

    source: Source
    settings: Settings
    records: list[LabeledImage]
    images: ImageSource | None = None
    client: object = field(default=None, repr=False)

    @cached_property
    def labels(self) -> list[str]:
        """The label set: the project's label config, the COCO categories, or the CVAT task's labels."""
        s = self.source
        if s.project is not None:
            from .labelstudio.annotate import open_project
            from .labelstudio.config import parse_config

            return list(parse_config(open_project(self.client, s.project).label_config).labels)
        if s.cvat is not None and s.cvat.suffix.lower() == ".xml":
            from .cvat.records import cvat_xml_labels

            return cvat_xml_labels(s.cvat)
        return coco.category_names(coco.read(s.file))

    def load(self, record: LabeledImage) -> np.ndarray:
        """A record's image as the server loads it (`media.record_image`: pixel limit, EXIF orientation)."""
        return record_image(record, self.images, self.settings.max_image_pixels)


@contextmanager
def open_source(source: Source, settings: Settings) -> Iterator[Opened]:
    """The records of `source`; a project is read through Label Studio (address and key from `settings`), its
    images fetched through Label Studio's image source, closed on exit."""
    if source.project is not None:
        from .labelstudio.annotate import label_studio_client
        from .labelstudio.images import LabelStudioImageSource
        from .labelstudio.records import project_records

        client = label_studio_client(settings)
        records = project_records(client, source.project, settings.label_studio_url, source.model_version)
        opened = Opened(source, settings, records, LabelStudioImageSource(settings), client)
    elif source.cvat is not None and source.cvat.suffix.lower() == ".xml":
        from .cvat.records import cvat_xml_records

        opened = Opened(source, settings, cvat_xml_records(source.cvat, source.images))
    else:
        opened = Opened(source, settings, coco.read_records(source.file, source.images, source.predictions))
    try:
        yield opened
    finally:
        if opened.images is not None:
            opened.images.close()
