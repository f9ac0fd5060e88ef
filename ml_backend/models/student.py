"""The distilled student: torchvision FCOS on a ResNet-18 FPN (BSD-3-Clause), a fixed square input, and one
post-processing shared by the PyTorch and ONNX paths, so both give the same detections.

`StudentRaw` is what ONNX exports: uint8 images (B, 3, S, S), letterboxed -> `boxes` (B, N, 4) xyxy in input
pixels and `scores` (B, N, C) in [0, 1] (FCOS: sqrt(class prob x centerness)). `postprocess` thresholds, keeps the
top candidates per image and applies class-wise NMS. A student directory holds `student.json` (its config and
classes), `model.pt` (weights) and, once exported, `model.onnx`; `StudentDetector` serves either as a `Detector`,
registered for refs `student:DIR`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import supervision as sv
import torch
from torch import nn

from ..errors import ModelUnavailableError
from ..ontology import Ontology
from ..types import NEAR_MISS_BAND, NEAR_MISSES, RUNNER_UP, clip_to_image, make_detections, valid_boxes
from .loading import STUDENT_PREFIX
from .registry import BOXES, DETECTOR, register
from .tiny import write_tiny_student

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE = "student.json", "model.pt", "model.onnx"
LICENSE = "BSD-3-Clause (torchvision FCOS + ResNet-18); weights trained on your labels are yours"


@dataclass
class StudentConfig:
    classes: list[str]
    image_size: int = 512  # square input; images are letterboxed into it
    fpn_channels: int = 128
    head_convs: int = 2
    levels: int = 3  # FPN levels from stride 8: 3 -> P3-P5; up to 5 (P3-P7)
    arch: str = "fcos_resnet18"
    pretrained_backbone: bool = False  # did training start from ImageNet weights?

    def save(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> StudentConfig:
        try:
            return cls(**json.loads((directory / CONFIG_FILE).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ModelUnavailableError(f"{directory} is not a student directory ({CONFIG_FILE}: {exc})") from None


def build_student(config: StudentConfig, backbone_weights=None) -> nn.Module:
    """A torchvision FCOS whose transform neither resizes nor pads (inputs are already S x S)."""
    from torchvision.models import resnet18
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    if config.arch != "fcos_resnet18":
        raise ModelUnavailableError(f"student architecture {config.arch!r} is not known here (known: fcos_resnet18)")
    if not 3 <= config.levels <= 5:
        raise ValueError(f"levels must be 3 to 5, got {config.levels}")
    trunk = resnet18(weights=backbone_weights, norm_layer=nn.BatchNorm2d)
    extra = {3: _no_extra_level(), 4: LastLevelMaxPool(), 5: LastLevelP6P7(config.fpn_channels, config.fpn_channels)}
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512],
                               config.fpn_channels, extra_blocks=extra[config.levels])
    sizes = tuple((8 * 2**i,) for i in range(config.levels))
    anchors = AnchorGenerator(sizes, ((1.0,),) * config.levels)
    model = FCOS(
        backbone, num_classes=len(config.classes), min_size=config.image_size, max_size=config.image_size,
        anchor_generator=anchors, score_thresh=0.05, nms_thresh=0.6, detections_per_img=100, topk_candidates=1000,
    )
    from torchvision.models.detection.fcos import FCOSHead

    model.head = FCOSHead(config.fpn_channels, 1, len(config.classes), num_convs=config.head_convs)
    model.transform.size_divisible = 1
    return model


def _no_extra_level():
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

    class NoExtraLevel(ExtraFPNBlock):
        """FPN extra block adding nothing: P3-P5 only."""

        def forward(self, results, x, names):
            return results, names

    return NoExtraLevel()


def level_anchors(model: nn.Module, size: int) -> torch.Tensor:
    """FCOS anchors (one per feature-map point, xyxy) for an S x S input, in the head's output order."""
    from torchvision.models.detection.image_list import ImageList

    training = model.training
    model.eval()  # a forward in training mode would move BatchNorm's running statistics
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
            features = list(model.backbone(x).values())
            return model.anchor_generator(ImageList(x, [(size, size)]), features)[0]
    finally:
        model.train(training)


class StudentRaw(nn.Module):
    """uint8 (B, 3, S, S) -> (boxes (B, N, 4) xyxy px, scores (B, N, C)); trace- and export-friendly."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.backbone, self.head, self.box_coder = model.backbone, model.head, model.box_coder
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1) * 255)
        self.register_buffer("anchors", level_anchors(model, size))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float() - self.mean) / self.std
        out = self.head(list(self.backbone(x).values()))
        reg = out["bbox_regression"]
        anchors = self.anchors.unsqueeze(0).expand(reg.shape[0], -1, -1)
        boxes = self.box_coder.decode(reg.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(reg.shape)
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        return boxes, scores


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """RGB uint8 HxWx3 -> (3, S, S) uint8, image scaled to fit at the top left; returns (array, scale)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR)) if scale != 1 else image
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = resized
    return out.transpose(2, 0, 1), scale


def postprocess(
    boxes: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray, nms_iou: float = 0.6,
    max_detections: int = 100, candidates: int = 1000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw outputs (N, 4), (N, C) -> (xyxy, score, class, point index) after a (per-class)
    threshold, the top `candidates` and class-wise NMS, best first."""
    from torchvision.ops import batched_nms

    idx, cls = np.nonzero(scores >= np.asarray(threshold, np.float32))
    conf = scores[idx, cls]
    order = np.argsort(-conf, kind="stable")[:candidates]
    idx, cls, conf = idx[order], cls[order], conf[order]
    xyxy = boxes[idx]
    kept = batched_nms(torch.from_numpy(xyxy).float(), torch.from_numpy(conf).float(),
                       torch.from_numpy(cls), nms_iou).numpy()[:max_detections]
    return xyxy[kept], conf[kept], cls[kept], idx[kept]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:8]


def student_id(directory: Path) -> str:
    """The student's model id: its directory's name and its trained weights' digest (the ONNX file derives from
    them), the same whichever runtime serves it."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        return f"student-{Path(directory).name}-{file_digest(path)}"
    except OSError as exc:
        raise ModelUnavailableError(f"{path} cannot be read: {exc}") from None


def load_student_weights(directory: Path) -> tuple[StudentConfig, nn.Module]:
    config = StudentConfig.load(directory)
    model = build_student(config)
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(f"{directory / WEIGHTS_FILE} cannot be read: {exc}") from None
    model.load_state_dict(state)
    return config, model.eval()


class StudentDetector:
    """Serves a student directory as a `Detector`: ONNX Runtime when `model.onnx` is there (and `runtime` is
    "auto" or "onnx"), else PyTorch. Ontology labels map to the student's classes by name (case-insensitive) or
    by any of their prompts; labels it does not know get no boxes (logged once)."""

    def __init__(self, directory: Path, device: torch.device | None = None, batch_size: int = 8, runtime: str = "auto"):
        self.directory = Path(directory)
        self.config = StudentConfig.load(self.directory)
        self.batch_size = batch_size
        onnx_path = self.directory / ONNX_FILE
        use_onnx = runtime == "onnx" or (runtime == "auto" and onnx_path.exists() and (device is None or device.type == "cpu"))
        if use_onnx:
            try:
                import onnxruntime as ort
            except ImportError:
                if runtime == "onnx":
                    raise ModelUnavailableError("onnxruntime is not installed (pip install 'prelabel[distill]')") from None
                log.warning("onnxruntime is not installed: serving %s with PyTorch", self.directory)
                use_onnx = False
        if use_onnx:
            if not onnx_path.exists():
                raise ModelUnavailableError(f"{onnx_path} does not exist; run `prelabel distill` with export first")
            self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            self.runtime = "onnx"
        else:
            _, model = load_student_weights(self.directory)
            self.device = device or torch.device("cpu")
            self.raw = StudentRaw(model, self.config.image_size).to(self.device).eval()
            self.runtime = "torch"
        self.model_id = student_id(self.directory)
        self._warned: set[str] = set()

    def raw_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 3, S, S) -> (boxes, scores) as numpy."""
        if self.runtime == "onnx":
            boxes, scores = self.session.run(None, {"images": batch})
            return boxes, scores
        with torch.inference_mode():
            boxes, scores = self.raw(torch.from_numpy(batch).to(self.device))
        return boxes.cpu().numpy(), scores.cpu().numpy()

    def class_map(self, ontology: Ontology) -> list[tuple[int, int, float]]:
        """(student class, ontology label index, threshold) for each label the student knows."""
        folded = {c.casefold(): i for i, c in enumerate(self.config.classes)}
        pairs = []
        for j, spec in enumerate(ontology.labels):
            hit = next((folded[n.casefold()] for n in (spec.name, *spec.prompts) if n.casefold() in folded), None)
            if hit is None:
                if spec.name not in self._warned:
                    self._warned.add(spec.name)
                    log.warning("student %s has no class %r (classes: %s); it predicts none",
                                self.model_id, spec.name, self.config.classes)
                continue
            pairs.append((hit, j, spec.threshold))
        return pairs

    def detect(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        pairs = self.class_map(ontology)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            boxed = [letterbox(im, self.config.image_size) for im in chunk]
            boxes, scores = self.raw_outputs(np.stack([b for b, _ in boxed]))
            for image, (_, scale), b, s in zip(chunk, boxed, boxes, scores):
                out.append(self._one(image, b / scale, s, pairs, ontology))
        return out

    def _one(self, image, boxes, scores, pairs, ontology: Ontology) -> sv.Detections:
        """Boxes over their label's threshold; candidates within `NEAR_MISS_BAND` below it are near misses."""
        names = ontology.names
        if not pairs:
            return make_detections(np.zeros((0, 4)), [], [], [], **{RUNNER_UP: np.zeros(0, np.float32)})
        h, w = image.shape[:2]
        inside = valid_boxes(boxes, w, h)  # a box in the letterbox padding only is no box of the image
        boxes = clip_to_image(boxes[inside], w, h)
        sub = scores[inside][:, [c for c, _, _ in pairs]]
        thresholds = np.array([t for _, _, t in pairs], np.float32)
        # candidates from NEAR_MISS_BAND below each threshold, but none under 0.01 unless the threshold is lower
        floor = np.maximum(thresholds - NEAR_MISS_BAND, np.minimum(thresholds, 0.01))
        xyxy, conf, k, point = postprocess(boxes, sub, floor, ontology.nms_iou, ontology.max_detections)
        near = conf < thresholds[k]
        gaps = (conf[near] - thresholds[k[near]]).tolist()
        xyxy, conf, k, point = xyxy[~near], conf[~near], k[~near], point[~near]
        others = sub[point].copy()  # the best other known class at the same point: the confusion signal
        others[np.arange(len(k)), k] = 0
        label_ids = np.array([pairs[i][1] for i in k], int)
        runner_up = others.max(1) if len(pairs) > 1 else np.zeros(len(k), np.float32)
        det = make_detections(xyxy, conf, label_ids, [names[j] for j in label_ids], **{RUNNER_UP: runner_up})
        det.metadata[NEAR_MISSES] = gaps
        return det


@register(name="student", prefix=STUDENT_PREFIX, roles=DETECTOR, capabilities=(BOXES,),
          tiny={"student": write_tiny_student}, identify=student_id)
def load_student(path: Path, model_id: str, device: torch.device, batch_size: int = 8) -> StudentDetector:
    """The registry's builder: a student directory (its id comes from its weights, not the ref)."""
    return StudentDetector(path, device, batch_size)
