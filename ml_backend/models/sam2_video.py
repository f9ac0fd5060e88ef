"""Video trackers (the `Tracker` interface of base.py): SAM 2 video (transformers' `Sam2VideoModel`, the hub's
`facebook/sam2.1-hiera-*`) and SAM 3's tracker (`sam3.py`, same memory design), streaming one frame at a time.

A session follows any number of objects, each started from one box on any frame (others keep being tracked). Per
frame the image encoder runs once and its features are shared by every object; each object then costs the memory
attention and the mask decoder. An object's box is the box of its mask (None when the mask is empty or the object
score says it is absent); its presence score is sigmoid(object score logit).

Memory stays bounded on long videos. transformers' session keeps every processed frame and every frame's outputs;
the model reads only the last `num_maskmem - 1` frames' memories, the last `max_object_pointers_in_encoder - 1`
frames' object pointers and the conditioning (prompted) frames. After each step a session drops what the model can no
longer read (so tracking is exactly as without pruning), keeps of each object's conditioning frames the first and the
latest (`MAX_COND_FRAMES` in all), and drops the full-resolution masks right after the memory is encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RequestError
from .base import ModelLock
from .registry import BOX_PROMPTS, MASKS, TRACKER, register
from .tiny import write_tiny_sam2_video

log = logging.getLogger(__name__)

MAX_COND_FRAMES = 4  # prompted frames kept per object: its first prompt and the latest ones
MASK_CHUNK = 16  # objects whose masks are upscaled to full size at once
SPENT = ("pred_masks", "high_res_masks")  # outputs the model never reads again once the memory is encoded

Features = tuple[list[torch.Tensor], list[torch.Tensor]]  # (vision features, position embeddings), (HW, 1, C) each


@dataclass
class TrackerCore:
    """What a session runs: a SAM 2-style video model (`Sam2VideoModel`, `Sam3TrackerVideoModel`) and how to get its
    image features for a frame (the family's own image encoder)."""

    model: Any
    features: Callable[[np.ndarray], Features]
    session_class: type
    device: torch.device
    dtype: torch.dtype
    lock: ModelLock

    @property
    def input_size(self) -> int:
        return int(self.model.image_size)


def check_box(box, width: int, height: int, name: str) -> np.ndarray:
    """An xyxy pixel box clipped to the frame; a RequestError naming the box (`name`, e.g. "object 3") when it is
    not 4 numbers, has no area or lies outside the frame."""
    try:
        box = np.asarray(box, np.float64).reshape(4)
    except (TypeError, ValueError):
        raise RequestError(f"{name}: box {box!r} is not 4 numbers [x1, y1, x2, y2]") from None
    x1, y1, x2, y2 = box.tolist()
    shown = [round(v, 2) for v in (x1, y1, x2, y2)]
    if not np.isfinite(box).all() or x2 <= x1 or y2 <= y1:
        raise RequestError(f"{name}: box {shown} has no area")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise RequestError(f"{name}: box {shown} lies outside the {width}x{height} frame")
    return np.clip(box, 0, [width, height, width, height])


def mask_boxes(masks: torch.Tensor) -> list[np.ndarray | None]:
    """xyxy pixel boxes (exclusive right/bottom) of boolean (N, H, W) masks; None for an empty mask."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    out: list[np.ndarray | None] = []
    for r, c in zip(rows, cols):
        if not r.any():
            out.append(None)
            continue
        ys, xs = r.nonzero()[:, 0], c.nonzero()[:, 0]
        out.append(np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32))
    return out


class StreamingSession:
    """One video followed frame after frame (the `TrackSession` interface). `keep_history=True` turns the pruning
    off (only to check that pruning changes nothing)."""

    def __init__(self, core: TrackerCore, keep_history: bool = False):
        self.core = core
        self.keep_history = keep_history
        self.state = core.session_class(inference_device=core.device, inference_state_device=core.device,
                                        video_storage_device=core.device, dtype=core.dtype)
        self.frame_index = -1
        self.size: tuple[int, int] | None = None  # (width, height) of the frames
        config = core.model.config
        self.memory_frames = max(int(config.num_maskmem) - 1, 0)  # past frames whose memory the model reads
        self.pointer_frames = max(int(config.max_object_pointers_in_encoder) - 1, self.memory_frames)
        self._placeholder = torch.zeros(1)  # the session stores a frame per step; features come from the cache

    @property
    def objects(self) -> list[int]:
        """The ids followed now."""
        return list(self.state.obj_ids)

    def stored_frames(self) -> dict[str, int]:
        """How much the session holds: frames, per-object frame outputs (all objects), memories, prompted frames."""
        outputs = [o for per in self.state.output_dict_per_obj.values() for o in
                   (*per["cond_frame_outputs"].values(), *per["non_cond_frame_outputs"].values())]
        return {
            "frames": len(self.state.processed_frames or {}),
            "outputs": len(outputs),
            "memories": sum("maskmem_features" in o for o in outputs),
            "prompted": sum(len(per["cond_frame_outputs"]) for per in self.state.output_dict_per_obj.values()),
            "tracked": sum(len(t) for t in self.state.frames_tracked_per_obj.values()),
        }

    def _check_frame(self, frame) -> tuple[int, int]:
        index = self.frame_index + 1
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise RequestError(f"frame {index}: expected an RGB uint8 HxWx3 array, got {got}")
        h, w = frame.shape[:2]
        if self.size is not None and (w, h) != self.size:
            raise RequestError(f"frame {index} is {w}x{h} but this video's frames are {self.size[0]}x{self.size[1]}")
        return w, h

    @torch.inference_mode()
    def step(self, frame: np.ndarray, new: Mapping[int, np.ndarray] | None = None) -> dict[int, tuple[np.ndarray | None, float]]:
        w, h = self._check_frame(frame)
        boxes = {int(obj_id): check_box(box, w, h, f"object {obj_id}") for obj_id, box in (new or {}).items()}
        self.size = (w, h)
        self.frame_index += 1
        index, state, core = self.frame_index, self.state, self.core
        if not boxes and not state.obj_ids:
            return {}  # nothing followed: no encoder pass
        with core.lock:
            feats, pos = core.features(frame)
            state.cache.cache_vision_features(index, {"vision_feats": feats, "vision_pos_embeds": pos})
            scale = torch.tensor([core.input_size / w, core.input_size / h])
            for obj_id, box in boxes.items():  # a box prompt is two points labelled 2 and 3, as SAM 2's processor makes
                obj_idx = state.obj_id_to_idx(obj_id)
                corners = torch.as_tensor(box, dtype=torch.float32).reshape(2, 2) * scale
                state.add_point_inputs(obj_idx, index, {"point_coords": corners[None, None],
                                                        "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
                state.remove_mask_inputs(obj_idx, index)
            state.obj_with_new_inputs = list(boxes)
            out = core.model(inference_session=state, frame_idx=index, frame=self._placeholder)
            logits = out.object_score_logits.float().reshape(-1).cpu()
            found: list[np.ndarray | None] = []
            for start in range(0, len(out.object_ids), MASK_CHUNK):
                low = out.pred_masks[start : start + MASK_CHUNK].float()
                masks = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0
                found += mask_boxes(masks.cpu())
        if not self.keep_history:
            self._prune()
        return {int(obj_id): (box if logit > 0 else None, float(torch.sigmoid(logit)))
                for obj_id, box, logit in zip(out.object_ids, found, logits)}

    def _prune(self) -> None:
        """Drop what the model can no longer read (see the module docstring)."""
        state, now = self.state, self.frame_index
        state.processed_frames = {now: state.processed_frames[now]}
        for obj_idx, per in state.output_dict_per_obj.items():
            tracked = per["non_cond_frame_outputs"]
            for frame in list(tracked):
                if frame < now - self.pointer_frames:
                    del tracked[frame]
                elif frame < now - self.memory_frames:  # only its object pointer is read from here on
                    for key in ("maskmem_features", "maskmem_pos_enc", *SPENT):
                        tracked[frame].pop(key, None)
                else:
                    for key in SPENT:
                        tracked[frame].pop(key, None)
            prompted = per["cond_frame_outputs"]
            for output in prompted.values():
                for key in SPENT:
                    output.pop(key, None)
            frames = sorted(prompted)
            for frame in frames[1 : max(1, len(frames) - MAX_COND_FRAMES + 1)]:
                del prompted[frame]
                state.point_inputs_per_obj[obj_idx].pop(frame, None)
            history = state.frames_tracked_per_obj[obj_idx]
            for frame in [f for f in history if f < now - self.pointer_frames]:
                del history[frame]

    def drop(self, obj_ids: Iterable[int]) -> None:
        """Forget these objects: their memory is freed and later steps skip them. transformers' session has no
        removal, so its per-object tables are renumbered (object indices are positions in them)."""
        state = self.state
        gone = {int(i) for i in obj_ids} & set(state.obj_ids)
        if not gone:
            return
        with self.core.lock:
            keep = [i for i in state.obj_ids if i not in gone]
            tables = (state.point_inputs_per_obj, state.mask_inputs_per_obj, state.output_dict_per_obj,
                      state.frames_tracked_per_obj)
            kept = {obj_id: [t[state.obj_id_to_idx(obj_id)] for t in tables] for obj_id in keep}
            state._obj_id_to_idx.clear()
            state._obj_idx_to_id.clear()
            for table in tables:
                table.clear()
            for obj_idx, obj_id in enumerate(keep):
                state._obj_id_to_idx[obj_id] = obj_idx
                state._obj_idx_to_id[obj_idx] = obj_id
                for table, value in zip(tables, kept[obj_id]):
                    table[obj_idx] = value
            state.obj_ids = keep
            state.obj_with_new_inputs = [i for i in state.obj_with_new_inputs if i not in gone]


class MemoryTracking:
    """A model family with a SAM 2-style tracker is a `Tracker`: `start()` opens a session on `tracker_core()`."""

    def tracker_core(self) -> TrackerCore: ...

    def start(self) -> StreamingSession:
        return StreamingSession(self.tracker_core())


@register("sam2_video", roles=TRACKER, capabilities=(MASKS, BOX_PROMPTS), tiny={"sam2-video": write_tiny_sam2_video})
class Sam2Video(MemoryTracking):
    """SAM 2 (2.1) video through transformers: `Sam2Video(path, model_id, device, precision="float32")`, then
    `session = tracker.start()`, `session.step(frame, {obj_id: box})` per frame, `session.drop(ids)`."""

    def __init__(self, path: Path, model_id: str, device: torch.device, precision: str = "float32"):
        from transformers import Sam2VideoModel, Sam2VideoProcessor
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        from .sam3 import model_dtype

        self.model_id = model_id
        self.device = device
        self.dtype = model_dtype(precision, device)
        self.processor = Sam2VideoProcessor.from_pretrained(path)
        self.model = Sam2VideoModel.from_pretrained(path, dtype=self.dtype).to(device).eval()
        self._core = TrackerCore(self.model, self._features, Sam2VideoInferenceSession, device, self.dtype,
                                 ModelLock())

    def tracker_core(self) -> TrackerCore:
        return self._core

    def _features(self, frame: np.ndarray) -> Features:
        pixels = self.processor.image_processor(images=frame, return_tensors="pt", input_data_format="channels_last")
        out = self.model.get_image_features(pixels["pixel_values"].to(self.device, self.dtype), return_dict=True)
        return list(out.fpn_hidden_states), list(out.fpn_position_encoding)
