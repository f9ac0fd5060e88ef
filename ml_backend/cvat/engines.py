"""Which models a CVAT function loads. SAM 3 as the detector masks what it finds, turns clicks into masks (with
its tracker) and finds every object like a box, so no SAM is loaded beside it; what a detector can do is read from
its class before anything loads, so a function that cannot work says so without loading a model."""

from __future__ import annotations

from ..engine import Engine, model_refs
from ..errors import ConfigError
from ..models import DETECTOR, model_kind
from ..ontology import PromptsFile
from ..settings import Settings

NO_CLICKS = ("clicks need a segmenter (PRELABEL_SEGMENTER or -p segmenter=: a SAM or SAM 3 model) or SAM 3 as the "
             "detector (facebook/sam3)")


def detector_ref(settings: Settings) -> str | None:
    """The detector `settings` name (flag/env, else the prompts file, else the default); None for none."""
    return model_refs(settings, PromptsFile.load(settings.prompts))[0] or None


def detector_declares(settings: Settings, name: str) -> bool | None:
    """What the detector's class declares (`gives_masks`, `finds_exemplars`, `clicks`): True/False, or None where
    its files are not here (loading it then says so)."""
    ref = detector_ref(settings)
    kind = model_kind(ref, settings.model_dir, DETECTOR) if ref else None
    if kind is None:
        return None if ref else False
    return bool(getattr(kind, name, False)) if name != "clicks" else hasattr(kind, "clicks")


def without_segmenter_if_sam3(settings: Settings) -> Settings:
    """`settings` with no segmenter when the detector masks its own boxes (SAM 3): SAM would never run."""
    if detector_declares(settings, "gives_masks"):
        return settings.model_copy(update={"segmenter": ""})
    return settings


def clicker_engine(settings: Settings) -> Engine:
    """An engine that turns clicks into masks: the segmenter (SAM, SAM 3) when one is set, else SAM 3 as the
    detector (its tracker), loaded once."""
    detector, segmenter = model_refs(settings, PromptsFile.load(settings.prompts))
    if segmenter:
        return Engine.from_settings(settings, detector=False)
    if not detector or detector_declares(settings, "clicks") is False:
        raise ConfigError(f"{NO_CLICKS}; the detector {detector or 'none'!r} takes no clicks")
    engine = Engine.from_settings(settings)
    if engine.clicker is None:
        raise ConfigError(f"{detector} is a detector-only SAM 3 checkpoint (no tracker): {NO_CLICKS} with its "
                          f"tracker (the full facebook/sam3 checkpoint)")
    return engine


def exemplar_engine(settings: Settings) -> Engine:
    """An engine whose detector finds every object like an exemplar box (SAM 3); the segmenter, if one is set,
    takes clicks, else SAM 3's tracker does."""
    detector = detector_ref(settings)
    if detector_declares(settings, "finds_exemplars") is False:
        raise ConfigError(f"finding every object like a box needs SAM 3 as the detector (-p detector=str:"
                          f"facebook/sam3 or PRELABEL_DETECTOR); {detector or 'none'!r} finds objects by text only")
    engine = Engine.from_settings(settings)
    if not engine.finds_exemplars:  # files that were not here when asked above
        raise ConfigError(f"finding every object like a box needs SAM 3 as the detector; {detector!r} is not SAM 3")
    return engine
