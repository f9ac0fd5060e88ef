"""Embeddings from an encoder's feature map: per image, the map averaged over the cells the image covers (not the
padding); per box, the map ROI-aligned over the box (ROI x ROI cells). Encoders that give a feature map (SAM,
Grounding DINO's backbone, OWL's vision tower) implement `ImageEncoder.embed` with these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import roi_align

ROI = 2  # output cells per side of each box


@dataclass
class FeatureMap:
    features: torch.Tensor  # (1, C, gh, gw), float32 on the CPU
    cells_per_pixel: tuple[float, float]  # (x, y): image pixels -> feature-map cells
    valid: tuple[int, int]  # (rows, cols) of cells covering the image; the rest is padding


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def embed_feature_map(fmap: FeatureMap, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image embedding (C,), box embeddings (N, C*ROI*ROI)) for pixel xyxy `boxes`, L2-normalised."""
    rows, cols = fmap.valid
    image = fmap.features[0, :, :rows, :cols].mean(dim=(1, 2)).numpy()
    scale = torch.tensor(list(fmap.cells_per_pixel) * 2, dtype=torch.float32)
    rois = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)) * scale
    pooled = roi_align(fmap.features, [rois], output_size=ROI, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return normalise(image[None])[0], normalise(pooled.flatten(1).numpy())
