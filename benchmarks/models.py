"""Full-size Grounding DINO-T and SAM ViT-B with random weights, written offline in the standard saved format.

Random weights time and weigh the same as trained ones; only their outputs are meaningless."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ml_backend.models.tiny import write_vocab

DONE = ".complete"  # written last, so a half-written directory is rebuilt


def _cached(out: Path) -> bool:
    return (out / DONE).exists()


def write_detector(out: Path, seed: int = 0, make_config=None, image_sizes: dict | None = None) -> Path:
    """Grounding DINO-T by default: `GroundingDinoConfig()` (Swin-T + BERT-base), real processor sizes. Or the
    config `make_config(tokenizer)` returns, with `image_sizes` for the image processor."""
    if _cached(out):
        return out
    from transformers import (
        AutoModelForZeroShotObjectDetection,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = BertTokenizerFast(vocab=str(write_vocab(Path(tmp) / "vocab.txt")), do_lower_case=True)
    config = make_config(tokenizer) if make_config else GroundingDinoConfig()
    AutoModelForZeroShotObjectDetection.from_config(config).eval().save_pretrained(out)
    image_processor = GroundingDinoImageProcessor(**({"size": image_sizes} if image_sizes else {}))
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / DONE).touch()
    return out


def write_segmenter(out: Path, seed: int = 0) -> Path:
    """SAM ViT-B: `SamConfig()` defaults, real processor sizes (longest edge 1024).

    Only the vision encoder's init scale changes: its default `initializer_range` of 1e-10 gives weights around
    1e-10 whose activations are subnormal floats, which made the encoder ~12x slower on this CPU (~100 s instead of
    ~8 s); trained weights are nowhere near that small."""
    if _cached(out):
        return out
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    config = SamConfig()
    config.vision_config.initializer_range = 0.02
    SamModel(config).eval().save_pretrained(out)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(out)
    (out / DONE).touch()
    return out


def write_models(root: Path) -> dict[str, Path]:
    return {"detector": write_detector(root / "grounding-dino-t"), "segmenter": write_segmenter(root / "sam-vit-b")}


def weight_bytes(*models: torch.nn.Module) -> int:
    """fp32 bytes of parameters and buffers (numel * 4), shared tensors counted once per model."""
    return sum(t.numel() * 4 for m in models for t in (*m.parameters(), *m.buffers()))
