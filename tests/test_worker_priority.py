"""The server's inference worker on toy torch modules: a click runs on its own thread at once, the batch thread's
forward pass pauses between layers while it runs, and goes on when the click waits for the model that pass holds
(no deadlock); the pause hooks leave with the worker."""

from __future__ import annotations

import asyncio
import threading

import torch

from ml_backend.labelstudio.server import InferenceWorker
from ml_backend.metrics import Metrics
from ml_backend.models.base import ModelLock
from ml_backend.priority import torch_modules

from .test_hardening import in_background, wait_for


class Layer(torch.nn.Module):
    def __init__(self, name: str, log: list, hold=None):
        super().__init__()
        self.name, self.log, self.hold = name, log, hold

    def forward(self, x):
        self.log.append(self.name)
        if self.hold is not None:
            self.hold()
        return x + 1


class Net(torch.nn.Module):
    def __init__(self, log: list, hold_after_layer_1):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(f"layer {i}", log, hold_after_layer_1 if i == 1 else None)
                                           for i in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ToyModel:
    """As the registry's model objects are: the torch module as an attribute, a ModelLock around the forward."""

    def __init__(self, hold_after_layer_1):
        self.log: list[str] = []
        self.model = Net(self.log, hold_after_layer_1)
        self._lock = ModelLock()

    def run(self) -> float:
        with self._lock, torch.inference_mode():
            return float(self.model(torch.zeros(1)))


def click(worker: InferenceWorker, fn):
    """An interactive call from an event loop of its own, in the background."""
    return in_background(lambda: asyncio.run(worker.call(fn)))


def started_batch(toy: ToyModel, worker: InferenceWorker, inside: threading.Event):
    batch = in_background(worker.run_batch_blocking, lambda between: toy.run())
    assert inside.wait(10), "the batch's forward pass never started"
    return batch


def test_a_forward_pass_pauses_between_layers_while_a_click_runs():
    inside, clicking, release = threading.Event(), threading.Event(), threading.Event()
    toy = ToyModel(lambda: (inside.set(), clicking.wait(10)))  # layer 1 ends once the click runs
    worker = InferenceWorker(None, Metrics(), 4, 0.0, models=torch_modules(toy))
    try:
        (batch, result) = started_batch(toy, worker, inside)

        def mask():
            clicking.set()
            assert release.wait(10)
            toy.log.append("click")
            return "mask"

        clicked, answer = click(worker, mask)
        wait_for(lambda: worker.depth()["batch_yielding"] == 1)  # paused before layer 2
        assert toy.log == ["layer 0", "layer 1"] and worker.depth()["interactive_running"] == 1
        release.set()
        clicked.join(10)
        batch.join(10)
    finally:
        release.set()
        clicking.set()
        worker.close()
    assert answer == ["mask"] and result == [4.0]
    assert toy.log == ["layer 0", "layer 1", "click", "layer 2", "layer 3"]
    assert all(not layer._forward_pre_hooks for layer in toy.model.layers), "the pause hooks stayed after close"


def test_a_paused_pass_goes_on_when_the_click_waits_for_its_model():
    # the click needs the model whose lock the paused pass holds (e.g. SAM 3 detecting and masking clicks): the
    # pass must finish first, not wait for the click forever
    inside, clicking = threading.Event(), threading.Event()
    toy = ToyModel(lambda: (inside.set(), clicking.wait(10)))
    worker = InferenceWorker(None, Metrics(), 4, 0.0, models=torch_modules(toy))
    try:
        (batch, result) = started_batch(toy, worker, inside)

        def mask():
            clicking.set()
            with toy._lock:  # blocks: the batch's pass holds it
                toy.log.append("click")
            return "mask"

        clicked, answer = click(worker, mask)
        clicked.join(20)
        batch.join(20)
        assert not clicked.is_alive() and not batch.is_alive(), "deadlock: the pass waited for the click"
    finally:
        clicking.set()
        worker.close()
    assert answer == ["mask"] and result == [4.0] and ModelLock.blocked() == 0
    assert toy.log == ["layer 0", "layer 1", "layer 2", "layer 3", "click"]


def test_layers_run_by_the_click_itself_never_pause():
    toy = ToyModel(None)
    worker = InferenceWorker(None, Metrics(), 4, 0.0, models=torch_modules(toy))
    try:
        clicked, answer = click(worker, toy.run)  # its own layers call the hook: on its thread, no pause
        clicked.join(10)
    finally:
        worker.close()
    assert answer == [4.0]


def test_a_stream_of_clicks_slows_batch_work_but_never_stops_it():
    # a click that lasts until the batch is done: the batch pauses at most max_pause_s at a time, then runs
    inside, release = threading.Event(), threading.Event()
    toy = ToyModel(lambda: inside.set())
    worker = InferenceWorker(None, Metrics(), 4, 0.0, models=torch_modules(toy), max_pause_s=0.2, min_run_s=0.05)
    try:
        clicked, answer = click(worker, lambda: release.wait(30))  # in flight throughout
        wait_for(lambda: worker.depth()["interactive_running"] == 1)
        batch, result = in_background(worker.run_batch_blocking, lambda between: toy.run())
        batch.join(10)
        assert not batch.is_alive() and result == [4.0], "the batch never ran beside a long click"
        assert not answer, "the click is still in flight"
    finally:
        release.set()
        worker.close()
    clicked.join(10)
    assert answer == [True]
