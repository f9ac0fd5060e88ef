"""Background threads give way to interactive ones. On Linux a thread can lower its own scheduling priority (its
nice value; threads it starts, e.g. torch's CPU workers, inherit it): the server's batch and follower threads do,
so that a click runs at near-idle speed while a backlog is worked off; alone, they still get every core. And a
forward pass can pause between layers (`add_checkpoints`): the server's batch thread does while a click runs."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)


def lower_this_thread(nice: int) -> bool:
    """Raise the calling thread's nice value by `nice` (0: leave it); True where it took effect. Linux only:
    elsewhere the call would renice the whole process."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # a sandbox that forbids it: the thread runs at normal priority
        log.debug("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)
        return False
    return True


def torch_modules(*models: object) -> list:
    """The torch modules the given model objects hold as attributes (each once)."""
    import torch

    seen: dict[int, torch.nn.Module] = {}
    for model in models:
        for value in vars(model).values() if model is not None and hasattr(model, "__dict__") else ():
            if isinstance(value, torch.nn.Module):
                seen.setdefault(id(value), value)
    return list(seen.values())


def add_checkpoints(modules: list, checkpoint: Callable[[], None]) -> list:
    """`checkpoint()` before each layer of `modules` (every element of their ModuleLists: transformer blocks,
    backbone stages), where a running forward pass can pause; returns the hook handles (`.remove()`)."""
    import torch

    handles, seen = [], set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, torch.nn.ModuleList):
                for layer in sub:
                    if id(layer) not in seen:
                        seen.add(id(layer))
                        handles.append(layer.register_forward_pre_hook(lambda _m, _a: checkpoint()))
    return handles
