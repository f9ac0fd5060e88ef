"""SAM 3 as a text-prompted detector, an exemplar finder ("find all like this") and a click segmenter, one model load.

Concept segmentation finds every instance of a short noun phrase, with its box, mask and score. Each prompt of the
ontology is one concept query on the image's vision features, computed once per image (a batch of images at once)
and shared by its prompts; text features are computed once per prompt and kept. An instance's score for its prompt
is SAM 3's (query score x presence score). An instance that another prompt also found (IoU >= 0.7) gets that prompt's
score too (`cross_scores`), so that from there the rules are Grounding DINO's (`prompted.py`): one object takes its
best label, a box is kept at its label's threshold, instances of one label from any synonym are merged by NMS, near
misses, the runner-up label and the synonym spread are recorded (`active.py` reads them). Full-size masks are made
only for the boxes kept after NMS and only when asked (a rectangle-only project never pays for them).

Exemplars: boxes on objects of one image (1 positive, 0 negative) become a visual query that finds every similar
instance. Clicks: a `sam3_video` checkpoint (the hub's `facebook/sam3`) also holds SAM 3's tracker, whose prompt
encoder and mask decoder run on the same backbone output through the tracker's own neck. Vision features are kept in
an LRU per image (`embedding_cache_size`), so a second exemplar or click on an image costs only the decoders.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import supervision as sv
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms

from ..errors import ConfigError, RequestError
from ..ontology import Ontology
from ..types import NEAR_MISS_BAND, NEAR_MISSES, make_detections
from .base import ModelLock
from .features import FeatureMap, embed_feature_map
from .prompted import check_prompt_lengths, merge, nothing_to_run, prompt_labels, score_boxes
from .registry import (
    BOX_PROMPTS, BOXES, CLICKS, DETECTOR, EMBEDDER, EMBEDDINGS, MASKS, SEGMENTER, TEXT_PROMPTS, TRACKER, model_type,
    register,
)
from .sam import EmbeddingCache, choose_multimask, image_key
from .sam2_video import Features, MemoryTracking, TrackerCore
from .tiny import write_tiny_sam3

log = logging.getLogger(__name__)

VISUAL = "visual"  # SAM 3's text for a query made of exemplar boxes only
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_CACHE = 256
CROSS_IOU = 0.7  # an instance of another prompt this overlapping is the same object, seen by that prompt
CROSS_FLOOR = 0.01
MASK_CHUNK = 16  # masks upscaled to full size at once, bounding memory on large images


def model_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: half precision on CUDA only (CPU kernels for it are slow or missing)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "float32" and device.type != "cuda":
        log.warning("precision %s is for CUDA; running in float32 on %s", precision, device)
        return torch.float32
    return PRECISIONS[precision]


def check_exemplars(boxes: np.ndarray, labels: np.ndarray, width: int, height: int) -> None:
    """A RequestError naming the first exemplar box that is not a box with area inside the image."""
    if len(boxes) != len(labels):
        raise RequestError(f"{len(boxes)} exemplar boxes but {len(labels)} box labels")
    if not (labels == 1).any():
        raise RequestError("exemplar prompting needs at least one positive box")
    for box in boxes:
        x1, y1, x2, y2 = (float(v) for v in box)
        if not np.isfinite([x1, y1, x2, y2]).all() or x2 <= x1 or y2 <= y1:
            raise RequestError(f"exemplar box {[round(v, 2) for v in (x1, y1, x2, y2)]} has no area")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise RequestError(f"exemplar box {[round(v, 2) for v in (x1, y1, x2, y2)]} lies outside the "
                               f"{width}x{height} image")


def cross_scores(scores: torch.Tensor, xyxy: torch.Tensor, iou: float = CROSS_IOU) -> torch.Tensor:
    """Per-prompt instances of one image (scores (P, Q), pixel boxes (P, Q, 4)) -> a (P*Q, P) table as Grounding
    DINO's: an instance's own score under its prompt, and under each other prompt the best score of that prompt's
    instances that overlap it (IoU >= `iou`; 0 where none does). From it come the runner-up label and the synonym
    spread, as for a detector that scores every box against every prompt."""
    p, q = scores.shape
    flat, own = xyxy.reshape(-1, 4), scores.reshape(-1)
    table = torch.zeros((p * q, p))
    live = (own >= CROSS_FLOOR).nonzero()[:, 0]  # instances worth comparing (the rest score ~0 anyway)
    if len(live):
        overlap = box_iou(flat, flat[live]) >= iou  # (P*Q, live)
        prompt_of = live // q
        for m in range(p):
            theirs = prompt_of == m
            if theirs.any():
                table[:, m] = torch.where(overlap[:, theirs], own[live][theirs][None, :], 0.0).max(-1).values
    table[torch.arange(p * q), torch.arange(p * q) // q] = own
    return table


def _vision_output(**fields):
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    return Sam3VisionEncoderOutput(**fields)


def _stack(outputs: list):
    """Per-image vision outputs (batch 1 each) -> one batch, with the fields SAM 3's heads read."""
    first = outputs[0]
    return _vision_output(
        last_hidden_state=torch.cat([o.last_hidden_state for o in outputs]),
        fpn_hidden_states=tuple(torch.cat(level) for level in zip(*(o.fpn_hidden_states for o in outputs))),
        fpn_position_encoding=first.fpn_position_encoding if len(outputs) == 1 else tuple(
            torch.cat(level) for level in zip(*(o.fpn_position_encoding for o in outputs))),
    )


def _split(batch, n: int) -> list:
    return [_vision_output(
        last_hidden_state=batch.last_hidden_state[i : i + 1],
        fpn_hidden_states=tuple(t[i : i + 1] for t in batch.fpn_hidden_states),
        fpn_position_encoding=tuple(t[i : i + 1] for t in batch.fpn_position_encoding),
    ) for i in range(n)]


@register("sam3", "sam3_video", roles=(DETECTOR, SEGMENTER, EMBEDDER, TRACKER),
          capabilities=(BOXES, MASKS, TEXT_PROMPTS, BOX_PROMPTS, CLICKS, EMBEDDINGS), tiny={"sam3": write_tiny_sam3})
class Sam3(MemoryTracking):
    gives_masks = True  # every box comes with SAM 3's own mask: the engine runs no segmenter for them
    finds_exemplars = True

    def __init__(self, path: Path, model_id: str, device: torch.device, batch_size: int = 4, cache_size: int = 8,
                 precision: str = "float32"):
        from transformers import Sam3Model, Sam3Processor, Sam3VideoModel

        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.dtype = model_dtype(precision, device)
        self.processor = Sam3Processor.from_pretrained(path)
        if model_type(path) == "sam3_video":  # detector + tracker sharing one backbone
            video = Sam3VideoModel.from_pretrained(path, dtype=self.dtype).to(device).eval()
            self.model, self._video = video.detector_model, video
        else:  # a detector-only checkpoint: no clicks
            self.model, self._video = Sam3Model.from_pretrained(path, dtype=self.dtype).to(device).eval(), None
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        self.cache = EmbeddingCache(cache_size)
        self._texts: OrderedDict[str, tuple] = OrderedDict()
        self._lock = ModelLock()
        self._tracker_core: TrackerCore | None = None

    @property
    def clicks(self) -> bool:
        """Can this checkpoint segment from clicks (it holds SAM 3's tracker)?"""
        return self._video is not None

    # -- features ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _encode(self, images: list[np.ndarray]) -> list[SimpleNamespace]:
        pixels = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        with self._lock:
            out = self.model.get_vision_features(pixel_values=pixels.to(self.device, self.dtype))
        return _split(out, len(images))

    def _vision(self, images: list[np.ndarray], keep: bool) -> list[SimpleNamespace]:
        """Vision features per image: from the cache where there, the others in batches of `batch_size`; `keep`
        puts the new ones in the cache (interactive work on one image; batch jobs would only churn it)."""
        keys = [image_key(image) for image in images]
        found: list[SimpleNamespace | None] = [self.cache.peek(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for i, features in zip(chunk, self._encode([images[i] for i in chunk])):
                found[i] = features
                if keep:
                    self.cache.put(keys[i], features)
        return found

    @torch.inference_mode()
    def _text(self, text: str) -> tuple:
        """(text features, attention mask) of a prompt, computed once."""
        with self._lock:
            if text in self._texts:
                self._texts.move_to_end(text)
                return self._texts[text]
            tokens = self.processor(text=[text], return_tensors="pt")
            mask = tokens["attention_mask"].to(self.device)
            features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask)
            self._texts[text] = (features.pooler_output, mask)
            while len(self._texts) > TEXT_CACHE:
                self._texts.popitem(last=False)
            return self._texts[text]

    @torch.inference_mode()
    def _query(self, vision: SimpleNamespace, text: str, boxes: torch.Tensor | None = None,
               box_labels: torch.Tensor | None = None):
        """One concept query on a batch of images -> (scores (B, Q), xyxy relative (B, Q, 4), mask logits)."""
        features, mask = self._text(text)
        n = vision.last_hidden_state.shape[0]
        geometry = {} if boxes is None else {"input_boxes": boxes.to(self.device, self.dtype),
                                             "input_boxes_labels": box_labels.to(self.device)}
        with self._lock:
            out = self.model(vision_embeds=vision, text_embeds=SimpleNamespace(pooler_output=features.expand(n, -1, -1)),
                             attention_mask=mask.expand(n, -1), **geometry)
        scores = out.pred_logits.float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()
        return scores.cpu(), out.pred_boxes.float().cpu(), out.pred_masks

    @staticmethod
    def _full_masks(logits: torch.Tensor, rows: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Full-size boolean masks of the query `rows` (mask logits of one image), a few at a time."""
        out = torch.zeros((len(rows), *hw), dtype=torch.bool)
        for start in range(0, len(rows), MASK_CHUNK):
            small = logits[rows[start : start + MASK_CHUNK].to(logits.device)].float()[None]
            out[start : start + MASK_CHUNK] = (F.interpolate(small, size=hw, mode="bilinear", align_corners=False)[0] > 0).cpu()
        return out

    # -- text prompts ----------------------------------------------------------------------------------------------
    def detect(self, images: list[np.ndarray], ontology: Ontology, masks: bool = True) -> list[sv.Detections]:
        if (answer := nothing_to_run(images, ontology)) is not None:
            return answer
        prompts = [p for p, _ in ontology.prompts]
        check_prompt_lengths(self.processor.tokenizer, prompts, self.max_text_len, "SAM 3's")
        labels = prompt_labels(prompts, ontology)
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            vision = _stack(self._vision(chunk, keep=False))
            answers = [self._query(vision, prompt) for prompt in prompts]  # per prompt: (scores, boxes, mask logits)
            for i, image in enumerate(chunk):
                h, w = image.shape[:2]
                scores = torch.stack([a[0][i] for a in answers])  # (P, Q)
                xyxy = torch.stack([a[1][i] for a in answers]) * torch.tensor([w, h, w, h], dtype=torch.float32)
                table = cross_scores(scores, xyxy)
                q = scores.shape[1]

                def full_masks(rows: torch.Tensor, i=i, hw=(h, w), q=q) -> torch.Tensor:
                    """Full-size masks of the kept candidates (rows over prompts x queries) only."""
                    out = torch.zeros((len(rows), *hw), dtype=torch.bool)
                    for n, (_, _, logits) in enumerate(answers):
                        mine = (rows // q) == n
                        out[mine] = self._full_masks(logits[i], rows[mine] % q, hw)
                    return out

                part = score_boxes(table, labels, prompts, ontology, xyxy.reshape(-1, 4))
                results.append(merge([part], ontology, full_masks if masks else None))
        return results

    # -- exemplars -------------------------------------------------------------------------------------------------
    def find_like(self, image: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray, threshold: float,
                  max_detections: int = 100, nms_iou: float = 0.5, masks: bool = True) -> sv.Detections:
        """Every instance like the positive exemplar boxes (xyxy pixels, `box_labels` 1) and unlike the negative
        ones (0) in `image`, scored at `threshold`: Detections with class_id 0, confidence and masks if asked."""
        h, w = image.shape[:2]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        box_labels = np.asarray(box_labels, np.int64).reshape(-1)
        check_exemplars(boxes, box_labels, w, h)
        clipped = np.clip(boxes, 0, [w, h, w, h]) / np.array([w, h, w, h], np.float32)
        cxcywh = np.stack([(clipped[:, 0] + clipped[:, 2]) / 2, (clipped[:, 1] + clipped[:, 3]) / 2,
                           clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]], -1)
        vision = self._vision([image], keep=True)[0]
        scores, rel, logits = self._query(vision, VISUAL, torch.from_numpy(cxcywh)[None], torch.from_numpy(box_labels)[None])
        scores, xyxy = scores[0], rel[0] * torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy[:, 0::2], xyxy[:, 1::2] = xyxy[:, 0::2].clamp(0, w), xyxy[:, 1::2].clamp(0, h)
        valid = (scores >= threshold) & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        rows = valid.nonzero()[:, 0]
        rows = rows[nms(xyxy[rows], scores[rows], nms_iou)][:max_detections]
        found = make_detections(xyxy[rows].numpy(), scores[rows].numpy(), np.zeros(len(rows), int),
                                np.array([""] * len(rows), dtype=object))
        if masks:
            found.mask = self._full_masks(logits[0], rows, (h, w)).numpy()
        found.metadata[NEAR_MISSES] = (scores[(scores < threshold) & (scores >= threshold - NEAR_MISS_BAND)]
                                         - threshold).tolist()
        return found

    # -- clicks ----------------------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> None:
        self._vision([image], keep=True)

    def cache_info(self) -> dict:
        return self.cache.info()

    @torch.inference_mode()
    def _tracker_embeddings(self, vision: SimpleNamespace) -> list[torch.Tensor]:
        """The tracker's image embeddings from the shared backbone output (its own neck, no memory)."""
        tracker = self._video.tracker_model
        maps, _ = self._video.get_vision_features_for_tracker(vision)
        maps[-1] = maps[-1] + tracker.no_memory_embedding
        return [m.permute(1, 2, 0).reshape(1, -1, *size) for m, size in zip(maps, tracker.backbone_feature_sizes)]

    @torch.inference_mode()
    def segment(self, image, boxes=None, points=None, point_labels=None):
        """SAM 3's tracker as a promptable segmenter (the `Segmenter` interface): N boxes give N masks; points
        (with labels, optionally one box) give one mask."""
        if not self.clicks:
            raise ConfigError(f"{self.model_id} is a detector-only SAM 3 checkpoint (no tracker): clicks need the "
                              f"full facebook/sam3 checkpoint or a --segmenter")
        h, w = image.shape[:2]
        tracker = self._video.tracker_model
        size = float(tracker.image_size)
        scale = torch.tensor([size / w, size / h])
        with self._lock:
            embeddings = self._tracker_embeddings(self._vision([image], keep=True)[0])
        prompts = []
        if points is None:
            box = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 2, 2) * scale
            prompts = [{"input_boxes": b.reshape(1, 1, 4)} for b in box]
        else:
            pts = torch.as_tensor(np.asarray(points, np.float32)).reshape(-1, 2) * scale
            labels = torch.as_tensor(np.asarray(point_labels if point_labels is not None else np.ones(len(pts))))
            prompt = {"input_points": pts[None, None], "input_labels": labels.long()[None, None]}
            if boxes is not None:
                prompt["input_boxes"] = (torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 2, 2)[:1] * scale).reshape(1, 1, 4)
            prompts = [prompt]
        multimask = choose_multimask(boxes, points)
        masks, scores = [], []
        for prompt in prompts:
            with self._lock:
                out = tracker._single_frame_forward(
                    image_embeddings=embeddings, multimask_output=multimask,
                    **{k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in prompt.items()})
            low = out.pred_masks[0, :1].float()[None]  # the best of the masks asked for, on the stretched input
            masks.append((F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0).cpu().numpy())
            scores.append(float(out.iou_scores[0, 0].float().max()))
        if not masks:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        return np.stack(masks), np.array(scores, np.float32)

    # -- video (the `Tracker` interface: `start()` a session, see sam2_video.py) -------------------------------------
    def tracker_core(self) -> TrackerCore:
        """SAM 3's tracker on frames encoded by the shared backbone, through the tracker's own neck."""
        if not self.clicks:
            raise ConfigError(f"{self.model_id} is a detector-only SAM 3 checkpoint (no tracker): video tracking needs "
                              f"the full facebook/sam3 checkpoint or a --tracker")
        if self._tracker_core is None:
            from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
                Sam3TrackerVideoInferenceSession,
            )

            self._tracker_core = TrackerCore(self._video.tracker_model, self._tracker_features,
                                             Sam3TrackerVideoInferenceSession, self.device, self.dtype, self._lock)
        return self._tracker_core

    def _tracker_features(self, frame: np.ndarray) -> Features:
        maps, positions = self._video.get_vision_features_for_tracker(self._vision([frame], keep=False)[0])
        return list(maps), list(positions)

    # -- embeddings (review) ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SAM 3's encoder as an image encoder: its coarsest kept FPN level, pooled over the image and each box."""
        h, w = image.shape[:2]
        features = self._vision([image], keep=False)[0].fpn_hidden_states[-2].float().cpu()
        gh, gw = features.shape[-2:]
        return embed_feature_map(FeatureMap(features, (gw / w, gh / h), (gh, gw)), boxes)
