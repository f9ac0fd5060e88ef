"""Batches through a model with the next batches' images fetched while the model runs, a progress bar (done/total,
images per second, ETA), and a report of what failed. Engines (local, Ray) and adapters plug in the callables."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


@dataclass
class Report:
    """What a run did: `failed` holds `{"task", "error": {"kind", "message"}}` per task that could not be done."""

    total: int = 0  # tasks this run set out to do
    done: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # why -> count, for tasks not attempted
    failed: list[dict] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    model_version: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    last_task_id: int = 0  # the highest task id listed (following a project: where the next look starts)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def add(self, tasks: list, entries: list[dict]) -> None:
        for entry in entries:
            if "error" in entry:
                self.failed.append(entry)
            else:
                self.done += 1

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self) | {"ok": self.ok}, indent=2))

    def summary(self) -> str:
        skipped = ", ".join(f"{n} skipped ({why})" for why, n in self.skipped.items() if n)
        rate = self.done / self.seconds if self.seconds else 0.0
        parts = [f"{self.done} of {self.total} tasks pre-annotated in {self.seconds:.0f} s ({rate:.2f}/s)",
                 f"{len(self.failed)} failed"] + ([skipped] if skipped else [])
        return "; ".join(parts) + ("; interrupted: run the same command again to finish" if self.interrupted else "")


def progress_bar(label: str):
    """Done/total, images per second and ETA from the average rate since the start (rich's own speed estimate
    needs several updates within 30 s, which slow models on CPU do not give)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class RateAndEta(ProgressColumn):
        def render(self, task) -> Text:
            rate = task.completed / task.elapsed if task.elapsed and task.completed else 0.0
            if not rate:
                return Text("-- img/s  ETA --")
            left = max(0.0, (task.total or 0) - task.completed) / rate
            return Text(f"{rate:.2f} img/s  ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), RateAndEta(),
                    transient=False)


@contextmanager
def listed_after_the_run(*loggers: str) -> Iterator[None]:
    """While the block runs, warnings and errors that `loggers` (e.g. the engine's, naming a failed image) log from
    this thread are dropped: the run lists each failure once, from its report, after the progress bar. Other
    threads (a server answering meanwhile) and DEBUG logging (--verbose: tracebacks too) keep them."""
    thread = threading.get_ident()

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or record.thread != thread

    quiet = [log for log in map(logging.getLogger, loggers) if not log.isEnabledFor(logging.DEBUG)]
    for log in quiet:
        log.addFilter(keep)
    try:
        yield
    finally:
        for log in quiet:
            log.removeFilter(keep)


def chunks(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batches(
    batches: Iterable[list],
    load: Callable[[list], Any],
    infer: Callable[[Any], list[dict]],
    sink: Callable[[list, list[dict]], None],
    report: Report,
    prefetch: int = 2,
    label: str = "pre-annotating",
) -> Report:
    """For each batch: `load` (in background threads, `prefetch` batches ahead), `infer` (here), `sink` (here,
    e.g. push to Label Studio). Ctrl-C stops the run: what was sunk stays, the next run does the rest."""
    started = time.perf_counter()
    pending: deque = deque()
    source = iter(batches)
    pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="prefetch")

    def submit() -> None:
        batch = next(source, None)
        if batch:
            pending.append((batch, pool.submit(load, batch)))

    try:
        with progress_bar(label) as progress:
            bar = progress.add_task(label, total=report.total)
            for _ in range(max(1, prefetch)):
                submit()
            while pending:
                batch, loading = pending.popleft()
                loaded = loading.result()
                submit()  # the next batch loads while this one runs
                entries = infer(loaded)
                sink(batch, entries)
                report.add(batch, entries)
                progress.advance(bar, len(batch))
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        report.seconds = time.perf_counter() - started
    return report
