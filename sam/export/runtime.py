"""Run an ONNX export of SAM with onnxruntime: `OnnxSamPredictor`, a `SamPredictor` whose
encoder and decoder are the sessions of a folder that `sam.export.onnx.export_onnx` wrote.

It inherits `SamPredictor`'s prompt handling (the input checks, the original-image to
model-input conversion, `predict`, `predict_batch`, thresholding) and replaces only the
two model calls: the encoder run and the decoder run of one prompt set. Building the
decoder's point list (box corners and padding point, as `export_onnx` documents) is the one
step of its own. onnxruntime is imported when a predictor is made.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..predictor import SamPredictor
from ..transforms import ResizeLongestSide, ResizeSquare
from .onnx import BOX_BOTTOM_RIGHT_LABEL, BOX_TOP_LEFT_LABEL, PADDING_LABEL, read_manifest

__all__ = ["OnnxSamPredictor"]



@dataclass(frozen=True)
class _PromptShapes:
    """The prompt-encoder sizes that `SamPredictor`'s input checks read."""

    embed_dim: int
    image_embedding_size: tuple[int, int]
    mask_input_size: tuple[int, int]


class OnnxSamPredictor(SamPredictor):
    """`SamPredictor` running an exported model with onnxruntime: the same methods, arguments,
    input checks and outputs (`set_image`, `predict`, `predict_torch`, `decode`,
    `set_image_batch` / `predict_batch`, `set_embedding`, `get_image_embedding`), so it can stand
    in for one, e.g. `LangSAM(sam_model=OnnxSamPredictor("sam_onnx/"))`.

    directory: a folder written by `export_onnx` / `langsam export onnx`. quantized: use the
    int8 decoder (`decoder.int8.onnx`). providers: onnxruntime execution providers (default
    CPU). Outputs are numpy or CPU torch tensors, as from a CPU `SamPredictor`.

    Each prompt set is one decoder run (the graph takes one prompt set at a time), so
    `predict_torch` with B boxes runs the decoder B times. There is no PyTorch model behind it
    (`model` is None), so what needs one (the automatic mask generator) does not run on it.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        quantized: bool = False,
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ImportError(f"OnnxSamPredictor needs onnxruntime ({error}); pip install 'langsam[export]'") from error
        manifest = read_manifest(directory)
        folder = Path(directory)
        files = manifest["files"]
        decoder_key = "quantized_decoder" if quantized else "decoder"
        if not files.get(decoder_key) or not (folder / files[decoder_key]).is_file():
            what = "an int8 decoder (export with --quantize)" if quantized else "a decoder"
            raise ValueError(f"{os.fspath(folder)!r} does not hold {what}")
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.manifest = manifest
        self.family: str = manifest["family"]
        self.quantized = quantized
        # A decoder-only export works from features set with set_embedding.
        encoder_file = files.get("encoder")
        self.encoder_session = None
        if encoder_file and (folder / encoder_file).is_file():
            self.encoder_session = ort.InferenceSession(str(folder / encoder_file), session_options,
                                                        providers=providers)
        self.decoder_session = ort.InferenceSession(str(folder / files[decoder_key]), session_options,
                                                    providers=providers)
        self.model = None  # no torch model: every model call goes through the sessions
        self.image_size = int(manifest["image_size"])
        self.single_mask = bool(manifest["single_mask"])
        self.prompt_encoder = _PromptShapes(
            int(manifest["embed_dim"]), tuple(manifest["image_embedding_size"]), tuple(manifest["mask_input_size"])
        )
        self.transform = ResizeSquare(self.image_size) if self.family == "sam2" else ResizeLongestSide(self.image_size)
        self._batch = None
        self.reset_image()

    def fork(self) -> "OnnxSamPredictor":
        """A predictor with its own image state that shares this one's onnxruntime sessions
        (loaded once; onnxruntime sessions may run from several threads), e.g. one per visitor
        of the demo's click tab."""
        twin = copy.copy(self)
        twin._batch = None
        twin.reset_image()
        return twin

    def __repr__(self) -> str:
        kind = "int8 decoder" if self.quantized else "fp32"
        return f"OnnxSamPredictor(family={self.family!r}, model_type={self.manifest.get('model_type')!r}, {kind})"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def mask_threshold(self) -> float:
        return float(self.manifest["mask_threshold"])

    # ----------------------------------------------------------------------- image
    def _encode(self, pixels: torch.Tensor) -> Any:
        if self.encoder_session is None:
            raise ValueError("this export has no encoder (--decoder-only): set features with set_embedding, "
                             "e.g. from a PyTorch SamPredictor's features")
        outputs = self.encoder_session.run(None, {"image": pixels.detach().cpu().float().numpy()})
        tensors = [torch.from_numpy(output) for output in outputs]
        if self.family == "sam2":
            return {"image_embed": tensors[0], "high_res_feats": [tensors[1], tensors[2]]}
        return tensors[0]

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """As `SamPredictor.set_image`: (H, W, 3) uint8 RGB; the encoder runs once here."""
        self.reset_image()
        pixels, original_size, input_size = self._prepare(image, image_format)
        self._set(self._encode(pixels), original_size, input_size)

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """As `SamPredictor.set_torch_image`: (1, 3, h, w) in the model-input frame."""
        target = self.image_size
        if (transformed_image.ndim != 4 or transformed_image.shape[0] != 1 or transformed_image.shape[1] != 3
                or max(transformed_image.shape[2:]) != target):
            raise ValueError(f"set_torch_image expects a (1, 3, h, w) tensor with longest side {target}, "
                             f"got shape {tuple(transformed_image.shape)}")
        self.reset_image()
        original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self._set(self._encode(transformed_image), original_size, tuple(transformed_image.shape[-2:]))

    def set_image_batch(self, images: list[np.ndarray], image_format: str = "RGB") -> None:
        """As `SamPredictor.set_image_batch` (one encoder run per image)."""
        if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)) or not images:
            raise ValueError("set_image_batch expects a non-empty list of (H, W, 3) images")
        self.reset_image()
        batch = []
        for image in images:
            pixels, original_size, input_size = self._prepare(image, image_format)
            batch.append((self._encode(pixels), original_size, input_size))
        self._batch = batch

    # ----------------------------------------------------------------------- prompts
    def _prompt_layout(self, coords: np.ndarray | None, labels: np.ndarray | None,
                       box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One prompt set in the model-input frame -> the decoder's (1, N, 2) points and (1, N)
        labels: SAM 1 puts box corners after the clicks, SAM 2 before; a padding point closes
        a list of clicks without a box (SAM 1) or any list (SAM 2). A mask prompt alone gives
        no points at all (N = 0)."""
        parts_xy: list[np.ndarray] = []
        parts_label: list[np.ndarray] = []
        corners = corner_labels = None
        if box is not None:
            corners = np.asarray(box, dtype=np.float32).reshape(2, 2)
            corner_labels = np.array([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], dtype=np.float32)
        if self.family == "sam2" and corners is not None:
            parts_xy.append(corners)
            parts_label.append(corner_labels)
        if coords is not None:
            parts_xy.append(np.asarray(coords, dtype=np.float32).reshape(-1, 2))
            parts_label.append(np.asarray(labels, dtype=np.float32).reshape(-1))
        if self.family == "sam1" and corners is not None:
            parts_xy.append(corners)
            parts_label.append(corner_labels)
        # SAM 1 pads clicks without a box; SAM 2 passes a box as points, so pads any point list.
        if self.family == "sam1":
            pad = coords is not None and box is None
        else:
            pad = coords is not None or box is not None
        if pad:
            parts_xy.append(np.zeros((1, 2), dtype=np.float32))
            parts_label.append(np.array([PADDING_LABEL], dtype=np.float32))
        if not parts_xy:
            return np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.float32)
        return np.concatenate(parts_xy)[None], np.concatenate(parts_label)[None]

    def _run_decoder(self, coords, labels, box, mask_input, orig_im_size) -> list[np.ndarray]:
        point_coords, point_labels = self._prompt_layout(coords, labels, box)
        if mask_input is None:
            mask = np.zeros((1, 1, *self.prompt_encoder.mask_input_size), dtype=np.float32)
            has_mask = np.zeros(1, dtype=np.float32)
        else:
            mask = np.asarray(mask_input, dtype=np.float32).reshape(1, 1, *self.prompt_encoder.mask_input_size)
            has_mask = np.ones(1, dtype=np.float32)
        feed = {"point_coords": point_coords, "point_labels": point_labels, "mask_input": mask,
                "has_mask_input": has_mask, "orig_im_size": np.asarray(orig_im_size, dtype=np.float32)}
        if self.family == "sam2":
            feed["image_embed"] = self.features["image_embed"].numpy()
            feed["high_res_feats_0"] = self.features["high_res_feats"][0].numpy()
            feed["high_res_feats_1"] = self.features["high_res_feats"][1].numpy()
        else:
            feed["image_embeddings"] = self.features.numpy()
        return self.decoder_session.run(["masks", "iou_predictions", "low_res_masks"], feed)

    def _select(self, masks: np.ndarray, iou: np.ndarray, low_res: np.ndarray, multimask_output: bool):
        """The candidates `SamPredictor` returns, from one decoder run's (1, M, ...) outputs."""
        if self.single_mask:
            if multimask_output:
                raise ValueError("this decoder was exported with single_mask=True (--single-mask) and returns "
                                 "one mask; call with multimask_output=False or export without --single-mask")
            return masks, iou, low_res
        if multimask_output:
            return masks[:, 1:], iou[:, 1:], low_res[:, 1:]
        if self.family == "sam1" or not self.manifest["dynamic_multimask"]["enabled"]:
            return masks[:, :1], iou[:, :1], low_res[:, :1]
        # SAM 2: the single-mask token unless it is unstable, then the best multimask token
        # (Sam2MaskDecoder.dynamic_multimask_via_stability_select, on the low-res logits).
        settings = self.manifest["dynamic_multimask"]
        single = low_res[0, 0]
        delta = np.float32(settings["stability_delta"])
        union = int((single > -delta).sum())
        stability = float(np.float32((single > delta).sum()) / np.float32(union)) if union > 0 else 1.0
        chosen = 0 if stability >= settings["stability_thresh"] else 1 + int(np.argmax(iou[0, 1:]))
        pick = slice(chosen, chosen + 1)
        return masks[:, pick], iou[:, pick], low_res[:, pick]

    def _decode_all(self, point_coords, point_labels, boxes, mask_input, multimask_output: bool,
                    orig_im_size: tuple[int, int]):
        """Every prompt set of a (B, ...) batch, one decoder run each -> numpy (B, C, H, W),
        (B, C), (B, C, 256, 256)."""
        self._require_image()
        self._check_prompt_batch(point_coords, point_labels, boxes, mask_input)
        batch = self.prompt_encoder_batch_size(point_coords, boxes, mask_input)
        columns: tuple[list, list, list] = ([], [], [])
        for index in range(batch):
            coords = None if point_coords is None else point_coords[index].detach().cpu().numpy()
            labels = None if point_labels is None else point_labels[index].detach().cpu().numpy()
            box = None if boxes is None else boxes[index].detach().cpu().float().numpy()
            mask = None if mask_input is None else mask_input[index].detach().cpu().float().numpy()
            outputs = self._select(*self._run_decoder(coords, labels, box, mask, orig_im_size), multimask_output)
            for column, value in zip(columns, outputs):
                column.append(value[0])
        return tuple(np.stack(column) for column in columns)

    @staticmethod
    def prompt_encoder_batch_size(point_coords, boxes, mask_input) -> int:
        """B of a prompt batch (1 when no prompt is given, as the prompt encoder counts it)."""
        for value in (point_coords, boxes, mask_input):
            if value is not None:
                return int(value.shape[0])
        return 1

    def _decode_low_res(self, point_coords, point_labels, boxes, mask_input, multimask_output: bool):
        # Only the upscaled output depends on orig_im_size: ask for a 1x1 one, which costs nothing.
        _, iou, low_res = self._decode_all(point_coords, point_labels, boxes, mask_input, multimask_output, (1, 1))
        return torch.from_numpy(low_res), torch.from_numpy(iou)

    def _decode_full_size(self, point_coords, point_labels, boxes, mask_input, multimask_output: bool):
        # The graph upscales to the original image itself.
        masks, iou, low_res = self._decode_all(point_coords, point_labels, boxes, mask_input, multimask_output,
                                               self.original_size)
        return torch.from_numpy(masks), torch.from_numpy(iou), torch.from_numpy(low_res)
