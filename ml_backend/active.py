"""Uncertainty of a pre-annotation, so that people label the hardest images first.

Per box, three signals in [0, 1]:
- margin: how close its confidence is to its label's threshold, `1 - |score - threshold| / max(threshold, 1 - threshold)`;
- confusion: how close the best *other* label came, `runner_up / score`;
- synonym disagreement: how much the label's own prompts disagreed, `synonym_spread / score`.
A box's uncertainty is the largest of the three. Near misses (candidates that scored within 0.1 below their
threshold and were dropped) count as boxes with the margin signal only: they are the objects a person may have to
add. An image's uncertainty is `1 - prod(1 - u_i)`: it grows with each uncertain box, and is 0 with none.

The task prediction's `score` is the image's confidence, `1 - uncertainty`: sorting Label Studio's Data Manager by
prediction score ascending puts the hardest images first.
"""

from __future__ import annotations

import numpy as np
import supervision as sv

from .ontology import Ontology
from .types import NEAR_MISSES, RUNNER_UP, SYNONYM_SPREAD


def margin_uncertainties(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return 1 - np.abs(scores - thresholds) / np.maximum(thresholds, 1 - thresholds)


def box_uncertainties(detections: sv.Detections, ontology: Ontology) -> np.ndarray:
    if len(detections) == 0:
        return np.zeros(0)
    scores = detections.confidence.astype(float)
    thresholds = np.array([ontology.labels[i].threshold for i in detections.class_id], float)
    margin = margin_uncertainties(scores, thresholds)
    safe = np.maximum(scores, 1e-6)
    confusion = np.asarray(detections.data.get(RUNNER_UP, np.zeros(len(scores))), float) / safe
    disagreement = np.asarray(detections.data.get(SYNONYM_SPREAD, np.zeros(len(scores))), float) / safe
    return np.clip(np.max([margin, confusion, disagreement], axis=0), 0, 1)


def near_miss_uncertainties(detections: sv.Detections, ontology: Ontology) -> np.ndarray:
    """Each near miss is stored as `score - threshold` (negative, within the band)."""
    gaps = np.asarray(detections.metadata.get(NEAR_MISSES, []), float)
    if gaps.size == 0:
        return gaps
    scale = max(max(s.threshold, 1 - s.threshold) for s in ontology.labels)
    return np.clip(1 - np.abs(gaps) / scale, 0, 1)


def combine(u: np.ndarray) -> float:
    """Per-box uncertainties -> the image's: grows with each uncertain box, 0 with none."""
    return float(1 - np.prod(1 - u)) if u.size else 0.0


def image_uncertainty(detections: sv.Detections, ontology: Ontology) -> float:
    return combine(np.concatenate([box_uncertainties(detections, ontology), near_miss_uncertainties(detections, ontology)]))


def uncertainty_from_scores(scores: np.ndarray, thresholds: np.ndarray) -> float:
    """The image uncertainty from box confidences alone (margin signal only): for predictions made elsewhere."""
    return combine(np.clip(margin_uncertainties(scores, thresholds), 0, 1))


def classification_confidence(probs: np.ndarray, chosen: list[list[int]]) -> float:
    """How sure a classification is: the lowest chosen probability over its rows (images or regions), 1.0 with
    none chosen."""
    return round(min((float(probs[r][j]) for r, row in enumerate(chosen) for j in row), default=1.0), 6)


def task_score(detections: sv.Detections, ontology: Ontology) -> float:
    """The prediction `score` Label Studio shows: image confidence, low = hard."""
    return round(1.0 - image_uncertainty(detections, ontology), 6)
