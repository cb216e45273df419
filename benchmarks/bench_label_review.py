"""`langsam label review`: click-to-mask latency in the browser, against SAM's decoder alone.

    python benchmarks/bench_label_review.py [--sam-type sam2.1_hiera_small] [--clicks 40] [--threads N]

Serves a one-image project (scikit-image's chelsea, 451 x 300, six proposals) with random weights
of the given size (default sam2.1_hiera_small, as the issue asks), opens the page in headless
Chromium and clicks on the selected object; each click is timed by the page from the mouse press
to the redrawn mask (HTTP, the decoder on the cached embedding, the database write, the answer,
the redraw). After each click, in the same process, the same prompt goes to a bare
`SamPredictor.predict` on the same weights and image (the reference: the decoder call alone).
Prints p50 / p99 of both and the median ratio page / decoder. Needs Chromium (as the browser tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CLICKS_PER_OBJECT = 8  # then the next object (the page caps the clicks on one object)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam-type", default="sam2.1_hiera_small")
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's)")
    args = parser.parse_args()

    import torch
    from playwright.sync_api import sync_playwright

    from label_review_support import Clock, make_project
    from langsam.io import load_image
    from langsam.label.review import serve_review
    from sam import SamPredictor, build_sam
    from sam_factory import randomize_parameters
    from test_browser import CHROMIUM_ARGS, _find_chromium

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize_parameters(build_sam(args.sam_type), seed=0).eval()
    served, reference = SamPredictor(model, device="cpu"), SamPredictor(model, device="cpu")
    workdir = Path(tempfile.mkdtemp(prefix="bench-label-review-"))
    project = make_project(workdir, Clock(), images=(("chelsea", (300, 451), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)),))
    image_id = project.images()[0].id
    pixels = load_image(project.image_path(image_id))
    reference.set_image(pixels)
    executable = _find_chromium()
    if executable is None:
        sys.exit("no Chromium found: apt-get install chromium, or set LANGSAM_TEST_CHROMIUM")
    rng = np.random.default_rng(0)
    page_ms, decoder_ms = [], []
    with serve_review(project, port=0, predictor=served, block=False) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']", timeout=600_000)
        box = page.locator("#canvas").bounding_box()
        scale = box["width"] / pixels.shape[1]
        done = int(page.evaluate("document.body.dataset.actions"))
        points: list[list[float]] = []
        for click in range(args.clicks + 1):  # the first click (the embedding may still be on its way) is warm-up
            if click and click % CLICKS_PER_OBJECT == 0:
                page.keyboard.press("n")
                points = []
            x, y = float(rng.uniform(20, pixels.shape[1] - 20)), float(rng.uniform(20, pixels.shape[0] - 20))
            page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
            done += 1
            page.wait_for_function(f"() => Number(document.body.dataset.actions) >= {done} "
                                   "&& !document.body.dataset.busy", timeout=600_000)
            message = page.locator("#message").inner_text()
            if message:
                sys.exit(f"the page reported: {message}")
            stored = project.objects(image_id)[(click // CLICKS_PER_OBJECT) % 6].points
            points = stored
            started = time.perf_counter()
            coords = np.asarray([p[:2] for p in points], float)
            labels = np.asarray([p[2] for p in points])
            reference.predict(coords, labels, multimask_output=len(points) == 1)
            elapsed = (time.perf_counter() - started) * 1000
            if click:
                decoder_ms.append(elapsed)
        page_ms = page.evaluate("window.langsamTimings")[1:]
        browser.close()
    ratios = [a / b for a, b in zip(page_ms, decoder_ms)]
    print(f"{args.sam_type} random weights, CPU, torch threads {torch.get_num_threads()}, {len(page_ms)} clicks")
    print(f"  click to redrawn mask in the page: p50 {percentile(page_ms, 50):7.1f} ms   "
          f"p99 {percentile(page_ms, 99):7.1f} ms")
    print(f"  SamPredictor.predict alone:        p50 {percentile(decoder_ms, 50):7.1f} ms   "
          f"p99 {percentile(decoder_ms, 99):7.1f} ms")
    print(f"  median ratio page / decoder: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
