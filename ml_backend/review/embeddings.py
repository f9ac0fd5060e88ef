"""Embeddings from the pipeline's own image encoder (SAM's), so nothing is downloaded: per object, the encoder's
feature map ROI-aligned over the box (2x2 cells); per image, the feature map averaged over the image (no padding).
Or, when configured, a CLIP/SigLIP model's image tower on the image and on each object's crop.
Then FiftyOne Brain's visualization (UMAP), uniqueness and near duplicates, always with `embeddings=` given."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from ..errors import ConfigError
from .convert import to_pixels

log = logging.getLogger(__name__)

ROI = 2  # output cells per side of each box


class EncoderEmbedder:
    """Wraps a SAM segmenter of ml_backend.models (HF SAM): its image-embedding cache is reused."""

    def __init__(self, segmenter):
        if segmenter is None or not hasattr(segmenter, "processor"):
            raise ConfigError("review embeddings use the pipeline's SAM image encoder: configure a (HF) SAM segmenter "
                              "(e.g. --segmenter DIR), or run with --no-embeddings")
        self.segmenter = segmenter
        pad = segmenter.processor.image_processor.pad_size
        self.pad = (pad["height"], pad["width"])

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image embedding (C,), box embeddings (N, C*ROI*ROI)) for pixel xyxy `boxes`, L2-normalised."""
        from ..models.sam import image_key

        seg = self.segmenter
        feats, original, reshaped = seg.cache.get_or_compute(image_key(image), lambda: seg._encode(image))
        feats = feats.float().cpu()  # (1, C, gh, gw) over the padded input
        h, w = original[0].tolist()
        rh, rw = reshaped[0].tolist()
        gh, gw = feats.shape[-2:]
        cell_y, cell_x = self.pad[0] / gh, self.pad[1] / gw
        valid = feats[0, :, : max(1, int(np.ceil(rh / cell_y))), : max(1, int(np.ceil(rw / cell_x)))]
        image_emb = valid.mean(dim=(1, 2)).numpy()
        scale = torch.tensor([rw / w / cell_x, rh / h / cell_y] * 2, dtype=torch.float32)
        rois = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)) * scale
        pooled = roi_align(feats, [rois], output_size=ROI, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        return _normalise(image_emb[None])[0], _normalise(pooled.flatten(1).numpy())


class BackboneEmbedder:
    """The detector's own backbone (Grounding DINO's Swin, last stage), for pipelines without SAM."""

    def __init__(self, detector):
        backbone = getattr(getattr(getattr(detector, "model", None), "model", None), "backbone", None)
        if backbone is None:
            raise ConfigError(f"detector {getattr(detector, 'model_id', detector)!r} exposes no backbone to embed with")
        self.detector, self.encoder = detector, backbone.conv_encoder

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        det = self.detector
        inputs = det.processor.image_processor(images=[image], return_tensors="pt").to(det.device)
        with det._lock:  # the detector's own lock: one forward at a time
            feats, _ = self.encoder(inputs["pixel_values"], inputs["pixel_mask"])[-1]
        feats = feats.float().cpu()
        h, w = image.shape[:2]
        fh, fw = feats.shape[-2:]
        scale = torch.tensor([fw / w, fh / h] * 2, dtype=torch.float32)  # one image: no padding beyond the resize
        rois = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)) * scale
        pooled = roi_align(feats, [rois], output_size=ROI, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        return _normalise(feats[0].mean(dim=(1, 2)).numpy()[None])[0], _normalise(pooled.flatten(1).numpy())


class ClipEmbedder:
    """A configured CLIP or SigLIP model (hub id or local directory, e.g. openai/clip-vit-base-patch32 or
    google/siglip-base-patch16-224): the whole image, and each object's crop, through its image tower."""

    BATCH = 32  # crops per forward pass

    def __init__(self, ref: str, model_dir, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel

        from ..models.loading import resolve_model

        path = resolve_model(ref, model_dir)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        if not hasattr(self.model, "get_image_features"):
            raise ConfigError(f"embedding model {ref!r} ({type(self.model).__name__}) has no image tower: use a CLIP or SigLIP model")
        self.processor, self.device = AutoImageProcessor.from_pretrained(path), device

    @torch.inference_mode()
    def _embed(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.BATCH):
            inputs = self.processor(images=images[start : start + self.BATCH], return_tensors="pt").to(self.device)
            features = self.model.get_image_features(**inputs)
            features = getattr(features, "pooler_output", features)  # transformers 5 returns a model output
            out.append(features.float().cpu().numpy())
        return _normalise(np.concatenate(out))

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        crops = []
        for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4):
            x1, y1 = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.floor(y1), 0, h - 1))
            x2, y2 = int(np.clip(np.ceil(x2), x1 + 1, w)), int(np.clip(np.ceil(y2), y1 + 1, h))
            crops.append(image[y1:y2, x1:x2])
        embedded = self._embed([image, *crops])
        return embedded[0], embedded[1:]


def make_embedder(segmenter=None, detector=None):
    """SAM's image encoder when the pipeline has a (HF) SAM, else the detector's backbone."""
    if segmenter is not None and hasattr(segmenter, "processor"):
        return EncoderEmbedder(segmenter)
    if detector is not None:
        return BackboneEmbedder(detector)
    raise ConfigError("review embeddings need the pipeline's SAM or detector: give --segmenter or --detector, "
                      "or run with --no-embeddings")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def compute_embeddings(dataset, embedder: EncoderEmbedder, fields: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """Image embeddings (in dataset order) and, per field, {sample id: (num objects, dim)} patch embeddings."""
    dataset.compute_metadata(progress=False)
    images, patches = [], {f: {} for f in fields}
    for sample in dataset.select_fields(["metadata", *fields]):
        with Image.open(sample.filepath) as im:
            array = np.array(im.convert("RGB"))
        w, h = sample.metadata.width, sample.metadata.height
        per_field = {}
        for f in fields:
            dets = sample[f].detections if sample[f] is not None else []
            per_field[f] = np.array([to_pixels(d.bounding_box, w, h) for d in dets], np.float32).reshape(-1, 4)
        boxes = np.concatenate(list(per_field.values())) if per_field else np.zeros((0, 4), np.float32)
        image_emb, box_emb = embedder(array, boxes)
        images.append(image_emb)
        start = 0
        for f, b in per_field.items():
            patches[f][sample.id] = box_emb[start : start + len(b)]
            start += len(b)
    return np.stack(images), patches


def visualize(dataset, field: str, patches: dict, method: str = "umap") -> str | None:
    """2-D map of `field`'s objects (brain key `<field>_viz`); UMAP, PCA when there are too few objects for UMAP's
    neighbourhood (or umap-learn is missing). Returns the method used."""
    import fiftyone.brain as fob

    view = dataset.select(list(patches)).exists(field)
    embeddings = {sid: e for sid, e in patches.items() if len(e)}
    total = sum(len(e) for e in embeddings.values())
    if total < 3:
        return None
    view = view.select(list(embeddings))
    key = f"{field}_viz"
    if dataset.has_brain_run(key):
        dataset.delete_brain_run(key)
    if method == "umap" and total <= 15:
        log.info("%d %s objects are too few for UMAP; using PCA", total, field)
        method = "pca"
    kwargs = {"pca_dims": None} if method == "tsne" else {}
    try:
        fob.compute_visualization(view, patches_field=field, embeddings=embeddings, method=method, brain_key=key,
                                  progress=False, **kwargs)
    except ImportError as exc:  # umap-learn not installed
        log.warning("UMAP unavailable (%s); using PCA", exc)
        method = "pca"
        fob.compute_visualization(view, patches_field=field, embeddings=embeddings, method=method, brain_key=key,
                                  progress=False)
    return method


def image_level(dataset, image_embeddings: np.ndarray, duplicate_threshold: float = 0.05) -> list[list[str]]:
    """`uniqueness` on every sample; groups of near-duplicate sample ids (cosine distance under the threshold)."""
    import fiftyone.brain as fob

    if len(dataset) < 2:
        return []
    if not np.abs(image_embeddings).max() > 0:  # e.g. a random tiny SAM whose features vanish
        log.warning("image embeddings are all zero: uniqueness and near duplicates are skipped")
        return []
    fob.compute_uniqueness(dataset, embeddings=image_embeddings, progress=False)
    index = fob.compute_near_duplicates(dataset, threshold=duplicate_threshold, embeddings=image_embeddings,
                                        progress=False)
    return [[sid, *(d for d, _ in dups)] for sid, dups in index.neighbors_map.items()]
