"""Batches of tasks on a pool of Ray actors (models loaded once per actor, on this machine or a Ray cluster) through
Ray Data; this process sinks their results as they come (`prelabel annotate --engine ray` pushes them to Label
Studio). Neutral: what an actor runs is a `BatchPredictor` its adapter provides (e.g. the Label Studio adapter's,
which calls the engine); tasks and entries travel as JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import ConfigError, PrelabelError
from ..runner import Report, progress_bar

Sink = Callable[[list[dict], list[dict]], None]
RunBatches = Callable[[list[dict], Any, Sink, Report], Report]
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "MODEL_DIR")  # what workers need to find the same weights offline
# Ray's console notices that would interleave with our progress bar: token-auth default, execution start/finish,
# "progress bars disabled"
QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,
}


class RayEngineError(PrelabelError):
    kind = "ray"


class BatchPredictor(Protocol):
    """Built once per actor from the run's request (e.g. a label config); one entry per task (`id`, `data`)."""

    version: str

    def __call__(self, tasks: list[dict]) -> list[dict]: ...


class Predictor:
    """One Ray actor: builds its `BatchPredictor` once (models load here), then predicts batches of tasks."""

    def __init__(self, make_predictor: Callable[[Any], BatchPredictor], request: Any, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.predict = make_predictor(request)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks = [{"id": int(i), "data": json.loads(d)} for i, d in zip(batch["id"], batch["data"])]
        entries = self.predict(tasks)
        return {
            "id": batch["id"],
            "entry": np.array([json.dumps(e) for e in entries], dtype=object),
            "version": np.array([self.predict.version] * len(tasks), dtype=object),
        }


def ray_engine(
    make_predictor: Callable[[Any], BatchPredictor],
    actors: int = 1,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    address: str | None = None,
    batch_size: int = 4,
) -> RunBatches:
    """A `run(todo, request, sink, report)` (e.g. for `annotate_project`): `actors` Ray actors, each running
    `make_predictor(request)` (picklable, e.g. a `functools.partial` of a class), with `cpus_per_actor`
    CPUs (torch threads) and `gpus_per_actor` GPUs each, `batch_size` tasks per call. Runs on the Ray already
    initialised in this process, else on the cluster at `address` (`auto`, `HEAD:6379`, `ray://HEAD:10001`), else on a
    local Ray started for the run (and shut down after it)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'prelabel[ray]'") from None
    if actors < 1 or batch_size < 1 or cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise ConfigError(f"ray engine: actors ({actors}) and batch size ({batch_size}) must be >= 1, CPUs per actor "
                          f"({cpus_per_actor}) > 0 and GPUs per actor ({gpus_per_actor}) >= 0")
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}

    def run(todo: list[dict], request: Any, sink: Sink, report: Report) -> None:
        by_id = {task["id"]: task for task in todo}
        rows = [{"id": task["id"], "data": json.dumps(task["data"])} for task in todo]  # JSON: Arrow keeps it as is
        blocks = math.ceil(len(rows) / batch_size)  # one block per actor call
        results = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            Predictor,
            fn_constructor_args=(make_predictor, request, max(1, int(cpus_per_actor))),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),  # no idle actors
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
            runtime_env={"env_vars": env} if env else None,
        )
        with progress_bar("pre-annotating (ray)") as progress:
            bar = progress.add_task("pre-annotating", total=report.total)
            # each block as soon as an actor returns it: with prefetching, Ray Data holds a block back until the next
            # one is ready, which would delay pushes (and lose a finished batch on Ctrl-C)
            batches = iter(results.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
            try:
                for out in batches:
                    stray = {str(v) for v in out["version"]} - {report.model_version}
                    if stray:  # checked before anything of theirs reaches the sink
                        raise RayEngineError(
                            f"a Ray worker predicts with model version {stray.pop()!r}, this run with "
                            f"{report.model_version!r}: every worker needs the same weights and prompts")
                    tasks = [by_id[int(i)] for i in out["id"]]
                    entries = [json.loads(e) for e in out["entry"]]
                    sink(tasks, entries)
                    report.add(tasks, entries)
                    progress.advance(bar, len(tasks))
            finally:
                batches.close()  # stops the execution, and the actors' work still in flight

    def engine(todo: list[dict], request: Any, sink: Sink, report: Report) -> Report:
        if not todo:
            return report
        started = time.perf_counter()
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        owned = not ray.is_initialized()
        if owned:
            quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=math.ceil(max(os.cpu_count() or 1, actors * cpus_per_actor)), include_dashboard=False, **quiet)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        try:
            run(todo, request, sink, report)
        except KeyboardInterrupt:
            report.interrupted = True
        except ray.exceptions.RayError as exc:  # e.g. an actor that could not load its models
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise RayEngineError(f"the Ray workers failed: {cause}") from exc
        finally:
            report.seconds = time.perf_counter() - started
            if owned:
                ray.shutdown()
        return report

    return engine
