"""Tiny randomly initialised models, written offline in the standard saved format, one writer per kind: Grounding
DINO, MM-Grounding-DINO, OWLv2, OWL-ViT, SAM, SAM 3, SAM 2 video, CLIP, SigLIP and the distilled student.

They exercise exactly the loading and inference code that real weights use; tests and CI run on them. Each model
family names its writers in its registration (`registry.register(tiny=...)`); `write_tiny_kinds` writes them all."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch

from .loading import quiet_weights

WORDS = (
    "a an the of and with on in photo object thing person people man woman car truck bus bike bicycle cat dog bird "
    "horse cow sheep bottle plastic glass can soda cup box package product shelf label tire wheel window door "
    "crack scratch dent rust defect damage roof wall tree house sign light red green blue white black small big"
).split()


def write_vocab(path: Path) -> Path:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.punctuation) + list(string.digits)
    tokens += list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase + string.digits] + WORDS
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def write_tiny_detector(out: Path, seed: int = 0, family: str = "grounding-dino") -> Path:
    """`family` is "grounding-dino" or "mm-grounding-dino" (same architecture shape, different model type)."""
    from transformers import (
        AutoModelForZeroShotObjectDetection,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        SwinConfig,
    )

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = BertTokenizerFast(vocab=str(write_vocab(Path(tmp) / "vocab.txt")), do_lower_case=True)
    # every image is stretched to 64 x 64 (boxes are relative, so they map back to any shape): the feature levels
    # (stages 1-3 at 16, 8 and 4 cells, the extra level at 2) never collapse to the 1 x 1 a group norm rejects, as
    # an aspect-preserving resize of a square or very thin image would
    backbone = SwinConfig(
        window_size=7, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1], image_size=64,
        out_features=["stage1", "stage2", "stage3"], out_indices=[1, 2, 3],
    )
    text = dict(
        model_type="bert", vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=32,
    )
    config_class = {"grounding-dino": GroundingDinoConfig, "mm-grounding-dino": MMGroundingDinoConfig}[family]
    config = config_class(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_queries=10, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )
    AutoModelForZeroShotObjectDetection.from_config(config).eval().save_pretrained(out)
    image_processor = GroundingDinoImageProcessor(size={"height": 64, "width": 64})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


# SAM keeps the aspect ratio (longest side to SAM_SIZE): a side shorter than 1 / (2 * SAM_SIZE) of the longest rounds
# to 0 pixels and fails, as with any SAM (the real ones at 1024 px); at 256 a 1-pixel-high image may be 512 wide.
# A 4 x 4 grid of patches keeps the encoder as cheap as at 64 px.
SAM_SIZE = 256


def write_tiny_segmenter(out: Path, seed: int = 0) -> Path:
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=4, image_size=SAM_SIZE,
            patch_size=SAM_SIZE // 4, window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=16,
            initializer_range=0.02,  # the default 1e-10 gives all-zero (subnormal) image features
        ),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=SAM_SIZE, patch_size=SAM_SIZE // 4,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=4, iou_head_hidden_dim=32
        ),
    )
    SamModel(config).eval().save_pretrained(out)
    image_processor = SamImageProcessor(
        size={"longest_edge": SAM_SIZE}, pad_size={"height": SAM_SIZE, "width": SAM_SIZE},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(out)
    return out


def write_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A tiny random CLIP (image and text towers, tokenizer, processor), e.g. for review embeddings."""
    return write_tiny_classifier(out, seed, family="clip")


def clip_tokenizer(max_length: int = 32):
    """A character-level CLIP BPE tokenizer (no merges); end-of-text has the largest id, as CLIP's pooling needs,
    and start-of-text a non-zero one, as OWL's query mask needs."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["!", *chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="!")


def write_tiny_owl(out: Path, seed: int = 0, family: str = "owlv2") -> Path:
    """A tiny random OWLv2 ("owlv2": pads images to a square) or OWL-ViT ("owlvit": stretches them), 64 px input."""
    import transformers as tf

    classes = {"owlv2": ("Owlv2Config", "Owlv2ForObjectDetection", "Owlv2ImageProcessor", "Owlv2Processor"),
               "owlvit": ("OwlViTConfig", "OwlViTForObjectDetection", "OwlViTImageProcessor", "OwlViTProcessor")}
    if family not in classes:
        raise ValueError(f"family {family!r} is not one of {sorted(classes)}")
    config_class, model_class, image_processor_class, processor_class = (getattr(tf, n) for n in classes[family])
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer(32)  # characters are tokens: room for prompts of up to 30 characters
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = tower | dict(vocab_size=len(tokenizer), max_position_embeddings=32, pad_token_id=0,
                        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1)
    config = config_class(text_config=text, vision_config=tower | dict(image_size=64, patch_size=8), projection_dim=16)
    model = model_class(config).eval()
    with torch.no_grad():  # logits = cosine similarity (scores in sigmoid([-1, 1])) instead of random saturation
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
    model.save_pretrained(out)
    size = {"height": 64, "width": 64}
    image_processor = image_processor_class(size=size, **({"crop_size": size} if family == "owlvit" else {}))
    processor_class(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def write_tiny_student(out: Path, seed: int = 0, classes: tuple[str, ...] = ("car", "person")) -> Path:
    """A tiny random distilled student (FCOS on ResNet-18, 64 px input, slim FPN): `student.json` and `model.pt`."""
    from .student import WEIGHTS_FILE, StudentConfig, build_student

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    config = StudentConfig(classes=list(classes), image_size=64, fpn_channels=32, head_convs=1, levels=3)
    torch.save(build_student(config).eval().state_dict(), out / WEIGHTS_FILE)
    config.save(out)
    return out


def write_tiny_kinds(out: Path, kinds: list[str] | None = None) -> dict[str, str]:
    """A tiny model of every registered kind (or of `kinds`) as `out/<kind>`; returns {kind: model ref}."""
    from .registry import write_tiny

    return write_tiny(out, kinds)


@quiet_weights()
def write_tiny_models(out: Path, seed: int = 0) -> dict[str, Path]:
    out = Path(out)
    return {
        "detector": write_tiny_detector(out / "detector", seed),
        "segmenter": write_tiny_segmenter(out / "segmenter", seed),
    }


def write_tiny_classifier(out: Path, seed: int = 0, family: str = "clip") -> Path:
    """A tiny random zero-shot classifier with tokenizer and processor, loadable by `AutoModel`/`AutoProcessor`:
    `family` "clip" (softmax over choices) or "siglip" (sigmoid per choice). The tokenizer is the same small
    WordPiece vocabulary as the tiny detector's, so the text the model receives can be read back."""
    from transformers import (
        BertTokenizerFast,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    if family not in ("clip", "siglip"):
        raise ValueError(f"family {family!r} is not 'clip' or 'siglip'")
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = BertTokenizerFast(vocab=str(write_vocab(Path(tmp) / "vocab.txt")), do_lower_case=True)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = tower | dict(vocab_size=len(tokenizer), max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = tower | dict(image_size=32, patch_size=8)
    if family == "clip":
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(out)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    else:
        SiglipModel(SiglipConfig(text_config=text | {"projection_size": 16}, vision_config=vision)).eval().save_pretrained(out)
        SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(out)
    return out


def write_tiny_sam3(out: Path, seed: int = 0, width: int = 32) -> Path:
    """A tiny random SAM 3 saved as the hub's `facebook/sam3` is (`sam3_video`: the concept detector and the click
    tracker on one backbone), 112 px input, 20 queries, with the character-level CLIP tokenizer. `width` is the
    feature width the detector heads and the tracker share; video tracking needs 128 (the memory attention reads
    64-channel memories, fixed in transformers, and splits object pointers into memory-sized tokens, so the width
    must be a multiple of 64 above it); clicks and detection work at any width."""
    from transformers import (
        Sam3Config, Sam3ImageProcessor, Sam3Processor, Sam3TrackerVideoConfig, Sam3VideoConfig, Sam3VideoModel,
    )

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer(32)
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    wide = small | dict(hidden_size=width)
    backbone = small | dict(model_type="sam3_vit_model", num_hidden_layers=2, image_size=112, patch_size=14,
                            window_size=4, global_attn_indexes=[1], pretrain_image_size=56)
    text = small | dict(vocab_size=len(tokenizer), projection_dim=32, num_hidden_layers=2, max_position_embeddings=32,
                        pad_token_id=0, bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1)
    vision = dict(backbone_config=backbone, fpn_hidden_size=width, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])
    detector = Sam3Config(
        vision_config=vision, text_config=text, geometry_encoder_config=wide | dict(num_layers=1),
        detr_encoder_config=wide | dict(num_layers=1), detr_decoder_config=wide | dict(num_layers=1, num_queries=20),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=2),
    )
    tracker = Sam3TrackerVideoConfig(
        vision_config=vision, prompt_encoder_config=dict(hidden_size=width, image_size=112, patch_size=14),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32),
        image_size=112, memory_attention_hidden_size=width, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[8, 8],
        memory_encoder_hidden_size=width, memory_encoder_output_channels=64 if width > 64 else width // 2,
        mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
    )
    config = Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker.to_dict())
    Sam3VideoModel(config).eval().save_pretrained(out)
    image_processor = Sam3ImageProcessor(size={"height": 112, "width": 112}, mask_size={"height": 32, "width": 32})
    Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


SAM2_VIDEO_SIZE = 128  # input side; features at 32, 16 and 8 cells


def write_tiny_sam2_video(out: Path, seed: int = 0) -> Path:
    """A tiny random SAM 2 video model (`sam2_video`, as the hub's `facebook/sam2.1-hiera-*`; ~1.3M parameters),
    128 px input, with its processor. The memory attention reads 64-channel memories (fixed in transformers) and
    object pointers are split into memory-sized tokens, so the hidden size is twice that."""
    from transformers import Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor, Sam2VideoVideoProcessor

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    size, hidden = SAM2_VIDEO_SIZE, 128
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[size, size],
        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4],
    )
    vision = dict(model_type="sam2_vision_model", backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                  backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2], fpn_hidden_size=hidden)
    config = Sam2VideoConfig(
        vision_config=vision, prompt_encoder_config=dict(hidden_size=hidden, image_size=size, patch_size=16),
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        image_size=size, memory_attention_hidden_size=hidden, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=128, memory_attention_rope_feat_sizes=[size // 16] * 2,
        memory_encoder_hidden_size=hidden, memory_encoder_output_channels=64, mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
    )
    Sam2VideoModel(config).eval().save_pretrained(out)
    image_processor = Sam2ImageProcessor(size={"height": size, "width": size},
                                         mask_size={"height": size // 4, "width": size // 4})
    video_processor = Sam2VideoVideoProcessor(size={"height": size, "width": size})
    Sam2VideoProcessor(image_processor=image_processor, video_processor=video_processor, target_size=size).save_pretrained(out)
    return out
