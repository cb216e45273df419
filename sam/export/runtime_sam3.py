"""Run an ONNX export of SAM 3 with onnxruntime: `OnnxSam3Predictor`, a `Sam3Predictor` whose
three model calls (image pass, text pass, heads) are the sessions of a folder that
`sam.export.sam3.export_sam3_onnx` wrote.

The predictor inherits everything else from `Sam3Predictor`: the preprocessing (antialiased
resize to the square, [-1, 1]), the per-query text cache, the exemplar checks and conversion,
`predict` / `predict_many`, and the post-processing (score = presence x query probability,
threshold, boxes to image pixels, mask logits resized to the image and cut at 0). So it returns
the same `Sam3Prediction`s. onnxruntime is imported when a predictor is made.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..sam3.model import ImageFeatures, Sam3Config
from ..sam3.predictor import Sam3Predictor
from .sam3 import read_sam3_manifest

__all__ = ["OnnxSam3Model", "OnnxSam3Predictor"]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


class OnnxSam3Model:
    """The three passes of `sam.sam3.Sam3Image` (`encode_image`, `encode_text`, `decode`, same
    arguments and outputs, CPU tensors) on onnxruntime sessions. `image_passes` of the
    predictor and the text cache work as with the PyTorch model.

    directory: a folder written by `export_sam3_onnx` / `langsam export onnx --sam-type sam3`.
    providers: onnxruntime execution providers (default CPU). A folder exported without the
    text encoder (`--no-text-encoder`) still decodes prompts whose text features are given."""

    def __init__(self, directory: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 session_options: Any = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ImportError(f"OnnxSam3Predictor needs onnxruntime ({error}); pip install 'langsam[export]'") from error
        manifest = read_sam3_manifest(directory)
        folder = Path(directory)
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.manifest = manifest
        self.config = Sam3Config(**manifest["config"])
        self.names = manifest["names"]
        self.sessions: dict[str, Any] = {}
        for key in ("image_encoder", "text_encoder", "heads"):
            name = manifest["files"].get(key)
            if name and (folder / name).is_file():
                self.sessions[key] = ort.InferenceSession(str(folder / name), session_options, providers=providers)
        if "heads" not in self.sessions:
            raise ValueError(f"{os.fspath(folder)!r} holds no heads.onnx; export again without --encoder-only")

    def eval(self) -> "OnnxSam3Model":
        return self

    def _session(self, key: str, flag: str):
        if key not in self.sessions:
            raise ValueError(f"this SAM 3 export has no {key.replace('_', ' ')} (it was exported with {flag})")
        return self.sessions[key]

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels (1, 3, S, S) in [-1, 1] -> the backbone levels (positions are inside the heads
        graph, so `pos` is empty)."""
        session = self._session("image_encoder", "--decoder-only")
        outputs = session.run(self.names["image_encoder_outputs"], {"pixels": _numpy(pixels.float())})
        return ImageFeatures([torch.from_numpy(level) for level in outputs], [])

    def encode_text(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids (B, L) -> (features (B, L, d), valid (B, L))."""
        session = self._session("text_encoder", "--no-text-encoder")
        features, valid = session.run(self.names["text_encoder_outputs"], {"token_ids": _numpy(token_ids.long())})
        return torch.from_numpy(features), torch.from_numpy(valid)

    def pixel_skip_terms(self, image: ImageFeatures) -> None:
        """The heads graph computes the mask head's per-image half itself: nothing to cache."""
        return None

    def image_terms(self, image: ImageFeatures) -> None:
        """The heads graph computes the prompt-free parts itself: nothing to cache."""
        return None

    def decode(self, image: ImageFeatures, text: torch.Tensor, text_valid: torch.Tensor,
               boxes: torch.Tensor | None = None, box_labels: torch.Tensor | None = None,
               box_valid: torch.Tensor | None = None, skip_terms: None = None,
               image_terms: None = None) -> dict[str, torch.Tensor]:
        """As `Sam3Image.decode` (`skip_terms` and `image_terms` are accepted and unused). No boxes is one masked-out box (the graph needs N >= 1; a box
        that is not valid joins no attention and no pooling, so the outputs are those of an
        empty box list)."""
        batch = text.shape[0]
        if boxes is None or boxes.shape[1] == 0:
            boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]]]).expand(batch, 1, 4)
            box_labels = torch.zeros(batch, 1, dtype=torch.int64)
            box_valid = torch.zeros(batch, 1, dtype=torch.bool)
        elif box_valid is None:
            box_valid = torch.ones(boxes.shape[:2], dtype=torch.bool)
        feed = {name: _numpy(level[:1]) for name, level in zip(self.names["image_encoder_outputs"], image.feats)}
        feed.update(text_features=_numpy(text.float()), text_valid=_numpy(text_valid.bool()),
                    boxes=np.ascontiguousarray(_numpy(boxes.float())), box_labels=_numpy(box_labels.long()),
                    box_valid=_numpy(box_valid.bool()))
        logits, presence, pred_boxes, masks = self.sessions["heads"].run(self.names["heads_outputs"], feed)
        return {"logits": torch.from_numpy(logits), "presence": torch.from_numpy(presence),
                "boxes": torch.from_numpy(pred_boxes), "masks": torch.from_numpy(masks)}


class OnnxSam3Predictor(Sam3Predictor):
    """`Sam3Predictor` on an exported SAM 3: `set_image(image)`, then `predict(text=...,
    exemplars=...)` and `predict_many(texts)`, returning the same `Sam3Prediction`s (masks bool
    (N, H, W), boxes xyxy in image pixels, scores = presence x query probability, labels,
    presence). Outputs are on the CPU.

    directory: a folder written by `export_sam3_onnx` / `langsam export onnx --sam-type sam3`;
    providers / session_options: passed to every onnxruntime session."""

    def __init__(self, directory: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 session_options: Any = None, text_cache_size: int = 256) -> None:
        super().__init__(OnnxSam3Model(directory, providers=providers, session_options=session_options),
                         text_cache_size=text_cache_size)
        self.manifest = self.model.manifest

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def fork(self) -> "OnnxSam3Predictor":
        """A predictor with its own image state and text cache that shares these sessions."""
        twin = copy.copy(self)
        twin._text_cache = type(self._text_cache)()
        twin._features = twin._hw = twin._image_terms = None
        twin.image_passes = 0
        return twin

    def __repr__(self) -> str:
        files = ", ".join(sorted(self.model.sessions))
        return f"OnnxSam3Predictor(image_size={self.image_size}, graphs: {files})"
