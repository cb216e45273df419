"""The Gradio demo, driven through its HTTP API with gradio_client.

The app runs on tiny random models saved in the real formats. Each tab's output is checked
against the library called directly with the same input: the overlay pixel for pixel, the
COCO JSON through pycocotools, each click's mask against SamPredictor with the same prompts.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from demo_support import (  # noqa: E402
    TEST_MAX_DISPLAY_SIDE,
    save_photo,
    serve,
    tiny_model_settings,
)
from langsam.demo import (  # noqa: E402
    CLICK_BOX,
    CLICK_NEGATIVE,
    CLICK_POSITIVE,
    auto_overlay,
    build_app,
    parse_queries,
)
from langsam.demo.models import LazyPipeline as _LazyPipeline  # noqa: E402
from langsam.pipeline import LangSAM  # noqa: E402
from langsam.result import Segmentation  # noqa: E402
from sam import SamPredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_CROP = (150, 200)  # (H, W): below the test display limit, so nothing is downscaled
# A 2x2 point grid and no quality filter: random weights give low predicted IoUs.
AMG_SMALL = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
             "box_nms_thresh": 0.7, "crop_n_layers": 0}


class SmallAutoLangSAM(LangSAM):
    """LangSAM whose automatic masks default to :data:`AMG_SMALL`, so clip mode (which builds
    its CLIP index from the automatic masks) stays fast on CPU. Everything else is LangSAM's."""

    def auto_masks(self, image, **amg_params):
        return super().auto_masks(image, **{**AMG_SMALL, **amg_params})


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_settings(tmp_path_factory, tiny_sam_checkpoint):
    return tiny_model_settings(tmp_path_factory.mktemp("demo-models"), tiny_sam_checkpoint)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-photos")
    small = save_photo(folder / "small.png", "chelsea", crop=SMALL_CROP)
    other = save_photo(folder / "other.png", "coffee", crop=SMALL_CROP)
    large = save_photo(folder / "chelsea.png", "chelsea")  # 451 x 300: downscaled for display
    return SimpleNamespace(folder=folder, small=small, small_path=folder / "small.png", other=other,
                           other_path=folder / "other.png", large=large, large_path=folder / "chelsea.png")


@pytest.fixture(scope="module")
def demo(model_settings):
    pipeline = SmallAutoLangSAM(**model_settings)
    factory_calls = []

    def factory():
        factory_calls.append(threading.get_ident())
        return pipeline

    app = build_app(factory, max_display_side=TEST_MAX_DISPLAY_SIDE)
    assert factory_calls == [], "build_app must not load models"
    with serve(app) as url:
        yield SimpleNamespace(url=url, app=app, pipeline=pipeline, factory_calls=factory_calls,
                              client=Client(url, verbose=False))


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def read_mask_png(path) -> np.ndarray:
    with Image.open(path) as image:
        values = np.asarray(image)
    assert set(np.unique(values)) <= {0, 255}
    return values == 255


# --------------------------------------------------------------------------------------------
# Tab 1: text
# --------------------------------------------------------------------------------------------


def run_text(client, path, query, mode="grounded", box=0.3, text=0.25, clip=0.5, multimask=False, top_k=3):
    return client.predict(handle_file(str(path)), query, mode, box, text, clip, multimask, top_k,
                          api_name="/segment_text")


def test_text_tab_matches_pipeline(demo, photos):
    overlay_path, gallery, table, coco_path, zip_path, status = run_text(demo.client, photos.small_path, "cat, dog")
    expected = demo.pipeline.segment(photos.small, ["cat", "dog"], box_threshold=0.3, text_threshold=0.25,
                                     mode="grounded", clip_threshold=0.5, top_k=3)
    assert len(expected) == 3, "the tiny detector is expected to find boxes at these thresholds"

    overlay = read_png(overlay_path)
    assert overlay.shape == photos.small.shape
    np.testing.assert_array_equal(overlay, np.asarray(expected.overlay(photos.small)))

    assert [row[1] for row in table["data"]] == expected.labels
    np.testing.assert_allclose([row[2] for row in table["data"]], expected.scores, atol=1e-4)
    np.testing.assert_allclose([row[3] for row in table["data"]], expected.mask_scores, atol=1e-4)
    assert [row[9] for row in table["data"]] == [int(m.sum()) for m in expected.masks]
    assert len(gallery) == 3 and all(item["caption"].split()[1] in ("cat", "dog") for item in gallery)
    assert status.startswith("3 object(s) in grounded mode")

    from pycocotools.coco import COCO

    dataset = json.loads(Path(coco_path).read_text())
    coco = COCO(coco_path)
    assert coco.imgs[1]["height"] == SMALL_CROP[0] and coco.imgs[1]["width"] == SMALL_CROP[1]
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert len(annotations) == 3 == len(dataset["annotations"])
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    for index, annotation in enumerate(sorted(annotations, key=lambda a: a["id"])):
        np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), expected.masks[index])
        assert names[annotation["category_id"]] == expected.labels[index]

    with zipfile.ZipFile(zip_path) as archive:
        names_in_zip = sorted(archive.namelist())
        assert len(names_in_zip) == 3
        for index, name in enumerate(names_in_zip):
            assert name.startswith(f"{index:03d}_{expected.labels[index]}")
            mask = np.asarray(Image.open(io.BytesIO(archive.read(name)))) == 255
            np.testing.assert_array_equal(mask, expected.masks[index])

    # The files were written into the app's own temp folder (then copied to gradio's cache).
    written = {p.name for p in Path(demo.app.langsam_output_dir).rglob("*") if p.is_file()}
    assert {"small.coco.json", "small_masks.zip"} <= written


@pytest.mark.parametrize("mode", ["hybrid", "clip"])
def test_text_tab_clip_modes_match_pipeline(demo, photos, mode):
    # Hybrid decodes every box before CLIP filters them: keep the three best boxes only.
    scores = np.sort(demo.pipeline.detector.detect(photos.small, ["cat", "dog"], box_threshold=0.0,
                                                   text_threshold=0.0).scores)[::-1]
    box_threshold = float(scores[2] + scores[3]) / 2
    assert scores[2] > box_threshold > scores[3]
    _, _, table, _, _, status = run_text(demo.client, photos.small_path, "cat, dog", mode=mode, box=box_threshold,
                                         text=0.0, clip=0.0, top_k=2)
    expected = demo.pipeline.segment(photos.small, ["cat", "dog"], box_threshold=box_threshold, text_threshold=0.0,
                                     mode=mode, clip_threshold=0.0, top_k=2)
    assert len(expected) >= 1 and expected.clip_scores is not None
    assert [row[1] for row in table["data"]] == expected.labels
    np.testing.assert_allclose([row[4] for row in table["data"]], expected.clip_scores, atol=1e-4)
    np.testing.assert_allclose([row[2] for row in table["data"]], expected.scores, atol=1e-4)
    assert [row[9] for row in table["data"]] == [int(m.sum()) for m in expected.masks]
    assert status.startswith(f"{len(expected)} object(s) in {mode} mode")


def test_large_image_is_downscaled_for_display_only(demo, photos):
    overlay_path, _, table, coco_path, _, _ = run_text(demo.client, photos.large_path, "cat", top_k=1)
    height, width = photos.large.shape[:2]
    scale = TEST_MAX_DISPLAY_SIDE / max(height, width)
    overlay = read_png(overlay_path)
    assert overlay.shape == (round(height * scale), round(width * scale), 3)
    expected = demo.pipeline.segment(photos.large, ["cat"], top_k=1)
    resized = expected.overlay(photos.large).resize(overlay.shape[1::-1], Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(overlay, np.asarray(resized))
    # The download keeps the full resolution.
    dataset = json.loads(Path(coco_path).read_text())
    assert (dataset["images"][0]["height"], dataset["images"][0]["width"]) == (height, width)
    assert dataset["annotations"][0]["segmentation"]["size"] == [height, width]


# --------------------------------------------------------------------------------------------
# Tab 2: click and box
# --------------------------------------------------------------------------------------------


def best_first(predictor, points, labels, box=None):
    masks, scores, _ = predictor.predict(
        point_coords=np.array(points, dtype=np.float32) if points else None,
        point_labels=np.array(labels) if points else None,
        box=None if box is None else np.array(box, dtype=np.float32),
        multimask_output=True,
    )
    order = np.argsort(-scores, kind="stable")
    return masks[order], scores[order]


def test_click_tab_matches_predictor_and_embeds_once(demo, photos):
    model = demo.pipeline.predictor.model
    reference = SamPredictor(model)
    reference.set_image(photos.small)

    encoder_runs = []
    hook = model.image_encoder.register_forward_hook(lambda *args: encoder_runs.append(1))
    try:
        client = Client(demo.url, verbose=False)
        view, candidates, mask_path, info, status = client.predict(handle_file(str(photos.small_path)),
                                                                   api_name="/click_set_image")
        assert read_png(view).shape == photos.small.shape  # no prompt yet: the image itself
        np.testing.assert_array_equal(read_png(view), photos.small)
        assert mask_path is None and info["scores"] is None and "embedded" in status

        # Another visitor uploads another image in between: it must not leak into this session.
        Client(demo.url, verbose=False).predict(handle_file(str(photos.other_path)), api_name="/click_set_image")

        points, labels = [[60.0, 40.0]], [1]
        _, candidates, mask_path, info, _ = client.predict(60, 40, CLICK_POSITIVE, api_name="/click_add_point")
        masks, scores = best_first(reference, points, labels)
        np.testing.assert_array_equal(read_mask_png(mask_path), masks[0])
        np.testing.assert_allclose(info["scores"], scores, atol=1e-5)
        assert info["selected"] == 0 and [c[1] for c in candidates["choices"]] == [0, 1, 2]

        points.append([150.0, 100.0])
        labels.append(0)
        _, _, mask_path, info, _ = client.predict(150, 100, CLICK_NEGATIVE, api_name="/click_add_point")
        masks, scores = best_first(reference, points, labels)
        np.testing.assert_array_equal(read_mask_png(mask_path), masks[0])
        np.testing.assert_allclose(info["scores"], scores, atol=1e-5)

        # A box from two corner clicks (given in any order) plus the points.
        client.predict(120, 90, CLICK_BOX, api_name="/click_add_point")
        _, _, mask_path, info, _ = client.predict(20, 10, CLICK_BOX, api_name="/click_add_point")
        assert info["box"] == [20.0, 10.0, 120.0, 90.0] and info["points"] == points
        masks, scores = best_first(reference, points, labels, box=[20, 10, 120, 90])
        np.testing.assert_array_equal(read_mask_png(mask_path), masks[0])
        np.testing.assert_allclose(info["scores"], scores, atol=1e-5)

        # Choosing a candidate only switches the shown mask.
        decoder_state = len(encoder_runs)
        view, _, mask_path, info, _ = client.predict(2, api_name="/click_choose")
        assert info["selected"] == 2
        np.testing.assert_array_equal(read_mask_png(mask_path), masks[2])
        assert read_png(view).shape == photos.small.shape

        _, _, _, info, _ = client.predict(api_name="/click_undo")
        assert info["points"] == points and info["box"] is None  # the box was the last prompt
        _, _, _, info, _ = client.predict(api_name="/click_undo")
        assert info["points"] == points[:1] and info["labels"] == labels[:1]
        _, _, mask_path, info, _ = client.predict(api_name="/click_clear")
        assert mask_path is None and info["points"] == [] and info["scores"] is None

        # A box typed as numbers (corners in any order), no points.
        _, _, mask_path, info, _ = client.predict(130, 95, 30, 15, api_name="/click_set_box")
        assert info["box"] == [30.0, 15.0, 130.0, 95.0] and info["points"] == []
        masks, scores = best_first(reference, [], [], box=[30, 15, 130, 95])
        np.testing.assert_array_equal(read_mask_png(mask_path), masks[0])
        np.testing.assert_allclose(info["scores"], scores, atol=1e-5)
    finally:
        hook.remove()
    # One encoder run per uploaded image (two uploads), none for the prompt changes.
    assert len(encoder_runs) == 2 == decoder_state


def test_click_tab_on_onnxruntime(model_settings, photos, tmp_path):
    """``build_app(click_onnx=DIR)``: the click tab runs the exported SAM on onnxruntime, one
    session set for all visitors, each visitor with their own image."""
    pytest.importorskip("onnxruntime")
    from sam import build_sam
    from sam.export import OnnxSamPredictor, export_onnx

    export_onnx(build_sam("auto", checkpoint=model_settings["sam_checkpoint"]), tmp_path / "onnx")
    reference = OnnxSamPredictor(tmp_path / "onnx")
    reference.set_image(photos.small)
    app = build_app(model_settings, max_display_side=TEST_MAX_DISPLAY_SIDE, click_onnx=tmp_path / "onnx")
    with serve(app) as url:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(photos.small_path)), api_name="/click_set_image")
        Client(url, verbose=False).predict(handle_file(str(photos.other_path)), api_name="/click_set_image")
        _, _, mask_path, info, _ = client.predict(60, 40, CLICK_POSITIVE, api_name="/click_add_point")
        masks, scores = best_first(reference, [[60.0, 40.0]], [1])
        np.testing.assert_array_equal(read_mask_png(mask_path), masks[0])
        np.testing.assert_allclose(info["scores"], scores, atol=1e-5)
    # The visitors' predictors are forks of one loaded predictor: one set of sessions.
    template = app.langsam_context._onnx_template
    assert isinstance(template, OnnxSamPredictor) and template.decoder_session is not reference.decoder_session
    fork = template.fork()
    assert fork.decoder_session is template.decoder_session and not fork.is_image_set
    assert not app.langsam_context.models.loaded  # the click tab never needed the PyTorch pipeline


# --------------------------------------------------------------------------------------------
# Tab 3: everything
# --------------------------------------------------------------------------------------------


def test_everything_tab_matches_generator(demo, photos):
    params = AMG_SMALL
    overlay_path, table, status = demo.client.predict(
        handle_file(str(photos.small_path)), params["points_per_side"], params["pred_iou_thresh"],
        params["stability_score_thresh"], params["box_nms_thresh"], params["crop_n_layers"], api_name="/auto_masks",
    )
    records = sorted(demo.pipeline.auto_masks(photos.small, **params), key=lambda r: -int(r["area"]))
    assert len(records) > 0
    assert status == f"{len(records)} mask(s)."
    assert [row[1] for row in table["data"]] == [int(r["area"]) for r in records]
    expected = auto_overlay(photos.small, [r["segmentation"] for r in records])
    np.testing.assert_array_equal(read_png(overlay_path), np.asarray(expected))


def test_auto_overlay_colours_each_mask():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    first = np.zeros((20, 30), dtype=bool)
    first[2:12, 2:12] = True
    second = np.zeros((20, 30), dtype=bool)
    second[5:15, 15:28] = True
    overlay = np.asarray(auto_overlay(image, [first, second]))
    assert (overlay[~(first | second)] == 100).all()  # untouched outside the masks
    assert (overlay[2, 2] == 255).all() and (overlay[5, 15] == 255).all()  # white outlines
    inside_first, inside_second = overlay[6, 6], overlay[10, 20]
    assert not np.array_equal(inside_first, inside_second)
    assert not np.array_equal(inside_first, image[0, 0])


# --------------------------------------------------------------------------------------------
# Behaviour: laziness, errors, queue, limits, files
# --------------------------------------------------------------------------------------------


def test_models_load_lazily_and_once(demo, photos):
    run_text(demo.client, photos.small_path, "cat", top_k=1)
    run_text(Client(demo.url, verbose=False), photos.small_path, "dog", top_k=1)
    assert len(demo.factory_calls) == 1

    calls = []
    barrier = threading.Barrier(8)
    lazy = _LazyPipeline(lambda: calls.append(1) or time.sleep(0.05) or object())
    results = []

    def worker():
        barrier.wait()
        results.append(lazy.get())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_user_errors_are_short_messages(demo, photos, tmp_path):
    client = demo.client
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, "cat", "grounded", 0.3, 0.25, 0.5, False, 0, api_name="/segment_text")
    with pytest.raises(AppError, match="Type at least one query"):
        run_text(client, photos.small_path, " , ;")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    with pytest.raises(AppError, match=r"cannot identify image file .*broken\.png") as caught:
        run_text(client, broken, "cat")
    assert "Traceback" not in str(caught.value)
    with pytest.raises(AppError, match="Value 1.5 is greater than maximum value 1.0"):
        run_text(client, photos.small_path, "cat", box=1.5)
    fresh = Client(demo.url, verbose=False)
    with pytest.raises(AppError, match="Upload an image in this tab first"):
        fresh.predict(10, 10, CLICK_POSITIVE, api_name="/click_add_point")


def test_missing_weights_offline_show_a_clear_message(tmp_path, monkeypatch, model_settings, photos):
    monkeypatch.setenv("LANGSAM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = {**model_settings, "sam_type": "vit_b", "sam_checkpoint": None}
    with serve(build_app(settings)) as url:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="Could not load the models: SAM checkpoint sam_vit_b_01ec64.pth "
                                           "is not in the cache") as caught:
            client.predict(handle_file(str(photos.small_path)), api_name="/click_set_image")
        assert "--sam-checkpoint" in str(caught.value)
    no_detector = {**model_settings, "detector": "IDEA-Research/grounding-dino-tiny"}
    with serve(build_app(no_detector)) as url:
        with pytest.raises(AppError, match="Could not load the models: .*grounding-dino-tiny"):
            run_text(Client(url, verbose=False), photos.small_path, "cat")


class _SlowFake:
    """Records how many model jobs overlap; each job takes 0.3 s."""

    def __init__(self):
        self.active = 0
        self.most_active = 0
        self.jobs = 0
        self.lock = threading.Lock()

    def _job(self):
        with self.lock:
            self.active += 1
            self.jobs += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.3)
        with self.lock:
            self.active -= 1

    def segment(self, image, queries, **kwargs):
        self._job()
        return Segmentation.empty(image.shape[:2], mode=kwargs["mode"])

    def auto_masks(self, image, **kwargs):
        self._job()
        return []


def test_one_model_job_at_a_time_across_tabs_and_visitors(photos):
    fake = _SlowFake()
    with serve(build_app(fake)) as url:
        clients = [Client(url, verbose=False) for _ in range(4)]
        image = handle_file(str(photos.small_path))
        jobs = []
        for index, client in enumerate(clients):
            if index % 2:
                jobs.append(client.submit(image, 8, 0.5, 0.5, 0.7, 0, api_name="/auto_masks"))
            else:
                jobs.append(client.submit(image, "cat", "grounded", 0.3, 0.25, 0.5, False, 0,
                                          api_name="/segment_text"))
        for job in jobs:
            job.result(timeout=60)
    assert fake.jobs == 4
    assert fake.most_active == 1


def test_upload_size_limit(demo, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = tmp_path / "noise.png"
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > 1_000_000
    with open(big, "rb") as handle:
        response = httpx.post(f"{demo.url.rstrip('/')}/gradio_api/upload", files={"files": ("noise.png", handle)})
    assert response.status_code == 413
    small = tmp_path / "tiny.png"
    Image.fromarray(noise[:10, :10]).save(small)
    with open(small, "rb") as handle:
        response = httpx.post(f"{demo.url.rstrip('/')}/gradio_api/upload", files={"files": ("tiny.png", handle)})
    assert response.status_code == 200


def test_no_request_reads_files_outside_the_app(demo):
    base = demo.url.rstrip("/")
    for path in ("/etc/passwd", str(REPO / "pyproject.toml"), str(Path(__file__).resolve())):
        response = httpx.get(f"{base}/gradio_api/file={path}")
        assert response.status_code in (403, 404), path
        assert "root:" not in response.text and "[project]" not in response.text
    # A crafted API call naming a server file as the "uploaded" image is refused.
    payload = {"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "cat", "grounded",
                        0.3, 0.25, 0.5, False, 1]}
    event = httpx.post(f"{base}/gradio_api/call/segment_text", json=payload).json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/segment_text/{event}", timeout=60).text
    assert "event: error" in stream and "root:" not in stream


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def test_parse_queries():
    assert parse_queries("cat, dog.\nred  car; Cat") == ["cat", "dog", "red car"]
    assert parse_queries("  ") == [] and parse_queries(None) == []


def test_main_reads_flags_and_environment(monkeypatch, tmp_path, tiny_sam_checkpoint):
    import langsam.demo.app as demo_module

    seen = {}
    monkeypatch.setattr(demo_module, "build_app", lambda settings, **kw: seen.update(settings=settings, **kw) or "app")
    monkeypatch.setattr(demo_module, "launch", lambda app, **kw: seen.update(app=app, launch=kw))
    # main() changes process-wide settings; keep them inside this test.
    monkeypatch.setattr(demo_module.signal, "signal", lambda *args: None)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("LANGSAM_DETECTOR", "/models/gdino")
    monkeypatch.setenv("LANGSAM_DEVICE", "cpu")
    status = demo_module.main(["--sam-type", "auto", "--sam-checkpoint", str(tiny_sam_checkpoint), "--port", "7999"])
    assert status == 0 and seen["app"] == "app"
    assert seen["settings"] == {"sam_type": "auto", "sam_checkpoint": str(tiny_sam_checkpoint),
                                "detector": "/models/gdino", "device": "cpu"}
    assert seen["launch"]["server_name"] == "127.0.0.1" and seen["launch"]["server_port"] == 7999
    assert seen["launch"]["max_file_size"] == "20mb"

    with pytest.raises(SystemExit) as exit_info:
        demo_module.main(["--sam-type", "vit_q"])
    assert exit_info.value.code == 2


def test_launcher_script_shows_help():
    result = subprocess.run([sys.executable, str(REPO / "demos" / "app.py"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "langsam demo" in result.stdout and "--sam-checkpoint" in result.stdout and "--max-file-size" in result.stdout


def test_importing_the_demo_loads_neither_gradio_nor_torch():
    code = "import sys, langsam.demo; print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_app_launch_settings(demo):
    blocks = demo.app
    assert blocks.local_url.startswith("http://127.0.0.1:")
    assert blocks.allowed_paths == [] and not blocks.share
    heavy = [fn for fn in blocks.fns.values() if fn.api_name in ("segment_text", "click_set_image", "auto_masks")]
    assert len(heavy) == 3 and {fn.concurrency_id for fn in heavy} == {"langsam-model"}
    assert all(fn.concurrency_limit == 1 for fn in heavy)


# --------------------------------------------------------------------------------------------
# Clip mode's generator settings; the SAM model picker
# --------------------------------------------------------------------------------------------


def test_text_tab_clip_mode_passes_generator_settings(demo, photos):
    from langsam.demo.text_tab import clip_generator_params

    params = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    args = (handle_file(str(photos.small_path)), "cat, dog")
    _, _, table, _, _, status = demo.client.predict(*args, "clip", 0.3, 0.25, 0.0, False, 0, 3, 0.0, 0.0,
                                                    api_name="/segment_text")
    expected = demo.pipeline.segment(photos.small, ["cat", "dog"], mode="clip", clip_threshold=0.0, amg_params=params)
    without = demo.pipeline.segment(photos.small, ["cat", "dog"], mode="clip", clip_threshold=0.0)
    # The settings change the result (3x3 instead of 2x2 points), so matching `expected` shows they arrived.
    assert [int(m.sum()) for m in expected.masks] != [int(m.sum()) for m in without.masks]
    assert [row[9] for row in table["data"]] == [int(m.sum()) for m in expected.masks]
    assert [row[1] for row in table["data"]] == expected.labels
    np.testing.assert_allclose([row[4] for row in table["data"]], expected.clip_scores, atol=1e-4)
    assert status.startswith(f"{len(expected)} object(s) in clip mode")

    # Other modes do not use them (the fields are hidden there).
    grounded = [demo.client.predict(*args, "grounded", 0.3, 0.25, 0.5, False, 2, *extra,
                                    api_name="/segment_text")[2]["data"] for extra in ((), (3, 0.0, 0.0))]
    assert grounded[0] == grounded[1] and len(grounded[0]) == 2

    assert clip_generator_params() == {}
    assert clip_generator_params(4.0, None, 0.5) == {"points_per_side": 4, "stability_score_thresh": 0.5}
    for bad in ((0, None, None), (2.5, None, None), (float("nan"), None, None), (None, 1.5, None),
                (None, None, float("nan"))):
        with pytest.raises(ValueError, match="points per side must be|must be between 0 and 1"):
            clip_generator_params(*bad)


def test_model_picker_switches_sam_among_the_registry_types(tmp_path, monkeypatch, model_settings, photos, demo):
    from sam.build import resolve_model_type, valid_model_types

    assert "select_model" not in {fn.api_name for fn in demo.app.fns.values()}  # given a ready pipeline
    monkeypatch.setenv("LANGSAM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = build_app(dict(model_settings))
    (picker,) = [block for block in app.blocks.values() if getattr(block, "elem_id", None) == "sam-model"]
    official = [name for name in valid_model_types() if name != "auto" and resolve_model_type(name) == name]
    assert {"vit_b", "vit_h"} <= set(official)
    assert [value for _, value in picker.choices] == ["checkpoint", *official]
    assert picker.choices[0][0] == f"{Path(model_settings['sam_checkpoint']).name} (auto)"
    assert picker.value == "checkpoint"

    upload = handle_file(str(photos.small_path))
    with serve(app) as url:
        client = Client(url, verbose=False)
        assert client.predict(upload, api_name="/click_set_image")[-1].startswith("Image embedded")
        assert client.predict("vit_b", api_name="/select_model") == "SAM model: vit_b. It loads with the next request."
        # The next request builds the pipeline with vit_b's official weights, which are not cached here.
        with pytest.raises(AppError, match="SAM checkpoint sam_vit_b_01ec64.pth is not in the cache"):
            client.predict(upload, api_name="/click_set_image")
        assert client.predict("vit_b", api_name="/select_model").endswith("(unchanged).")
        client.predict("checkpoint", api_name="/select_model")
        assert client.predict(upload, api_name="/click_set_image")[-1].startswith("Image embedded")
        with pytest.raises(AppError, match="vit_q"):
            client.predict("vit_q", api_name="/select_model")
