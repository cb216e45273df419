"""The worker side: `LangSAMAPI`, LitServe's four verbs on top of `LangSAM` (see the package docstring)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from queue import Empty
from typing import Any

import litserve as ls
import numpy as np
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop

from langsam.io import ImageLoadError
from langsam.serve.config import _INTERNAL_PATHS, ServeConfig, _resolve_factory
from langsam.serve.images import ImageStore, _StoredImage, decode_image_bytes
from langsam.serve.schemas import _ENCODERS

logger = logging.getLogger(__name__)

@dataclass
class Job:
    """One request, decoded: `op` is segment, auto_masks, set_image or predict."""

    op: str
    params: dict[str, Any]
    deadline: float
    pixels: np.ndarray | None = None


@dataclass
class Failure:
    """A request's own error, carried through the batch instead of raised (LitServe answers a
    whole batch with the error of any hook that raises)."""

    status: int
    detail: str

class _WaitingBatchedLoop(BatchedLoop):
    """LitServe's batched loop, except that an idle worker sleeps on the request queue. (The
    stock loop polls the queue every millisecond: measured on the 2-core dev machine, an idle
    server used 7% of a core with it and 0.2% with this one.)"""

    def get_batch_requests(self, lit_api, request_queue, transport):
        try:
            first = request_queue.get(timeout=1.0)
        except Empty:
            return [], []
        if first == _SENTINEL_VALUE:
            raise _StopLoopError()
        batch, timed_out = [], []
        response_queue_id, uid, timestamp, payload = first
        if lit_api.request_timeout not in (-1, False) and time.monotonic() - timestamp > lit_api.request_timeout:
            timed_out.append((response_queue_id, uid))
        else:
            batch.append((response_queue_id, uid, payload))
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(batch) < lit_api.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=remaining) if remaining > 0 else request_queue.get_nowait()
            except Empty:
                break
            if item == _SENTINEL_VALUE:
                request_queue.put(item)  # stop after this batch
                break
            response_queue_id, uid, timestamp, payload = item
            if lit_api.request_timeout not in (-1, False) and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                batch.append((response_queue_id, uid, payload))
        return batch, timed_out


class LangSAMAPI(ls.LitAPI):
    """The four LitAPI verbs on top of `LangSAM` (see the module docstring).

    role: "all" (every operation), or, when the server is split over several workers,
    "segment" (/v1/segment, /v1/auto-masks) or "interactive" (/v1/images, /v1/predict).
    """

    def __init__(self, config: ServeConfig, role: str = "all") -> None:
        batch_size = config.max_batch_size
        if role == "segment":
            # A worker takes a whole batch off the shared queue and runs it alone: split the batch
            # among the workers, or one worker gets every waiting request and the others idle.
            batch_size = max(1, batch_size // config.workers)
        super().__init__(max_batch_size=batch_size, batch_timeout=config.batch_timeout,
                         api_path=_INTERNAL_PATHS[role], loop=_WaitingBatchedLoop())
        self.config = config
        self.role = role
        self.pipeline = None
        self.images: ImageStore | None = None
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}

    def setup(self, device) -> None:
        """Build the pipeline in the worker and load SAM and the detector now, so that a missing
        model stops the server at start instead of failing every request."""
        from langsam.pipeline import LangSAM

        if self.config.torch_threads is not None:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        settings = dict(self.config.models)
        if settings.get("device") is None and device not in (None, "auto"):
            settings["device"] = device
        factory = _resolve_factory(self.config.pipeline_factory) if self.config.pipeline_factory else LangSAM
        self.pipeline = factory(**settings)
        self.pipeline.predictor
        if self.role != "interactive" and hasattr(self.pipeline, "load_models"):
            self.pipeline.load_models("grounded")  # the detector, or SAM 3 with model="sam3"
        elif self.role != "interactive":  # clicks need no detector: it is never loaded there
            detector = self.pipeline.detector
            if hasattr(detector, "load"):
                detector.load()
        self.images = ImageStore(self.config.max_images)
        logger.info("langsam worker ready: %r", self.pipeline)

    def decode_request(self, request):
        """A queued payload {op, params, deadline, image bytes} -> a `Job`, or a `Failure`."""
        pixels = None
        if request.get("image") is not None:
            try:
                pixels = decode_image_bytes(request["image"], self.config.max_pixels)
            except ImageLoadError as error:
                return Failure(400, str(error))
        return Job(request["op"], request["params"], request["deadline"], pixels)

    def predict(self, jobs):
        """One result (or `Failure`) per job, in order."""
        results: list[Any] = [job if isinstance(job, Failure) else None for job in jobs]
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        now = time.monotonic()
        pending = []
        for index, job in enumerate(jobs):
            if isinstance(job, Failure):
                continue
            if now > job.deadline:
                results[index] = Failure(504, "the request timed out while queued")
            else:
                pending.append(index)
        by_op: dict[str, list[int]] = {}
        for index in pending:
            by_op.setdefault(jobs[index].op, []).append(index)
        # New images first: a batch may hold clicks on other images, never on these.
        self._together(self._set_images, jobs, by_op.get("set_image", []), results)
        self._segment(jobs, by_op.get("segment", []), results)
        for index in by_op.get("auto_masks", []):
            self._guarded(self._auto_masks, jobs, [index], results)
        self._predict(jobs, by_op.get("predict", []), results)
        for index in by_op.get("stats", []):
            results[index] = ("stats", {**self.stats, "images_stored": len(self.images)})
        if len(pending) > 1 or set(by_op) & {"set_image", "segment", "auto_masks"}:
            # The activations of a batch (a fused decoder call, an encoder batch) are freed, but
            # glibc would keep their pages: each new largest batch would raise the worker's RSS for
            # good. Measured on the load test's micro model: a fused call of 8 left 50 MiB more
            # than one of 4; trimming (5-11 ms, ~3% of that call) brings it back every time. A
            # lone click skips it.
            from sam.checkpoint import release_freed_memory

            release_freed_memory()
        return results

    def encode_response(self, output) -> tuple[int, dict[str, Any]]:
        """A result -> (HTTP status, JSON body)."""
        if isinstance(output, Failure):
            return output.status, {"detail": output.detail}
        kind, payload = output
        return 200, _ENCODERS[kind](payload)

    # ------------------------------------------------------------------ operations
    def _guarded(self, operation, jobs: list, indices: list[int], results) -> None:
        """Run `operation` on these jobs, writing `results[index]` (a list, or a dict); a bad
        input or a crash fails only them."""
        if not indices:
            return
        try:
            for index, result in zip(indices, operation([jobs[i] for i in indices])):
                results[index] = result
        except ValueError as error:
            for index in indices:
                results[index] = Failure(400, str(error))
        except Exception as error:  # noqa: BLE001 - one request's crash must not take down the others
            logger.exception("request failed in %s", getattr(operation, "__name__", operation))
            for index in indices:
                results[index] = Failure(500, f"internal error ({type(error).__name__}); see the server log")

    def _set_images(self, jobs: list[Job]) -> list:
        import torch

        predictor = self.pipeline.predictor
        chunk = self.config.encoder_batch_size
        if chunk is None:
            chunk = 1 if predictor.device.type == "cpu" else len(jobs)
        encoded = []
        for start in range(0, len(jobs), chunk):
            group = jobs[start : start + chunk]
            if len(group) == 1:
                predictor.set_image(group[0].pixels)
                encoded.append((predictor.features, predictor.original_size, predictor.input_size))
            else:
                encoded.extend(_encode_batch(predictor, [job.pixels for job in group], torch))
        results = []
        for job, (features, original_size, input_size) in zip(jobs, encoded):
            image_id = self.images.add(_StoredImage(features, original_size, input_size))
            height, width = original_size
            results.append(("image", {"image_id": image_id, "width": int(width), "height": int(height)}))
        return results

    def _segment(self, jobs: list, indices: list[int], results: list) -> None:
        """Segment jobs with the same settings go to `segment_batch` together."""
        groups: dict[tuple, list[int]] = {}
        for index in indices:
            settings = tuple(sorted((k, v) for k, v in jobs[index].params.items() if k != "queries"))
            groups.setdefault(settings, []).append(index)
        for group in groups.values():
            self._together(self._segment_group, jobs, group, results)

    def _together(self, operation, jobs: list, indices: list[int], results: list) -> None:
        """Run `operation` on these jobs in one call; if it raises, run each job alone, so that
        only the faulty one fails."""
        if len(indices) <= 1:
            self._guarded(operation, jobs, indices, results)
            return
        try:
            outputs = operation([jobs[i] for i in indices])
        except Exception:  # noqa: BLE001 - find the request at fault
            for index in indices:
                self._guarded(operation, jobs, [index], results)
            return
        for index, output in zip(indices, outputs):
            results[index] = output

    def _segment_group(self, group: list[Job]) -> list:
        settings = {k: v for k, v in group[0].params.items() if k != "queries"}
        segmentations = self.pipeline.segment_batch(
            [job.pixels for job in group], [job.params["queries"] for job in group], **settings
        )
        return [("segment", segmentation) for segmentation in segmentations]

    def _auto_masks(self, jobs: list[Job]) -> list:
        job = jobs[0]
        records = self.pipeline.auto_masks(job.pixels, output_mode="coco_rle", **job.params)
        height, width = job.pixels.shape[:2]
        return [("auto_masks", {"width": width, "height": height, "records": records})]

    def _predict(self, jobs: list, indices: list[int], results: list) -> None:
        """/v1/predict jobs: with `fuse_decoder`, those of one wave share decoder calls
        (`SamPredictor.predict_fused`); otherwise, or for a predictor without it (an injected
        ONNX one), one decoder call each. The answers are the same either way."""
        predictor = self.pipeline.predictor
        if not self.config.fuse_decoder or len(indices) <= 1 or not hasattr(predictor, "predict_fused"):
            for index in indices:
                self._guarded(self._predict_prompts, jobs, [index], results)
            return
        for wave in _predict_waves(jobs, indices):
            self._predict_fused(jobs, wave, results)

    def _predict_fused(self, jobs: list, indices: list[int], results: list) -> None:
        """One wave of /v1/predict jobs through `predict_fused`. A job's own bad input (an
        unknown image, bad prompts) fails that job alone, before any decoding; if the fused
        call itself fails, each job runs alone, so that only a faulty one fails."""
        predictor = self.pipeline.predictor
        staged: dict[int, Any] = {}
        for index in indices:
            self._guarded(self._stage_prompt_set, jobs, [index], staged)
        ready = []
        for index in indices:
            if isinstance(staged[index], Failure):
                results[index] = staged[index]
            else:
                ready.append((index, *staged[index]))
        if not ready:
            return
        try:
            outputs = predictor.predict_fused([prompt_set for _, _, prompt_set in ready])
        except Exception:  # noqa: BLE001 - find the request at fault
            logger.warning("a fused decoder call failed; decoding its %d jobs one by one", len(ready), exc_info=True)
            for index, _, _ in ready:
                self._guarded(self._predict_prompts, jobs, [index], results)
            return
        for (index, entry, _), output in zip(ready, outputs):
            results[index] = _predict_answer(jobs[index].params, entry, output)

    def _stage_prompt_set(self, jobs: list[Job]) -> list:
        """One /v1/predict job -> [(its stored image, its checked `PromptSet`)], or [Failure]."""
        prepared = self._predict_inputs(jobs[0])
        if isinstance(prepared, Failure):
            return [prepared]
        entry, prompts = prepared
        prompt_set = self.pipeline.predictor.prompt_set(entry.features, entry.original_size, entry.input_size, **prompts)
        return [(entry, prompt_set)]

    def _predict_inputs(self, job: Job) -> tuple[Any, dict[str, Any]] | Failure:
        """A /v1/predict job -> (its stored image, `SamPredictor.predict` prompts), or a Failure."""
        params = job.params
        entry = self.images.get(params["image_id"])
        if entry is None:
            return Failure(404, f"unknown image_id {params['image_id']!r}: it was never issued, or it was dropped "
                                f"(the server keeps the {self.images.capacity} most recently used images); "
                                "POST the image to /v1/images again")
        mask_input = params.get("mask_input")
        if params.get("previous_mask") is not None:
            if entry.low_res is None or params["previous_mask"] >= len(entry.low_res):
                return Failure(400, "previous_mask refers to a candidate of an earlier /v1/predict answer on this "
                                    "image, and there is none with that index")
            mask_input = entry.low_res[params["previous_mask"]][None]
        points = params.get("points")
        labels = params.get("labels")
        return entry, {
            "point_coords": None if points is None else np.asarray(points, dtype=np.float64),
            "point_labels": None if labels is None else np.asarray(labels),
            "box": None if params.get("box") is None else np.asarray(params["box"], dtype=np.float64),
            "mask_input": mask_input,
            "multimask_output": params["multimask"],
        }

    def _predict_prompts(self, jobs: list[Job]) -> list:
        prepared = self._predict_inputs(jobs[0])
        if isinstance(prepared, Failure):
            return [prepared]
        entry, prompts = prepared
        predictor = self.pipeline.predictor
        predictor.set_embedding(entry.features, entry.original_size, entry.input_size)
        return [_predict_answer(jobs[0].params, entry, predictor.predict(**prompts))]


def _predict_answer(params: dict[str, Any], entry: _StoredImage, output: tuple) -> tuple[str, dict[str, Any]]:
    """A /v1/predict job's (masks, scores, low_res) -> its result; the image keeps the low-res
    logits for a later previous_mask."""
    masks, scores, low_res = output
    entry.low_res = low_res
    height, width = entry.original_size
    return ("predict", {"image_id": params["image_id"], "width": int(width), "height": int(height),
                        "masks": masks, "scores": scores, "low_res": low_res if params["return_low_res"] else None})


def _predict_waves(jobs: list, indices: list[int]) -> list[list[int]]:
    """/v1/predict jobs in the order they run together. A job with previous_mask reuses the
    answer of the job before it on the same image, as one at a time would: so it, and every
    later job on that image, wait for the next wave."""
    waves, remaining = [], list(indices)
    while remaining:
        wave, later, seen, blocked = [], [], set(), set()
        for index in remaining:
            image_id = jobs[index].params["image_id"]
            if image_id in blocked or (jobs[index].params.get("previous_mask") is not None and image_id in seen):
                later.append(index)
                blocked.add(image_id)
            else:
                wave.append(index)
                seen.add(image_id)
        waves.append(wave)
        remaining = later
    return waves


def _encode_batch(predictor: Any, images: list[np.ndarray], torch: Any) -> list[tuple]:
    """Several images through the SAM encoder in one call -> [(features, (H, W), (h, w))], as
    `predictor.set_image` would store them one by one (the same numbers, measured)."""
    transform = predictor.transform
    sizes, pixels = [], []
    for image in images:
        height, width = image.shape[:2]
        input_size = transform.get_preprocess_shape(height, width, transform.target_length)
        if min(input_size) < 1:
            raise ValueError(f"image of {width}x{height} pixels is too elongated for SAM")
        sizes.append(((height, width), (int(input_size[0]), int(input_size[1]))))
        pixels.append(transform.to_input_tensor(image, predictor.device).to(dtype=predictor.dtype))
    batch = torch.cat(pixels) if len({tensor.shape for tensor in pixels}) == 1 else pixels
    with torch.no_grad():
        features = predictor.model.encode_image(batch)

    def select(value: Any, index: int) -> Any:
        if isinstance(value, dict):
            return {name: select(item, index) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(select(item, index) for item in value)
        return value[index : index + 1].clone()

    return [(select(features, index), original, input_size) for index, (original, input_size) in enumerate(sizes)]
