"""The model registry: model families by type, what each can do and which roles it serves.

A family registers itself in its own module with `@register(...)` on its builder (a class or function called as
`build(path, model_id, device, **role_options)`). The registry finds a family for a reference by, in order: a ref
prefix the family claims (`student:DIR`), a checkpoint file suffix (`.pth` for original SAM), or the `model_type`
of the directory's `config.json`. Every module of this package is imported once on first use, so adding a model
is one module with one registration; nothing else changes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelUnavailableError
from .loading import LOCAL_PREFIXES, quiet_weights, resolve_model

log = logging.getLogger(__name__)

# roles: the interface a built model offers (see base.py)
DETECTOR, SEGMENTER, CLASSIFIER, EMBEDDER, TRACKER = "detector", "segmenter", "classifier", "embedder", "tracker"
ROLES = (DETECTOR, SEGMENTER, CLASSIFIER, EMBEDDER, TRACKER)
ROLE_WORDS = {DETECTOR: "open-vocabulary detectors", SEGMENTER: "promptable segmenters",
              CLASSIFIER: "CLIP-style models", EMBEDDER: "image encoders", TRACKER: "video trackers"}
# capabilities: what a family can do within its roles
BOXES, MASKS, TEXT_PROMPTS, BOX_PROMPTS, CLICKS, CLASSIFICATION, EMBEDDINGS = (
    "boxes", "masks", "text-prompts", "box-prompts", "clicks", "classification", "embeddings")
CAPABILITIES = (BOXES, MASKS, TEXT_PROMPTS, BOX_PROMPTS, CLICKS, CLASSIFICATION, EMBEDDINGS)

TinyWriter = Callable[[Path], Path]  # writes a tiny random model into a directory, returns its path


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., Any]  # build(path, model_id, device, **role_options)
    roles: frozenset[str]
    capabilities: frozenset[str]
    model_types: tuple[str, ...] = ()  # config.json `model_type`s it loads
    prefix: str = ""  # refs `PREFIX<dir>` are this family's (e.g. "student:")
    suffixes: tuple[str, ...] = ()  # checkpoint files it loads (e.g. ".pth")
    tiny: Mapping[str, TinyWriter] = field(default_factory=dict)  # kind -> tiny model writer
    identify: Callable[[Path], str] | None = None  # model id from its files (default: the ref)

    @property
    def forms(self) -> list[str]:
        """How a user names this family: its model types, `prefix:DIR` or `*.suffix` files."""
        return [*self.model_types, *([f"{self.prefix}DIR"] if self.prefix else []), *(f"*{s}" for s in self.suffixes)]

    def ref(self, path: Path) -> str:
        return f"{self.prefix}{path}"


_families: dict[str, Family] = {}
_discovered = False
_lock = threading.RLock()


def register(*model_types: str, roles: str | Iterable[str], capabilities: Iterable[str], name: str | None = None,
             prefix: str = "", suffixes: Iterable[str] = (), tiny: Mapping[str, TinyWriter] | None = None,
             identify: Callable[[Path], str] | None = None):
    """Decorator registering `build` as a model family (see `Family`); returns `build` unchanged."""
    roles = frozenset([roles] if isinstance(roles, str) else roles)
    capabilities = frozenset(capabilities)
    name = name or (model_types[0] if model_types else "")
    if not name or not (model_types or prefix or suffixes):
        raise ValueError("a model family needs a name and a model type, a prefix or a file suffix")
    if unknown := (roles - set(ROLES)) | (capabilities - set(CAPABILITIES)):
        raise ValueError(f"family {name!r}: unknown roles or capabilities {sorted(unknown)}")

    def decorator(build):
        family = Family(name, build, roles, capabilities, tuple(model_types), prefix, tuple(suffixes),
                        dict(tiny or {}), identify)
        with _lock:
            taken = {t for f in _families.values() if f.name != name for t in f.model_types} & set(model_types)
            if taken:
                raise ValueError(f"family {name!r}: model types {sorted(taken)} are registered already")
            _families[name] = family
            if prefix:
                LOCAL_PREFIXES[prefix] = f"{name} directory"
        return build

    return decorator


def unregister(name: str) -> None:
    with _lock:
        family = _families.pop(name, None)
        if family and family.prefix:
            LOCAL_PREFIXES.pop(family.prefix, None)


def _discover() -> None:
    """Import every module of this package once: each registers its families."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        package = __name__.rsplit(".", 1)[0]
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            try:
                importlib.import_module(f"{package}.{module.name}")
            except ImportError as exc:  # e.g. an older transformers without the model
                log.warning("model module %s is unavailable: %s", module.name, exc)


def families(role: str | None = None) -> list[Family]:
    """Registered families, serving `role` when given, in name order."""
    _discover()
    with _lock:
        return sorted((f for f in _families.values() if role is None or role in f.roles), key=lambda f: f.name)


def _known(role: str) -> str:
    return f"{ROLE_WORDS[role]} {[form for f in families(role) for form in f.forms]}"


def model_type(path: Path) -> str:
    try:
        return json.loads((path / "config.json").read_text())["model_type"]
    except (OSError, KeyError, TypeError, ValueError):
        raise ModelUnavailableError(f"{path} has no readable config.json with a model_type") from None


def find(ref: str, model_dir: Path, role: str, local_only: bool = False) -> tuple[Family, Path]:
    """The family that loads `ref` as a `role`, and the local path of its files (`local_only`: never download)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    prefixed = [f for f in families() if f.prefix and ref.startswith(f.prefix)]
    path = resolve_model(ref, model_dir, local_only)
    if prefixed:
        family, kind = prefixed[0], f"{prefixed[0].prefix}DIR"
    elif path.is_file():
        family = next((f for f in families() if path.suffix in f.suffixes), None)
        kind = f"*{path.suffix}"
        if family is None:
            raise ModelUnavailableError(f"{role} {ref!r} is a file of a kind no model family loads; supported: {_known(role)}")
    else:
        kind = model_type(path)
        family = next((f for f in families() if kind in f.model_types), None)
    if family is None or role not in family.roles:
        raise ModelUnavailableError(f"{role} {ref!r} is a {kind!r} model; supported: {_known(role)}")
    return family, path


def build(role: str, ref: str, model_dir: Path, device: torch.device, **options) -> Any:
    """Build `ref` as a `role` with its family's builder; `options` are the role's (batch_size, cache_size) and
    general ones (precision), each passed where the builder takes it."""
    family, path = find(ref, model_dir, role)
    takes = inspect.signature(family.build).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        options = {k: v for k, v in options.items() if k in takes}
    log.info("loading %s %s (%s) from %s on %s", role, ref, family.name, path, device)
    with quiet_weights():
        try:
            return family.build(path, ref, device, **options)
        except (OSError, ValueError, KeyError) as exc:  # missing or mismatched files: name the model, keep it short
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelUnavailableError(f"{role} {ref!r} ({family.name}) could not be loaded from {path}: {first}") from exc


def model_id(ref: str, model_dir: Path) -> str:
    """The id the model built from `ref` will have, without loading it (nor resolving hub ids)."""
    family = next((f for f in families() if f.prefix and ref.startswith(f.prefix)), None)
    if family is not None and family.identify is not None:
        return family.identify(resolve_model(ref, model_dir))
    return ref


def model_kind(ref: str, model_dir: Path, role: str) -> Any | None:
    """The builder (for most families, the model's class) that `ref` would be built with, without loading or
    downloading it; None where the model's files are not here."""
    try:
        return find(ref, model_dir, role, local_only=True)[0].build
    except ModelUnavailableError:
        return None


def tiny_kinds() -> dict[str, tuple[Family, TinyWriter]]:
    """Every kind a tiny model can be written of, with its family and writer."""
    return {kind: (f, writer) for f in families() for kind, writer in f.tiny.items()}


@quiet_weights()
def write_tiny(out: Path, kinds: Iterable[str] | None = None) -> dict[str, str]:
    """Write a tiny random model of each kind (default: all) as `out/<kind>`; returns {kind: model ref}."""
    known = tiny_kinds()
    kinds = list(known) if kinds is None else list(kinds)
    if unknown := [k for k in kinds if k not in known]:
        raise ValueError(f"no tiny model of {unknown}; tiny kinds: {sorted(known)}")
    out = Path(out)
    return {kind: known[kind][0].ref(known[kind][1](out / kind)) for kind in kinds}
