"""A tiny open_clip model with every parameter random, saved in the formats users load.

    files = save_tiny_clip(directory, seed=0)
    ClipScorer(files.model_name, pretrained=files.weights_path)   # registered config + state dict file
    ClipScorer(files.local_dir)                                    # "local-dir:..." (works in a subprocess too)

The weights file is a plain open_clip state dict written with torch.save, exactly the layout of the
released ``open_clip_pytorch_model.bin`` files, so the scorer runs its real loading code.
The local folder is open_clip's own "local-dir:" layout: open_clip_config.json + open_clip_model.safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CLIP_NAME = "langsam-tiny-clip"
# Small enough to build in well under a second; still a real ViT + text transformer with the bundled
# BPE tokenizer (the vocabulary must stay 49408 and the context 77 for that tokenizer).
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# exp(logit_scale): low enough that random embeddings give softmaxes that are not all 0/1.
TINY_CLIP_TEMPERATURE = 25.0


@dataclass(frozen=True)
class TinyClipFiles:
    model_name: str      # registered open_clip name, use with pretrained=weights_path
    weights_path: Path   # torch.save(state_dict) file
    local_dir: str       # "local-dir:/folder", a self-contained model (pretrained is ignored)


def register_tiny_clip(directory: str | Path) -> str:
    """Write the tiny config as <directory>/langsam-tiny-clip.json and register it with open_clip."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)
    return TINY_CLIP_NAME


def randomize_clip_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (norm weights near 1, the rest near 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name == "logit_scale":
                parameter.fill_(math.log(TINY_CLIP_TEMPERATURE))
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = parameter.shape[-1] if parameter.ndim > 1 else 16
                parameter.copy_(noise * min(0.5, fan_in ** -0.5))
    return model


def make_tiny_clip(seed: int = 0, directory: str | Path | None = None) -> torch.nn.Module:
    """The tiny open_clip CLIP model (random weights) in eval mode."""
    import tempfile

    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        register_tiny_clip(directory or tempfile.mkdtemp(prefix="langsam-tiny-clip-"))
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    return randomize_clip_(model, seed).eval()


def save_tiny_clip(directory: str | Path, seed: int = 0) -> TinyClipFiles:
    """Save the tiny model under ``directory`` in both formats; see the module docstring."""
    from safetensors.torch import save_file

    directory = Path(directory)
    model_name = register_tiny_clip(directory)
    state_dict = {k: v.contiguous() for k, v in make_tiny_clip(seed, directory).state_dict().items()}

    weights_path = directory / "open_clip_pytorch_model.bin"
    torch.save(state_dict, weights_path)

    local = directory / "local"
    local.mkdir(exist_ok=True)
    (local / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}, indent=2)
    )
    save_file(state_dict, str(local / "open_clip_model.safetensors"))
    return TinyClipFiles(model_name=model_name, weights_path=weights_path, local_dir=f"local-dir:{local}")


# ----------------------------------------------------------------------------------------------------
# an independent reference for the scores: the documented crop rule written with PIL, and open_clip's
# own encode_image / encode_text (full 77-token pass) + softmax


def load_reference_clip(files: TinyClipFiles):
    """(model, preprocess, tokenizer, fill): open_clip loaded straight from the weights file."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(files.model_name, pretrained=str(files.weights_path))
    model.eval()
    tokenizer = open_clip.get_tokenizer(files.model_name)
    normalize = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    fill = tuple(int(round(255 * m)) for m in normalize.mean)
    return model, preprocess, tokenizer, fill


def reference_crop(image, mask, context_margin, fill):
    """The crop rule of langsam.clip_scorer's docstring, written independently with PIL."""
    import numpy as np
    from PIL import Image

    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    margin = math.floor(context_margin * max(x1 - x0, y1 - y0) + 0.5)
    box = (max(0, x0 - margin), max(0, y0 - margin),
           min(image.shape[1], x1 + margin), min(image.shape[0], y1 + margin))
    photo = Image.fromarray(image).crop(box)
    stencil = Image.fromarray(mask.astype(np.uint8) * 255).crop(box)
    cut_out = Image.composite(photo, Image.new("RGB", photo.size, fill), stencil)
    side = max(photo.size)
    square = Image.new("RGB", (side, side), fill)
    square.paste(cut_out, ((side - photo.size[0]) // 2, (side - photo.size[1]) // 2))
    return square


def reference_probabilities(reference, image, masks, queries, templates, background_prompts=("background",),
                            context_margin=0.1, min_area=100):
    """(kept, probabilities (M, Q + 1)) for the masks with at least ``min_area`` pixels."""
    import numpy as np

    model, preprocess, tokenizer, fill = reference
    kept = np.array([i for i, mask in enumerate(masks) if mask.sum() >= min_area], dtype=np.int64)
    with torch.no_grad():
        crops = [preprocess(reference_crop(image, masks[i], context_margin, fill)) for i in kept]
        image_features = model.encode_image(torch.stack(crops), normalize=True) if crops else None
        phrases = list(queries) + list(background_prompts)
        texts = [template.format(phrase) for phrase in phrases for template in templates]
        per_template = model.encode_text(tokenizer(texts), normalize=True).reshape(len(phrases), len(templates), -1)
        means = per_template.mean(dim=1)
        means = means / means.norm(dim=1, keepdim=True)
        background = means[len(queries):].mean(dim=0)
        text = torch.cat([means[:len(queries)], (background / background.norm())[None]])
        if image_features is None:
            return kept, np.zeros((0, len(queries) + 1), dtype=np.float32)
        logits = model.logit_scale.exp() * image_features @ text.T
    return kept, logits.softmax(dim=-1).numpy()
