"""SAM 3 (transformers `Sam3Model`) as a text-prompted detector: concept segmentation finds every instance of a short
noun phrase, with its box, mask and score, in one model.

Each prompt of the ontology is one concept query on the image's vision features, computed once per image and shared
by its prompts. An instance's score for its prompt is SAM 3's (query score x presence score); from there the rules
are Grounding DINO's (`prompted.py`): a box is kept at its label's threshold, the instances of one label from any
synonym are merged by NMS, near misses and the synonym spread are recorded. Every kept box carries SAM 3's own mask.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import supervision as sv
import torch

from ..ontology import Ontology
from .prompted import check_prompt_lengths, merge, nothing_to_run, prompt_labels, score_boxes
from .registry import BOXES, DETECTOR, MASKS, TEXT_PROMPTS, register
from .tiny import write_tiny_sam3


@register("sam3", roles=DETECTOR, capabilities=(BOXES, MASKS, TEXT_PROMPTS), tiny={"sam3": write_tiny_sam3})
class Sam3Detector:
    gives_masks = True  # every box comes with SAM 3's own mask: the engine runs no segmenter for them

    def __init__(self, path: Path, model_id: str, device: torch.device, batch_size: int = 4):
        from transformers import Sam3Model, Sam3Processor

        self.model_id = model_id
        self.device = device
        self.processor = Sam3Processor.from_pretrained(path)
        self.model = Sam3Model.from_pretrained(path).to(device).eval()
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        self._lock = threading.Lock()

    @torch.inference_mode()
    def _instances(self, image: np.ndarray, prompts: list[str]) -> list[dict]:
        """Per prompt: every instance SAM 3 finds in `image` at any score (`scores`, `boxes` xyxy in pixels,
        `masks` bool at the image's size)."""
        pixels = self.processor(images=[image], return_tensors="pt", input_data_format="channels_last")
        text = self.processor(text=prompts, return_tensors="pt")
        with self._lock:
            vision = self.model.get_vision_features(pixel_values=pixels["pixel_values"].to(self.device))
            found = []
            for i in range(len(prompts)):
                outputs = self.model(vision_embeds=vision, input_ids=text["input_ids"][i : i + 1].to(self.device),
                                     attention_mask=text["attention_mask"][i : i + 1].to(self.device))
                found.append(self.processor.post_process_instance_segmentation(
                    outputs, threshold=0.0, mask_threshold=0.5, target_sizes=[image.shape[:2]])[0])
        return found

    def detect(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        if (answer := nothing_to_run(images, ontology)) is not None:
            return answer
        prompts = [p for p, _ in ontology.prompts]
        check_prompt_lengths(self.processor.tokenizer, prompts, self.max_text_len, "SAM 3's")
        labels = prompt_labels(prompts, ontology)
        return [self._detections(image, prompts, labels, ontology) for image in images]

    def _detections(self, image: np.ndarray, prompts: list[str], labels: torch.Tensor, ontology: Ontology) -> sv.Detections:
        parts = []
        for n, found in enumerate(self._instances(image, prompts)):
            scores = torch.full((len(found["scores"]), len(prompts)), -1.0)  # an instance answers its own prompt only
            scores[:, n] = found["scores"].float().cpu()
            parts.append(score_boxes(scores, labels, prompts, ontology, found["boxes"].float().cpu(),
                                     masks=found["masks"].bool().cpu()))
        return merge(parts, ontology)
