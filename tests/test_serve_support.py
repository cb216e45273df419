"""Helpers for tests/test_serve.py (no tests here): a server runner and a micro pipeline.

`python tests/test_serve_support.py CONFIG_JSON` runs `langsam.serve.serve(ServeConfig(**CONFIG))`
until SIGINT (LitServe spawns its worker, so the runner needs the `__main__` guard).

`make_micro_pipeline` builds, in the server's worker, a `LangSAM` whose SAM is far smaller than
the tiny checkpoint models (a 32-wide decoder instead of SAM's 256-wide one) and whose detector
returns fixed boxes. The load test uses it to send hundreds of requests in seconds on two CPU
cores; what it checks (queueing, batching, errors, memory) does not depend on the model size.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


GATE_ENV = "LANGSAM_TEST_GATE"


class FixedBoxes:
    """A detector that finds every query at fixed fractions of the image (two boxes).

    While the file named by $LANGSAM_TEST_GATE exists, `detect` waits (at most a minute): the
    queue test holds the worker with it, so that requests pile up without any timing guesswork.
    """

    BOXES = ((0.1, 0.1, 0.6, 0.7), (0.4, 0.3, 0.95, 0.9))

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        from langsam.detector import Detections, parse_queries

        gate = os.environ.get(GATE_ENV)
        deadline = time.monotonic() + 60
        while gate and os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)

        queries = parse_queries(queries)
        height, width = np.asarray(image).shape[:2]
        boxes = np.array([[x0 * width, y0 * height, x1 * width, y1 * height] for x0, y0, x1, y1 in self.BOXES],
                         dtype=np.float32)
        labels = [queries[index % len(queries)] for index in range(len(boxes))]
        return Detections(boxes, np.array([0.9, 0.8], np.float32), labels, np.arange(len(boxes)) % len(queries),
                          list(labels), list(queries))


def make_micro_sam(seed: int = 0):
    """A random SAM 1 at the real 1024-px input with a 16-wide encoder and a 32-wide decoder."""
    import torch

    from sam.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from sam.sam1 import ImageEncoderViT, Sam
    from sam_factory import randomize_parameters

    torch.manual_seed(seed)
    width = 32
    encoder = ImageEncoderViT(embed_dim=16, depth=1, num_heads=1, out_chans=width, window_size=14,
                              global_attn_indexes=(0,))
    prompt_encoder = PromptEncoder(embed_dim=width, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                   mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=width,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=width, num_heads=2, mlp_dim=64),
                          iou_head_hidden_dim=width)
    return randomize_parameters(Sam(encoder, prompt_encoder, decoder), seed).eval()


def make_micro_pipeline(**settings):
    """`ServeConfig.pipeline_factory` for the load test: micro SAM + fixed boxes."""
    from langsam.pipeline import LangSAM

    return LangSAM(sam_model=make_micro_sam(), detector_model=FixedBoxes(), device=settings.get("device", "cpu"))


def make_sam2_pipeline(**settings):
    """A tiny SAM 2.1 + fixed boxes (the worker-level SAM 2 test)."""
    from sam2_factory import make_tiny_sam2

    from langsam.pipeline import LangSAM

    return LangSAM(sam_model=make_tiny_sam2(), detector_model=FixedBoxes(), device=settings.get("device", "cpu"))


def main(argv: list[str]) -> None:
    import logging

    from langsam.serve import ServeConfig, serve

    logging.basicConfig(level=logging.WARNING)
    serve(ServeConfig(**json.loads(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
