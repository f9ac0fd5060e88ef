"""Text-prompted detection, shared by the detectors that score each predicted box against each prompt (Grounding
DINO, OWLv2/OWL-ViT): from those scores to `Detections` with the named extras of `types.py`.

A label scores its best prompt; a box is kept when that score reaches the label's threshold (and the prompt passes
the detector's own test, if it has one). A dropped box within NEAR_MISS_BAND below its threshold is a near miss.
Boxes of one label from any of its synonyms are then merged by class-aware NMS, at most `max_detections` kept.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import supervision as sv
import torch
from torchvision.ops import batched_nms

from ..ontology import Ontology
from ..types import NEAR_MISS_BAND, NEAR_MISSES, PROMPT, RUNNER_UP, SYNONYM_SPREAD, make_detections


def nothing_to_run(images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections] | None:
    """The answer when the model has nothing to look at (no images) or for (no prompts); None otherwise."""
    if not images:
        return []
    return None if ontology.prompts else [sv.Detections.empty() for _ in images]


def prompt_labels(prompts: list[str], ontology: Ontology) -> torch.Tensor:
    """The ontology label index of each prompt."""
    label_of = dict(ontology.prompts)
    return torch.tensor([label_of[p] for p in prompts])


def to_pixels(cxcywh: torch.Tensor, scale: tuple[float, float], hw: tuple[int, int]) -> torch.Tensor:
    """Relative (cx, cy, w, h) boxes -> absolute xyxy: times `scale` (x, y) pixels, clipped to the image `hw`."""
    sx, sy = scale
    cx, cy, bw, bh = cxcywh.unbind(-1)
    xyxy = torch.stack([(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy], -1)
    h, w = hw
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    return xyxy


def check_prompt_lengths(tokenizer, prompts: list[str], max_len: int, model: str = "the detector's") -> None:
    """A ValueError naming the first prompt over the text tower's `max_len` tokens."""
    for prompt in prompts:
        if len(tokenizer(prompt)["input_ids"]) > max_len:
            raise ValueError(f"prompt {prompt!r} is longer than {model} {max_len} tokens")


def label_scores(scores: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(Q, P) prompt scores -> (Q, L) label scores: each label's best prompt."""
    out = torch.full((len(scores), num_labels), -1.0)
    return out.scatter_reduce_(1, labels.expand(len(scores), -1), scores, reduce="amax")


def score_boxes(scores: torch.Tensor, labels: torch.Tensor, prompts: list[str], ontology: Ontology,
                xyxy: torch.Tensor, prompt_ok: torch.Tensor | None = None) -> dict:
    """Boxes (Q, 4) scored against prompts (Q, P) whose labels are `labels` (P,) -> the kept candidates of one image
    (a part for `merge`, with `row`: their indices among the Q). `prompt_ok` (Q, P) is a detector's own test of the
    chosen prompt (default: none)."""
    per_label = label_scores(scores, labels, len(ontology.labels))
    best, best_label = per_label.max(-1)
    best_prompt = torch.where(labels[None, :] == best_label[:, None], scores, -1.0).argmax(-1)
    # synonym spread: how much the prompts of the chosen label disagree (0 when a label has one prompt)
    same = labels[None, :] == best_label[:, None]
    spread = torch.where(same, scores, 1e9).min(-1).values
    spread = (best - spread).clamp(min=0)
    runner_up = per_label.scatter(1, best_label[:, None], -1.0).max(-1).values.clamp(min=0)
    thresholds = torch.tensor([s.threshold for s in ontology.labels])[best_label]
    keep = best >= thresholds
    if prompt_ok is not None:
        keep &= prompt_ok.gather(1, best_prompt[:, None])[:, 0]
    near = (~keep) & (best >= thresholds - NEAR_MISS_BAND)
    return {
        "xyxy": xyxy[keep],
        "score": best[keep],
        "label": best_label[keep],
        PROMPT: [prompts[i] for i in best_prompt[keep].tolist()],
        RUNNER_UP: runner_up[keep],
        SYNONYM_SPREAD: spread[keep],
        NEAR_MISSES: (best[near] - thresholds[near]).tolist(),
        "row": keep.nonzero()[:, 0],
        "candidates": len(scores),
    }


def merge(parts: list[dict], ontology: Ontology, masks: Callable[[torch.Tensor], torch.Tensor] | None = None
          ) -> sv.Detections:
    """One image's parts from `score_boxes` (one per caption or prompt group) -> its Detections. `masks`, from a
    detector that makes its own: called once with the kept boxes' candidate indices (over the parts' candidates in
    order), it gives their (K, H, W) masks, so that only boxes that survive NMS get a full-size mask."""
    xyxy = torch.cat([p["xyxy"] for p in parts])
    score = torch.cat([p["score"] for p in parts])
    label = torch.cat([p["label"] for p in parts])
    near_misses = [m for p in parts for m in p[NEAR_MISSES]]
    valid = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    idx = valid.nonzero()[:, 0]
    keep = idx[batched_nms(xyxy[idx], score[idx], label[idx], ontology.nms_iou)][: ontology.max_detections]
    runner_up = torch.cat([p[RUNNER_UP] for p in parts])[keep]
    spread = torch.cat([p[SYNONYM_SPREAD] for p in parts])[keep]
    names = np.array([ontology.labels[i].name for i in label[keep].tolist()], dtype=object)
    prompts = np.array([q for p in parts for q in p[PROMPT]] or [""], dtype=object)[keep.numpy()]
    detections = make_detections(
        xyxy[keep].numpy(), score[keep].numpy(), label[keep].numpy(), names,
        **{PROMPT: prompts, RUNNER_UP: runner_up.numpy(), SYNONYM_SPREAD: spread.numpy()},
    )
    detections.metadata[NEAR_MISSES] = near_misses
    if masks is not None and parts:
        offsets = np.cumsum([0] + [p["candidates"] for p in parts[:-1]])
        origin = torch.cat([p["row"] + int(o) for p, o in zip(parts, offsets)])
        detections.mask = masks(origin[keep]).numpy()
    return detections
