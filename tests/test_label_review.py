"""`langsam label review`: the review page in headless Chromium (keys and mouse -> the database,
masks against `SamPredictor` on the same clicks), leases between HTTP clients with a hand-driven
clock, bad requests, and the security rules (no file outside the images, escaping, binding).

One server (tiny random SAM 1 in the official layout) and one browser for the module. Without a
browser the browser test is skipped loudly, as tests/test_browser.py's (whose fixture it uses).
"""

from __future__ import annotations

import http.client
import json
import sqlite3
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from label_review_support import (CLASSES, XSS_CLASS, CallCounter, Clock, make_project, proposal_mask,
                                  write_round_report)
from test_browser import browser_context  # noqa: F401 - the module-scoped Chromium fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

API_KEY = "k" * 24


@pytest.fixture(scope="module")
def tiny_predictor(tiny_sam_checkpoint):
    from sam import SamPredictor, build_sam

    return SamPredictor(build_sam("auto", checkpoint=tiny_sam_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def review(tmp_path_factory, tiny_predictor, one_torch_thread):
    """(server, project, clock, counter): the review server on a free port of 127.0.0.1."""
    from langsam.label.review import serve_review

    clock = Clock()
    project = make_project(tmp_path_factory.mktemp("review"), clock)
    write_round_report(project)
    counter = CallCounter(tiny_predictor.model)
    server = serve_review(project, port=0, predictor=tiny_predictor, block=False)
    try:
        yield server, project, clock, counter
    finally:
        server.close()


@pytest.fixture
def client(review):
    with httpx.Client(base_url=review[0].url, timeout=60) as session:
        yield session


def _image_id(project, stem: str) -> int:
    return next(row.id for row in project.images() if row.path == f"{stem}.png")


def _natural_size(locator) -> tuple[int, int]:
    return tuple(locator.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def _reference_mask(predictor, image, points=None, box=None):
    """`SamPredictor` on the same clicks, with the page's rule: one click alone -> best of three."""
    predictor.set_image(image)
    coords = None if points is None else np.asarray([p[:2] for p in points], float)
    labels = None if points is None else np.asarray([p[2] for p in points])
    multimask = points is not None and len(points) == 1 and box is None
    masks, scores, _ = predictor.predict(coords, labels, None if box is None else np.asarray(box, float),
                                         multimask_output=multimask)
    return masks[int(np.argmax(scores))]


def test_mask_runs_are_row_major_and_start_with_background():
    from langsam.label.review import mask_runs

    assert mask_runs(np.array([[False, True], [True, True]])) == [1, 3]
    assert mask_runs(np.array([[True, False, False], [True, True, False]])) == [0, 1, 2, 2, 1]
    assert mask_runs(np.zeros((2, 2), bool)) == [4]


# ------------------------------------------------------------------------------ the browser
def test_review_in_the_browser_with_keys_and_mouse(browser_context, review, tiny_predictor, tmp_path):  # noqa: F811
    from langsam.io import load_image

    server, project, _, counter = review
    page = browser_context.new_page()
    dialogs, errors = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: errors.append(str(error)))
    actions_done = 0

    def wait_for_actions(count: int) -> None:
        page.wait_for_function(f"() => Number(document.body.dataset.actions || 0) >= {count} "
                               "&& !document.body.dataset.busy")

    def selected_text() -> str:
        return page.locator("#objects li.selected").inner_text()

    try:
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']")
        actions_done = 1  # the boot
        chelsea = _image_id(project, "chelsea")
        assert page.evaluate("document.body.dataset.imageId") == str(chelsea)  # lowest score first
        first, second, third = project.objects(chelsea)

        # Escaping: the class named like a tag is text in every list, nothing ran, no element made.
        assert XSS_CLASS in page.locator("#filter-label option").all_inner_texts()
        assert page.locator("#objects li").nth(1).inner_text() == f"{XSS_CLASS} \u2014 proposed 0.60"
        assert page.locator("img").count() == 1  # the round's plot, nothing injected
        # The training round's figures and plot (64 x 48), no server path.
        assert page.locator("#rounds-table tbody td").all_text_contents() == ["1", "0.625", "0.250", "1.500",
                                                                               "0.410", "0.520"]
        assert _natural_size(page.locator("#rounds-plot img")) == (64, 48)
        assert "secret" not in page.content()

        page.locator("#reviewer").fill("alice")
        page.locator("#reviewer").dispatch_event("change")
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("n")
        assert selected_text().startswith(XSS_CLASS)
        page.keyboard.press("ArrowLeft")
        assert selected_text().startswith("a cat")

        page.keyboard.press("a")  # accept the first object (the selection moves on)
        wait_for_actions(actions_done := actions_done + 1)
        page.keyboard.press("r")  # reject the second
        wait_for_actions(actions_done := actions_done + 1)
        page.keyboard.press("z")  # undo the reject; the third object stays selected
        wait_for_actions(actions_done := actions_done + 1)
        assert selected_text().startswith("a coin")

        canvas = page.locator("#canvas").bounding_box()
        scale = canvas["width"] / 160
        page.mouse.click(canvas["x"] + 117 * scale, canvas["y"] + 55 * scale)  # positive point
        wait_for_actions(actions_done := actions_done + 1)
        page.keyboard.down("Shift")
        page.mouse.click(canvas["x"] + 60 * scale, canvas["y"] + 100 * scale)  # negative point
        page.keyboard.up("Shift")
        wait_for_actions(actions_done := actions_done + 1)
        page.locator("#object-label").select_option(XSS_CLASS)  # relabel the third object
        wait_for_actions(actions_done := actions_done + 1)

        page.mouse.move(canvas["x"] + 20 * scale, canvas["y"] + 70 * scale)  # drag a box: a missed object
        page.mouse.down()
        page.mouse.move(canvas["x"] + 90 * scale, canvas["y"] + 115 * scale, steps=5)
        page.mouse.up()
        wait_for_actions(actions_done := actions_done + 1)
        page.keyboard.press("p")
        page.keyboard.press("p")
        page.keyboard.press("a")  # accept the second object, whose reject was undone
        wait_for_actions(actions_done := actions_done + 1)

        assert page.locator("#message").inner_text() == ""
        assert page.locator("#progress-image").inner_text() == "this image: 4 / 4 objects reviewed"
        assert page.locator("#progress-overall").inner_text() == "1 / 3 images reviewed"
        timings = page.evaluate("window.langsamTimings")
        assert len(timings) == 2 and all(value > 0 for value in timings)
        # One encoder pass for the image (when it was leased), one decoder call per click or box.
        assert counter.counts == {"encode_image": 1, "decode": 3}

        page.keyboard.press("Enter")  # the next image of the queue
        wait_for_actions(actions_done := actions_done + 1)
        assert page.evaluate("document.body.dataset.imageId") == str(_image_id(project, "coffee"))
        assert dialogs == [] and errors == [] and page.locator("img").count() == 1
    finally:
        page.close()

    # The database holds exactly those actions.
    actions = [(a["kind"], a["object_id"], a["reviewer"], a["undone"]) for a in project.actions()]
    added = max(row.id for row in project.objects(chelsea))
    assert actions == [("accept", first.id, "alice", 0), ("reject", second.id, "alice", 1),
                       ("undo", second.id, "alice", 0), ("correct", third.id, "alice", 0),
                       ("correct", third.id, "alice", 0), ("relabel", third.id, "alice", 0),
                       ("add", added, "alice", 0), ("accept", second.id, "alice", 0)]
    assert len({a["key"] for a in project.actions()}) == len(actions)
    rows = {row.id: row for row in project.objects(chelsea)}
    assert [rows[i].status for i in (first.id, second.id, third.id, added)] == ["accepted", "accepted",
                                                                                  "corrected", "added"]
    assert rows[third.id].label == XSS_CLASS and rows[added].label == CLASSES[0]
    clicks = rows[third.id].points
    assert [label for *_, label in clicks] == [1, 0]
    assert np.allclose([xy for *xy, _ in clicks], [[117, 55], [60, 100]], atol=1.0), clicks
    assert np.allclose(rows[added].box, [20, 70, 90, 115], atol=1.0), rows[added].box

    # Masks: SamPredictor's own predict (a fresh encoder pass, no cache) on the same clicks and box.
    reference = tiny_predictor
    image = load_image(project.image_path(chelsea))
    one_click = _reference_mask(reference, image, clicks[:1])
    two_clicks = _reference_mask(reference, image, clicks)
    boxed = _reference_mask(reference, image, box=rows[added].box)
    for mask in (one_click, two_clicks, boxed):
        assert 0 < mask.mean() < 1  # random weights, but neither empty nor full
    first_correction = project.actions()[3]["after"]
    from langsam.label.project import rle_decode

    assert np.array_equal(rle_decode(json.loads(first_correction["mask_rle"])), one_click)
    # The COCO export of the reviewed objects: the accepted proposals as proposed, the decoder's masks.
    from pycocotools import mask as mask_utils

    from langsam.label.export import export

    export(project, tmp_path / "export", "coco", split="none")
    coco = json.loads((tmp_path / "export" / "all.json").read_text())
    names = {category["id"]: category["name"] for category in coco["categories"]}
    height, width = image.shape[:2]
    expected = [(CLASSES[0], proposal_mask(height, width, 0)), (XSS_CLASS, proposal_mask(height, width, 1)),
                (XSS_CLASS, two_clicks), (CLASSES[0], boxed)]
    annotations = [a for a in coco["annotations"] if a["image_id"] == chelsea]
    assert [names[a["category_id"]] for a in annotations] == [label for label, _ in expected]
    for annotation, (_, mask) in zip(annotations, expected):
        assert np.array_equal(mask_utils.decode(annotation["segmentation"]).astype(bool), mask)


# ------------------------------------------------------------------------------ concurrency
def _lease(client, holder: str) -> int | None:
    answer = client.post("/api/lease", json={"holder": holder})
    assert answer.status_code == 200, answer.text
    image = answer.json()["image"]
    return None if image is None else image["id"]


def test_two_clients_never_share_a_live_lease_and_a_vanished_ones_expires(review, client):
    server, project, clock, _ = review
    ttl = server.service.lease_ttl_s
    clock.advance(2 * ttl)  # every earlier lease (the browser's) has expired
    first, second, third = (_lease(client, f"holder-{name}") for name in ("one", "two", "three"))
    assert len({first, second, third}) == 3 and None not in (first, second, third)
    assert _lease(client, "holder-four") is None  # all three images are held
    # "three" vanishes; "one" and "two" keep renewing (the page does, while it is shown).
    for _ in range(2):
        clock.advance(0.6 * ttl)
        for holder, image_id in (("holder-one", first), ("holder-two", second)):
            assert client.post("/api/renew", json={"holder": holder, "image_id": image_id}).json() == {"held": True}
    assert _lease(client, "holder-four") == third  # the vanished client's lease expired
    assert client.post("/api/renew", json={"holder": "holder-three", "image_id": third}).json() == {"held": False}
    target = project.objects(third)[0].id
    stale = client.post(f"/api/objects/{target}/accept",
                        json={"holder": "holder-three", "reviewer": "carol", "key": "key-stale-1"})
    assert stale.status_code == 409 and "lease" in stale.json()["detail"]
    # A retried action (same key) is applied once.
    target = project.objects(first)[0].id
    body = {"holder": "holder-one", "reviewer": "bob", "key": "key-retried-1"}
    before = len(project.actions())
    assert client.post(f"/api/objects/{target}/reject", json=body).status_code == 200
    assert client.post(f"/api/objects/{target}/reject", json=body).status_code == 200
    assert len(project.actions()) == before + 1 and project.object(target).status == "rejected"
    undo = client.post("/api/undo", json={**body, "key": "key-undo-1", "image_id": first})
    assert undo.status_code == 200 and project.object(target).status == "proposed"
    for holder, image_id in (("holder-one", first), ("holder-two", second), ("holder-four", third)):
        assert client.post("/api/release", json={"holder": holder, "image_id": image_id}).status_code == 200


def test_the_queue_filters_by_class_and_status(review, client):
    server, project, clock, _ = review
    clock.advance(2 * server.service.lease_ttl_s)
    # After the browser test, chelsea's "a coin" became the tag-like class; coffee's second object has it, proposed.
    answer = client.post("/api/lease", json={"holder": "holder-filter", "labels": [XSS_CLASS],
                                             "statuses": ["proposed"]}).json()
    assert answer["image"]["id"] == _image_id(project, "coffee")
    assert any(o["label"] == XSS_CLASS and o["status"] == "proposed" for o in answer["objects"])
    client.post("/api/release", json={"holder": "holder-filter", "image_id": answer["image"]["id"]})
    assert client.post("/api/lease", json={"holder": "holder-filter", "labels": ["a coin"]}).json()["image"] is None
    unknown = client.post("/api/lease", json={"holder": "holder-filter", "statuses": ["done"]})
    assert unknown.status_code == 400 and "unknown status 'done'" in unknown.json()["detail"]


def test_bad_requests_get_clear_errors(review, client):
    server, project, clock, counter = review
    clock.advance(2 * server.service.lease_ttl_s)
    image_id = _lease(client, "holder-bad")
    target = project.objects(image_id)[0]
    body = {"holder": "holder-bad", "reviewer": "dave"}
    decodes = counter.counts["decode"]

    def post(path: str, **extra):
        return client.post(path, json={**body, **extra})

    cases = [
        (post(f"/api/objects/{target.id}/points", key="key-bad-01", points=[[5, 5, 2]]), 422, "points"),
        (post(f"/api/objects/{target.id}/points", key="key-bad-02", points=[]), 422, "points"),
        (post(f"/api/objects/{target.id}/points", key="key-bad-03", points=[[5000, 5, 1]]), 400, "outside"),
        (post(f"/api/images/{image_id}/add", key="key-bad-04", label=CLASSES[0], box=[5, 5, 5, 40]), 422,
         "box"),
        (post(f"/api/images/{image_id}/add", key="key-bad-05", label="a unicorn", box=[5, 5, 50, 40]), 400,
         "label"),
        (post(f"/api/objects/{target.id}/relabel", key="key-bad-06", label="a unicorn"), 400, "unknown label"),
        (post("/api/objects/999999/accept", key="key-bad-07"), 404, "no object with id 999999"),
        (post(f"/api/objects/{target.id}/accept", key="short"), 422, "key"),
        (post(f"/api/objects/{target.id}/accept", key="key-bad-08", extra=1), 422, "extra"),
        (client.post(f"/api/objects/{target.id}/accept", content=b"{not json",
                     headers={"content-type": "application/json"}), 422, "JSON"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, (answer.status_code, answer.text)
        assert words.lower() in answer.json()["detail"].lower(), answer.json()
    assert post(f"/api/objects/{target.id}/accept", key="key-bad-09").status_code == 200
    reused = post(f"/api/objects/{target.id}/reject", key="key-bad-09")  # a key reused for another action
    assert reused.status_code == 400 and "already used" in reused.json()["detail"]
    assert project.object(target.id).status == "accepted"
    assert counter.counts["decode"] == decodes  # every refusal came before SAM's decoder
    client.post("/api/release", json={"holder": "holder-bad", "image_id": image_id})


# ------------------------------------------------------------------------------ security
def _raw(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A request with the path sent exactly as written (no client-side normalisation of ../)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_no_route_serves_a_file_outside_the_images(review, client):
    server, project, _, _ = review
    secret = project.images_dir.parent / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(secret)
    secret_bytes = secret.read_bytes()
    # A tampered row pointing outside the images folder: the project refuses to resolve it.
    with sqlite3.connect(project.path / "project.db") as db:
        outside = db.execute("INSERT INTO images (path, width, height, split) VALUES ('../secret.png', 8, 8, "
                             "'train')").lastrowid
    gets, posts = [f"/api/images/{outside}/pixels"], []
    for target in ("../secret.png", "..%2Fsecret.png", "..%2F..%2Fproject%2Fproject.db", "%2e%2e%2fsecret.png",
                   "/etc/passwd", "..\\secret.png", "1%00", "1/../../secret.png"):
        gets += [f"/api/images/{target}", f"/api/images/{target}/pixels", f"/static/{target}", f"/{target}",
                 f"/api/rounds/{target}/plot", f"/api/rounds/1/{target}"]
        posts += [f"/api/objects/{target}/{kind}" for kind in ("accept", "reject", "relabel", "points")]
        posts += [f"/api/images/{target}/add"]
    gets += ["/static/../review.py", "/static/review.js/../../review.py", "/project.db", "/project/project.db",
             "/api/../project.db", "/static/", "/static/index.html/..", "/secret.png"]
    body = json.dumps({"holder": "holder-traversal", "reviewer": "eve", "key": "key-traversal",
                       "label": CLASSES[0], "box": [1, 1, 5, 5], "points": [[1, 1, 1]]}).encode()
    for method, path in [("GET", path) for path in gets] + [("POST", path) for path in posts]:
        status, data = _raw(server.url, method, path, body if method == "POST" else None)
        assert status in (400, 404, 405, 422), (method, path, status)
        assert secret_bytes not in data and b"SQLite format" not in data and b"import " not in data, path
    # Only the page's three files are open; the data names images by id, never by path.
    for path in ("/", "/static/review.js", "/static/review.css"):
        assert _raw(server.url, "GET", path)[0] == 200
    chelsea = _image_id(project, "chelsea")
    view = client.get(f"/api/images/{chelsea}").text + client.post(
        "/api/lease", json={"holder": "holder-traversal"}).text
    assert "chelsea" not in view and str(project.images_dir) not in view


def test_other_sites_cannot_act_or_read_through_the_users_browser(review, client):
    server, project, _, _ = review
    leases = len(project.actions())
    forged = client.post("/api/lease", json={"holder": "holder-forged"}, headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403 and "cross-origin" in forged.json()["detail"]
    assert project.lease_holder(project.queue()[0]) != "holder-forged" and len(project.actions()) == leases
    port = urlsplit(server.url).port
    rebound = client.get("/api/config", headers={"Host": f"evil.example:{port}"})
    assert rebound.status_code == 403 and "127.0.0.1 or localhost" in rebound.json()["detail"]
    assert client.get("/api/config", headers={"Origin": server.url}).status_code == 200
    assert client.get("/api/config", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_the_page_escapes_and_forbids_inline_script(review, client):
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/review.js").text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    config = client.get("/api/config")
    assert config.headers["content-type"] == "application/json" and XSS_CLASS in config.json()["classes"]


def test_binding_follows_serve_and_the_api_key_guards_every_data_route(review):
    from langsam.label import Project
    from langsam.label.review import ReviewServer, ReviewService, check_binding

    assert check_binding(None, 8000, None) == "127.0.0.1"
    assert check_binding(None, 8000, API_KEY) == "0.0.0.0"
    with pytest.raises(ValueError, match="needs an API key"):
        check_binding("0.0.0.0", 8000, None)
    with pytest.raises(ValueError, match="at least 16 printable characters"):
        check_binding(None, 8000, "short")
    with pytest.raises(ValueError, match="port must be"):
        check_binding(None, 80, None)

    _, project, _, _ = review
    service = ReviewService(Project.open(project.path), lambda: pytest.fail("no SAM call expected"))
    with ReviewServer(service, "127.0.0.1", 0, API_KEY) as keyed, httpx.Client(base_url=keyed.url) as client:
        image_id = project.images()[0].id
        assert client.get("/").status_code == 200  # the page itself holds no data
        for path in ("/api/config", "/api/progress", f"/api/images/{image_id}", f"/api/images/{image_id}/pixels"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"X-API-Key": API_KEY}).status_code == 200, path
        assert client.post("/api/lease", json={"holder": "holder-keyed"}).status_code == 401
        assert client.get("/api/config", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_the_sam_that_decodes_is_the_newest_rounds_unless_given(review, client):
    from langsam.label.review import review_sam, serve_review
    from langsam.pipeline import DEFAULT_SAM_TYPE

    _, project, _, _ = review
    rounds = client.get("/api/rounds").json()["rounds"]
    assert [entry["round"] for entry in rounds] == [1] and rounds[0]["plot"] is True
    assert "secret" not in client.get("/api/rounds").text  # the report's paths stay on the server
    assert client.get("/api/rounds/2/plot").status_code == 404
    assert review_sam(project) == (DEFAULT_SAM_TYPE, None)  # round 1 has a report but no checkpoint
    tuned = project.rounds_dir / "round-1" / "best.pth"
    tuned.write_bytes(b"")
    try:
        assert review_sam(project) == ("auto", tuned)
        assert review_sam(project, "vit_b") == ("vit_b", None)
        assert review_sam(project, None, "/models/mine.pth") == ("auto", "/models/mine.pth")
    finally:
        tuned.unlink()
    with pytest.raises(TypeError, match="unknown option.*detectr"):
        serve_review(project, port=0, detectr="x")


def _no_sam():
    raise RuntimeError("this test needs no SAM")


def test_the_page_asks_for_the_api_key_and_then_reviews(browser_context, review):  # noqa: F811
    from langsam.label import Project
    from langsam.label.review import DEFAULT_LEASE_TTL_S, ReviewServer, ReviewService

    _, project, clock, _ = review
    clock.advance(2 * DEFAULT_LEASE_TTL_S)  # the earlier tests' leases have expired
    service = ReviewService(Project.open(project.path, clock=clock), _no_sam)
    with ReviewServer(service, "127.0.0.1", 0, API_KEY) as keyed:
        page = browser_context.new_page()
        try:
            page.goto(keyed.url)
            page.locator("#key-row").wait_for()  # the page met a 401 and asks
            assert "API key" in page.locator("#message").inner_text()
            page.locator("#api-key").fill(API_KEY)
            page.locator("#api-key").dispatch_event("change")
            page.wait_for_selector("body[data-ready='1']")
            leased = int(page.evaluate("document.body.dataset.imageId"))
            assert project.lease_holder(leased) is not None
            assert page.locator("#objects li").count() == len(project.objects(leased))
        finally:
            page.close()
