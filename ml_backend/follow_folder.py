"""`prelabel annotate FOLDER --out DIR --follow`: folder mode, then the images added to the folder later, as they
arrive (polling: no inotify, so any file system and mounted bucket works).

Only complete files are taken. A file that decodes fully when first seen (written elsewhere and renamed in, as
copy tools and uploaders do) is taken at once; one that does not (still being copied, or truncated) waits: it is
tried again on each poll where it has stopped changing, and given up, reported, after `incomplete_tries` such polls
or `incomplete_seconds` without a change. A given-up file that changes later is tried again.

The outputs are folder mode's, appended to: a journal line per image (what a restart skips: nothing is done twice),
and `tasks.json`/`coco.json` rewritten atomically after each batch, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import PIL.Image

from .errors import ConfigError
from .runner import Report

if TYPE_CHECKING:
    from .labelstudio.backend import LabelStudioBackend

log = logging.getLogger(__name__)

INCOMPLETE_TRIES = 5  # polls without a change on which a file still does not decode, before it is given up
INCOMPLETE_SECONDS = 60.0  # seconds without a change after which a file that does not decode is given up


def decodes(path: Path) -> str | None:
    """None when `path` decodes fully as an image, else why not."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
        return None
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError ... on truncated or foreign bytes
        return f"{type(exc).__name__}: {exc}"


@dataclass
class Waiting:
    """A file seen but not taken: its (size, mtime) when last polled."""

    stat: tuple[int, int]
    changed: float  # when its stat last changed (or it appeared)
    tries: int = 0  # polls without a change on which it did not decode
    given_up: bool = False


@dataclass
class Arrivals:
    """Which image files below `folder` are new and complete, poll after poll. `taken` holds the keys (paths
    relative to `root`) of files already done or handed out: they are never offered again."""

    folder: Path
    root: Path
    taken: set[str]
    tries: int = INCOMPLETE_TRIES
    seconds: float = INCOMPLETE_SECONDS
    clock: Callable[[], float] = time.monotonic
    waiting: dict[str, Waiting] = field(default_factory=dict)

    def key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def poll(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """(files complete now, to be taken; files given up now, with why)."""
        from .labelstudio.annotate import image_files

        now, ready, given_up, present = self.clock(), [], [], set()
        for path in image_files(self.folder):
            key = self.key(path)
            if key in self.taken:
                continue
            present.add(key)
            try:
                info = path.stat()
            except OSError:  # gone between listing and stat
                continue
            stat = (info.st_size, info.st_mtime_ns)
            seen = self.waiting.get(key)
            if seen is not None and seen.stat != stat:  # still growing, or rewritten since it was given up
                self.waiting[key] = Waiting(stat, now)
                continue
            if seen is not None and seen.given_up:
                continue
            problem = decodes(path)
            if problem is None:
                self.waiting.pop(key, None)
                self.taken.add(key)
                ready.append(path)
            elif seen is None:  # first sight: maybe still being written
                self.waiting[key] = Waiting(stat, now)
            else:
                seen.tries += 1
                if seen.tries >= self.tries or now - seen.changed >= self.seconds:
                    seen.given_up = True
                    given_up.append((path, f"{path.relative_to(self.folder).as_posix()} does not decode as an image after {seen.tries} polls "
                                           f"and {now - seen.changed:.0f} s without a change ({problem}); it is "
                                           f"tried again if it changes"))
        for key in set(self.waiting) - present:  # removed
            del self.waiting[key]
        return sorted(ready), given_up

    @property
    def pending(self) -> int:
        return sum(not w.given_up for w in self.waiting.values())


@dataclass
class FollowStatus:
    done: int  # this run
    queued: int  # taken but not done yet, or waiting to be complete
    failed: int
    rate: float  # images per second while working (waiting for arrivals left out)
    total_done: int  # in the outputs, earlier runs included

    def line(self) -> str:
        return (f"following: {self.done} done ({self.total_done} in the outputs), {self.queued} queued, "
                f"{self.failed} failed, {self.rate:.2f} img/s")


class LiveLine:
    """One status line on stderr, rewritten in place on a terminal (printed only when it changes elsewhere)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.last, self.key = "", None

    def __call__(self, text: str, key=None) -> None:
        """Show `text`; off a terminal only when `key` (default: the text) changed."""
        key = text if key is None else key
        if text == self.last or (not self.stream.isatty() and key == self.key):
            return
        self.last, self.key = text, key
        if self.stream.isatty():
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (a failure), above the status line."""
        self.stream.write(("\r\033[K" if self.stream.isatty() else "") + text + "\n")
        if self.stream.isatty() and self.last:
            self.stream.write(self.last)
        self.stream.flush()

    def close(self) -> None:
        if self.stream.isatty() and self.last:
            self.stream.write("\n")
            self.stream.flush()


def follow_folder(
    folder: Path,
    out_dir: Path,
    backend: LabelStudioBackend,
    batch_size: int = 4,
    url_prefix: str | None = None,
    poll: float = 2.0,
    incomplete_tries: int = INCOMPLETE_TRIES,
    incomplete_seconds: float = INCOMPLETE_SECONDS,
    stop: threading.Event | None = None,
    status: Callable[[FollowStatus], None] | None = None,
    failure: Callable[[str], None] | None = None,
) -> Report:
    """Pre-annotate the images below `folder` into `out_dir` as folder mode does (`annotate_folder`), then keep
    polling every `poll` seconds for images added later, until `stop` is set or Ctrl-C. `status` gets the progress
    after every poll and batch; `failure` each image that failed, as it fails."""
    from . import coco
    from .labelstudio.annotate import (RUN_LOGGERS, _assemble, _read_journal, by_file, local_files_ref,
                                       start_folder_run)
    from .media import MediaItem
    from .runner import listed_after_the_run

    if poll <= 0:
        raise ConfigError(f"--poll {poll}: give a positive number of seconds")
    if backend.settings.local_files_document_root is not None and not folder.resolve().is_dir():
        raise ConfigError(f"{folder.resolve()} is not a folder")
    stop = stop or threading.Event()
    folder, root, out, config, ontology, version = start_folder_run(folder, out_dir, backend)
    records = _read_journal(out.journal, version)
    arrivals = Arrivals(folder, root, set(records), incomplete_tries, incomplete_seconds)
    report = Report(skipped={"already predicted": len(records)}, model_version=version)
    started, working = time.perf_counter(), 0.0
    queued: list[Path] = []

    def tell() -> None:
        report.seconds = time.perf_counter() - started
        if status is not None:
            status(FollowStatus(report.done, len(queued) + arrivals.pending, len(report.failed),
                                report.done / working if working else 0.0, len(records)))

    def assemble() -> None:
        temporary = type(out)(out.tasks.with_name(".tasks.json.tmp"), out.coco.with_name(".coco.json.tmp"),
                              out.label_config, out.journal)
        _assemble(temporary, records, [root / key for key in sorted(records)], root, ontology.names, url_prefix)
        os.replace(temporary.tasks, out.tasks)
        os.replace(temporary.coco, out.coco)

    def fail(entry: dict) -> None:
        report.failed.append(entry)
        if failure is not None:
            failure(entry["error"]["message"])

    def run_batch(paths: list[Path], journal) -> None:
        tasks = [{"id": i, "data": {"image": local_files_ref(p, root)}} for i, p in enumerate(paths)]
        annotations: dict[int, tuple[int, int, list[dict]]] = {}

        def on_image(i: int, key: str, image: MediaItem, detections) -> None:
            annotations[i] = (image.width, image.height,
                              coco.annotations(detections, 0, ontology.names, width=image.width, height=image.height))

        loaded = backend.load_tasks(tasks, config)
        entries = backend.infer(loaded, config, ontology, version, on_image=on_image)
        for i, (task, entry) in enumerate(zip(tasks, entries)):
            key = arrivals.key(paths[task["id"]])
            if "error" in entry:
                fail(by_file(entry, task, paths[task["id"]].relative_to(folder).as_posix()))
                continue
            width, height, anns = annotations[i]
            records[key] = {"file": key, "model_version": version, "width": width, "height": height,
                            "prediction": entry, "coco": anns}
            journal.write(json.dumps(records[key]) + "\n")
            report.done += 1
        journal.flush()
        assemble()

    try:
        with out.journal.open("a") as journal, listed_after_the_run(*RUN_LOGGERS):
            assemble()  # the outputs of earlier runs, also when nothing new arrives
            while not stop.is_set():
                ready, given_up = arrivals.poll()
                for path, why in given_up:
                    fail({"task": path.relative_to(folder).as_posix(), "error": {"kind": "image_decode", "message": why}})
                queued += ready
                report.total += len(ready)
                tell()
                while queued and not stop.is_set():
                    batch, begun = queued[:batch_size], time.perf_counter()
                    run_batch(batch, journal)
                    del queued[:len(batch)]
                    working += time.perf_counter() - begun
                    tell()
                stop.wait(poll)
    except KeyboardInterrupt:
        pass  # what was journaled stays; a restart takes the rest
    tell()
    report.outputs = {k: str(v) for k, v in vars(out).items()}
    return report


def run_follow_folder(folder: Path, out: Path | None, overrides: dict, url_prefix: str | None = None,
                      poll: float = 2.0, incomplete_tries: int = INCOMPLETE_TRIES,
                      incomplete_seconds: float = INCOMPLETE_SECONDS, stop: threading.Event | None = None,
                      status: Callable[[FollowStatus], None] | None = None,
                      failure: Callable[[str], None] | None = None) -> tuple[Report, Path]:
    """`prelabel annotate FOLDER --out DIR --follow`: the settings as `run_annotate` builds them for folder mode.
    Returns the report and where it goes."""
    from .engine import Engine
    from .labelstudio.backend import LabelStudioBackend
    from .settings import Settings

    if out is None:
        raise ConfigError("folder mode needs --out DIR")
    if incomplete_tries < 1 or incomplete_seconds <= 0:
        raise ConfigError(f"--incomplete-tries {incomplete_tries} / --incomplete-seconds {incomplete_seconds}: "
                          f"give at least 1 try and a positive number of seconds")
    given = {k: v for k, v in overrides.items() if v is not None}
    given.setdefault("local_files_document_root",
                     Settings().local_files_document_root or folder.expanduser().resolve().parent)
    settings = Settings(**given)
    backend = LabelStudioBackend.for_batch(Engine.from_settings(settings))
    report = follow_folder(folder.expanduser(), out, backend, settings.batch_size, url_prefix, poll,
                           incomplete_tries, incomplete_seconds, stop, status, failure)
    return report, out / "report.json"
