"""Embeddings for review from a model's image encoder (`models.ImageEncoder`): by default the engine's own (SAM 3's
when it is the detector, else SAM's cached image embedding, else the detector's backbone), so nothing is downloaded;
or, when configured, another image encoder (a CLIP/SigLIP model on the image and on each object's crop, SAM, SAM 3). Then FiftyOne Brain's visualization (UMAP), uniqueness and near
duplicates, always with `embeddings=` given."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..models import ImageEncoder, build_embedder
from .convert import to_pixels

log = logging.getLogger(__name__)


class Embedder:
    """(image embedding (C,), box embeddings (N, D)), L2-normalised, for an RGB image and pixel xyxy boxes."""

    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.embed(image, boxes)


class EncoderEmbedder(Embedder):
    """The segmenter's image encoder (HF SAM, or SAM 3: its cache of image features is reused)."""

    def __init__(self, segmenter):
        if not isinstance(segmenter, ImageEncoder):
            raise ConfigError("review embeddings use the engine's SAM image encoder: configure a (HF) SAM segmenter "
                              "(e.g. --segmenter DIR), or run with --no-embeddings")
        super().__init__(segmenter)


class BackboneEmbedder(Embedder):
    """The detector's own image encoder (e.g. Grounding DINO's Swin, last stage), for engines without SAM."""

    def __init__(self, detector):
        if not isinstance(detector, ImageEncoder):
            raise ConfigError(f"detector {getattr(detector, 'model_id', detector)!r} has no image encoder to embed with")
        super().__init__(detector)


class ClipEmbedder(Embedder):
    """A configured image encoder (hub id or local directory): CLIP or SigLIP (e.g. openai/clip-vit-base-patch32 or
    google/siglip-base-patch16-224: the whole image, and each object's crop, through its image tower), or any other
    registered one (SAM, SAM 3: features pooled over each object's box)."""

    def __init__(self, ref: str, model_dir, device: torch.device):
        super().__init__(build_embedder(ref, model_dir, device))


def make_embedder(segmenter=None, detector=None) -> Embedder:
    """A detector that segments too (SAM 3: the teacher's own encoder), else SAM's image encoder when the engine has
    one (HF SAM), else the detector's."""
    if getattr(detector, "gives_masks", False) and isinstance(detector, ImageEncoder):
        return EncoderEmbedder(detector)
    if isinstance(segmenter, ImageEncoder):
        return EncoderEmbedder(segmenter)
    if detector is not None:
        return BackboneEmbedder(detector)
    raise ConfigError("review embeddings need the engine's SAM or detector: give --segmenter or --detector, "
                      "or run with --no-embeddings")


def compute_embeddings(dataset, embedder: Embedder, fields: tuple[str, ...]) -> tuple[np.ndarray, dict]:
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
