"""transformers renamed the phrase key of Grounding DINO's post-processing (``labels`` ->
``text_labels``) and warns when the old one is read: our detector reads the key the installed
version has, so detection raises no FutureWarning."""

from __future__ import annotations

import warnings

import numpy as np

from langsam.detector import GroundingDinoDetector
from sam_factory import real_photo
from tiny_gdino import reference_detection, save_tiny_grounding_dino


def test_detection_raises_no_future_warning_and_reads_the_phrases(tmp_path):
    folder = save_tiny_grounding_dino(tmp_path / "gdino", logit_scale=0.1, num_queries=8)
    detector = GroundingDinoDetector(str(folder), device="cpu")
    photo = real_photo("chelsea")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        detections = detector.detect(photo, ["a cat", "a remote control"], box_threshold=0.0, text_threshold=0.2)
    _, _, reference = reference_detection(detector.processor, detector.model, photo,
                                          "a cat. a remote control.", 0.0, 0.2)
    assert len(detections) == len(reference["boxes"]) > 0
    key = "text_labels" if "text_labels" in reference else "labels"
    assert sorted(detections.phrases) == sorted(reference[key])
    np.testing.assert_allclose(np.sort(detections.scores), np.sort(reference["scores"].numpy()), atol=1e-6)
